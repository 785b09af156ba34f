"""Targets other than a classifier logit (pipeline.scores): a segmentation model's class logits
summed over a region, an embedding's similarity to a reference image; every technique reads them
as it reads logits."""
import copy

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pipeline.config import ConfigError, ModelConfig
from pipeline.hooks import hook_count
from pipeline.models import build_model, default_layer, probe_shapes
from pipeline.scores import Scored, SegmentationScore, SimilarityScore
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from tests.conftest import write_images

S = 64  # a small input keeps the random-init segmentation model fast
SEG = ["model=torchvision", "model.name=lraspp_mobilenet_v3_large", "model.weights=null",
       f"model.input_size={S}", f"model.resize={S}"]


@pytest.fixture(scope="module")
def seg():
    """lraspp_mobilenet_v3_large, random init (no backbone weights either), 64 x 64 inputs."""
    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(kind="torchvision", name="lraspp_mobilenet_v3_large", weights=None,
                                           input_size=S, resize=S))
    return build_model(cfg)


def batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, S, S, generator=g)


def test_a_segmentation_model_is_wrapped_without_changing_its_names_or_state(seg):
    net = seg.module.net
    assert isinstance(seg.module, Scored) and seg.module.kind == "segmentation" and seg.num_classes == 21
    assert [n for n, _ in seg.module.named_modules()][1:] == [n for n, _ in net.named_modules()][1:]
    assert seg.module.get_submodule("backbone.16") is net.backbone["16"]
    assert list(seg.module.state_dict()) == list(net.state_dict())
    assert not seg.module.training and not net.training
    shapes = probe_shapes(seg.module, seg.example())
    assert default_layer(seg.module, shapes, (S, S)) == "backbone.16"  # the backbone's last stage, not the head


def test_segmentation_score_is_the_class_logits_summed_over_the_detached_predicted_mask(seg):
    x = batch()
    with torch.no_grad():
        out = seg.module.net(x)["out"]  # [N, 21, S, S]
        got = seg.module(x)
    pred = out.argmax(1)
    want = torch.stack([torch.stack([out[n, k][pred[n] == k].sum() for k in range(21)]) for n in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the mask is a constant: the gradient of a class score is the mask itself on that class's logits
    logits = seg.module.net(x)["out"].detach().requires_grad_(True)
    c = int(pred[0].flatten().mode().values)
    (g,) = torch.autograd.grad(SegmentationScore()({"out": logits})[0, c], logits)
    assert torch.equal(g[0, c], (pred[0] == c).float()) and g[0].abs().sum() == (pred[0] == c).sum()


def test_segmentation_score_over_a_region(seg):
    x = batch()
    with torch.no_grad():
        out = seg.module.net(x)["out"]
    got = SegmentationScore([5, 10, 20, 7], S)({"out": out})
    torch.testing.assert_close(got, out[:, :, 10:17, 5:25].sum((2, 3)))
    # out on a coarser grid than the input: the box scaled onto it
    half = F.avg_pool2d(out, 2)
    torch.testing.assert_close(SegmentationScore([6, 10, 20, 8], S)({"out": half}), half[:, :, 5:9, 3:13].sum((2, 3)))


def hand_gradcam(net, x, layer, classes):
    """Grad-CAM by hand: the class's logits over its detached predicted mask, d/d(layer output),
    channel weights = the gradients' spatial mean, relu(sum_c w_c A_c)."""
    store = {}
    handle = net.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = net(x.clone().requires_grad_(True))["out"]  # the net's parameters are frozen: the input carries the graph
    finally:
        handle.remove()
    mask = (out.argmax(1) == classes[:, None, None]).float().detach()
    score = (out.gather(1, classes[:, None, None, None].expand(-1, 1, *out.shape[2:]))[:, 0] * mask).sum()
    (g,) = torch.autograd.grad(score, store["a"])
    return (g.mean((2, 3), keepdim=True) * store["a"]).sum(1).clamp_min(0).detach()


def test_gradcam_through_the_segmentation_score_equals_a_hand_written_one(seg):
    x = batch()
    before = {k: v.clone() for k, v in seg.module.state_dict().items()}
    r = get_technique("gradcam")().attribute(seg.module, x, ["backbone.16"], TargetSpec.parse("topk:2"))
    assert r.targets.shape == (2, 2) and r.maps["backbone.16", "cam"].shape[:2] == (2, 2)
    for k in range(2):
        want = hand_gradcam(seg.module.net, x, "backbone.16", r.targets[:, k])
        torch.testing.assert_close(r.maps["backbone.16", "cam"][:, k], want, rtol=1e-4, atol=1e-6)
    assert hook_count(seg.module) == 0 and not seg.module.training
    assert all(torch.equal(before[k], v) for k, v in seg.module.state_dict().items())


def test_gradcam_matches_pytorch_grad_cam_semantic_segmentation_target(seg):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    class Out(torch.nn.Module):  # pytorch-grad-cam wants a tensor output
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)["out"]

    x = batch(1, seed=3)
    r = get_technique("gradcam")().attribute(seg.module, x, ["backbone.16"], TargetSpec.parse("pred"))
    c = int(r.targets[0, 0])
    with torch.no_grad():
        mask = (seg.module.net(x)["out"].argmax(1)[0] == c).float().numpy()
    net = copy.deepcopy(seg.module.net).requires_grad_(True)  # it calls .backward(): parameter grads, on a copy
    with pgc.GradCAM(model=Out(net).eval(), target_layers=[net.backbone["16"]]) as cam:
        theirs = cam(input_tensor=x, targets=[SemanticSegmentationTarget(c, mask)])[0]  # resized, min-max scaled
    ours = F.interpolate(r.maps["backbone.16", "cam"][:, :1], size=(S, S), mode="bilinear", align_corners=False)[0, 0]
    ours = (ours - ours.min()) / (ours.max() - ours.min() + 1e-7)
    assert np.corrcoef(ours.numpy().ravel(), theirs.ravel())[0, 1] >= 0.999


def test_class_names_from_the_segmentation_weights_without_reading_them():
    cfg = OmegaConf.structured(ModelConfig(kind="torchvision", name="lraspp_mobilenet_v3_large", weights="DEFAULT",
                                           input_size=S, resize=S))
    m = build_model(cfg, load_weights=False)
    assert m.class_names[0] == "__background__" and len(m.class_names) == m.num_classes == 21
    assert TargetSpec.parse("cat", m.class_names) == TargetSpec("index", 8)


def test_segmentation_runs_end_to_end_with_gradients_and_perturbations(make_cfg, tmp_path):
    from pipeline.runner import run
    from pipeline.store import open_run

    write_images(tmp_path / "imgs", 2, size=(S, S))
    cfg = make_cfg(*SEG, "data=folder", f"data.path={tmp_path / 'imgs'}", "num_workers=0", "target=topk:2",
                   "technique=[gradcam,saliency,occlusion]", "technique.occlusion.window=32", "technique.occlusion.stride=32")
    run(cfg, tmp_path / "run")
    with open_run(tmp_path / "run") as r:
        assert r.run_key["layers"] == ["backbone.16"] and r.run_key["score"] == {"region": None, "min_score": 0.5, "iou": 0.5}
        assert r.maps("gradcam")["backbone.16", "cam"].shape == (2, 2, 4, 4)  # output stride 16 (dilated)
        assert r.maps("saliency")["input", "maxabs"].shape[:2] == (2, 2)
        assert r.column("target").read().shape == (2, 2)
    assert len(list((tmp_path / "run").rglob("*.png"))) >= 2
    # a region, checked before any work
    with pytest.raises(ConfigError, match="does not fit inside the model input"):
        run(make_cfg(*cfg_overrides(cfg, tmp_path), "score.region=[40,0,30,10]"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="expected \\[x, y, w, h\\]"):
        run(make_cfg(*cfg_overrides(cfg, tmp_path), "score.region=[0,0,0,10]"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="is not a segmentation model"):
        run(make_cfg("model=timm", "data=folder", f"data.path={tmp_path / 'imgs'}", "technique=gradcam",
                     "score.region=[0,0,8,8]"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "maps.h5").exists()
    run(make_cfg(*cfg_overrides(cfg, tmp_path), "score.region=[8,8,32,16]", "technique=gradcam"), tmp_path / "box")
    with open_run(tmp_path / "box") as r:
        assert r.run_key["score"]["region"] == [8, 8, 32, 16]


def cfg_overrides(cfg, tmp_path):
    return [*SEG, "data=folder", f"data.path={tmp_path / 'imgs'}", "num_workers=0"]


# -- embedding similarity -------------------------------------------------------------------------

class Embed(torch.nn.Module):
    """A tiny embedding network: conv -> relu -> global pool -> [N, 8]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


def test_similarity_score_is_the_cosine_to_the_reference_embedding():
    net = Embed().eval()
    x, ref = batch(3), batch(1, seed=9)
    with torch.no_grad():
        scored = Scored(net, SimilarityScore(net(ref)[0], "ref"), "similarity")
        got = scored(x)
        e, r = net(x), net(ref)[0]
    want = (e @ r) / (e.norm(dim=1) * r.norm())
    torch.testing.assert_close(got, want[:, None])
    assert got.shape == (3, 1) and list(scored.state_dict()) == list(net.state_dict())
    sal = get_technique("saliency")().attribute(scored, x, [], TargetSpec.parse("similar:ref.png"))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cosine_similarity(net(xg), r[None]).sum(), xg)
    torch.testing.assert_close(sal.maps["input", "grad"][:, 0], g, rtol=1e-4, atol=1e-7)


def test_similarity_runs_end_to_end_and_a_bad_reference_fails_before_work(make_cfg, tmp_path):
    from pipeline.runner import run
    from pipeline.store import open_run

    paths = write_images(tmp_path / "imgs", 2, size=(S, S))
    model = ["model=timm", "model.name=resnet18", f"model.input_size={S}", f"model.resize={S}"]
    data = ["data=folder", f"data.path={tmp_path / 'imgs'}", "num_workers=0"]
    run(make_cfg(*model, *data, f"target=similar:{paths[0]}", "technique=[gradcam,integrated_gradients]",
                 "technique.integrated_gradients.steps=4"), tmp_path / "run")
    with open_run(tmp_path / "run") as r:
        assert r.classes() == [f"similarity to {paths[0].name}"]
        assert r.maps("gradcam")["layer4", "cam"].shape == (2, 1, 2, 2)
        logit = r.column("logit").read()[:, 0]
    assert logit[0] == pytest.approx(1.0, abs=1e-5) and -1 <= logit[1] < 1  # the reference is the first input
    with pytest.raises(ConfigError, match="reference image .* does not exist"):
        run(make_cfg(*model, *data, f"target=similar:{tmp_path / 'nope.jpg'}", "technique=gradcam"), tmp_path / "bad")
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="cannot be decoded"):
        run(make_cfg(*model, *data, f"target=similar:{tmp_path / 'corrupt.jpg'}", "technique=gradcam"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="needs the reference image's path"):
        run(make_cfg(*model, *data, "target=similar:", "technique=gradcam"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "maps.h5").exists()


def test_a_reference_image_is_preprocessed_like_the_inputs(tmp_path):
    from pipeline.data.base import prepare
    from pipeline.scores import read_reference

    cfg = OmegaConf.structured(ModelConfig(kind="timm", name="resnet18", input_size=S, resize=72))
    m = build_model(cfg)
    img = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "r.png"), img[..., ::-1])
    torch.testing.assert_close(read_reference(str(tmp_path / "r.png"), m), prepare(img, None, m.preprocess)[0][None])


def test_a_run_from_before_score_options_resumes_and_a_region_does_not():
    from pipeline.store import key_differences

    old, new = {"target": "pred"}, {"region": None, "min_score": 0.5, "iou": 0.5}
    assert key_differences(old, {**old, "score": new}) == []
    assert key_differences(old, {**old, "score": {**new, "region": [0, 0, 8, 8]}}) == \
        ['score: (not set) -> {"iou": 0.5, "min_score": 0.5, "region": [0, 0, 8, 8]}']


# -- detection ------------------------------------------------------------------------------------

D = 64  # detector input side (min_size = max_size: the pipeline's squares are not resized again)


def tiny_detector():
    """fasterrcnn_resnet50_fpn, random init, 64 px, every detection kept (score threshold 0), few
    proposals: fast, and a random detector still returns boxes. Also model.arch of the run below."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    return tvm.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None, min_size=D, max_size=D,
                         box_score_thresh=0.0, rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=12,
                         box_detections_per_img=2)


@pytest.fixture(scope="module")
def det():
    from pipeline.scores import DetectionScore

    net = tiny_detector().eval().requires_grad_(False)
    return Scored(net, DetectionScore(0.5), "detection", layer_scope="backbone.body")


def test_a_box_score_is_the_score_of_the_matching_detection():
    from pipeline.scores import DetectionScore

    score = DetectionScore(0.5)
    score.boxes = torch.tensor([[0., 0., 10., 10.], [20., 20., 40., 40.], [0., 0., 10., 10.], [0., 0., 1., 1.]])
    score.labels = torch.tensor([3, 5, 4, -1])  # the last: an empty slot
    dets = {"boxes": torch.tensor([[0., 0., 10., 9.], [1., 0., 10., 10.], [21., 20., 40., 40.], [0., 0., 10., 10.]]),
            "labels": torch.tensor([3, 3, 5, 7]), "scores": torch.tensor([0.9, 0.6, 0.4, 0.8], requires_grad=True)}
    got = score([dets, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                        "scores": dets["scores"][:0]}])
    # box 0: label 3, IoU 0.9 and 0.9 -> the first of the best; box 1: label 5, IoU 0.95; box 2: label 4 none; slot: none
    torch.testing.assert_close(got, torch.tensor([[0.9, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    (g,) = torch.autograd.grad(got[0, 1], dets["scores"])
    assert g.tolist() == [0.0, 0.0, 1.0, 0.0]
    score.iou = 0.96
    assert score([dets])[0, 1] == 0.0  # IoU 0.95 no longer matches


def test_detection_targets_are_the_clean_inputs_top_boxes(det):
    from pipeline.scores import detection_batch

    x = torch.rand(2, 3, D, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = det.net(x)
    with detection_batch(det, x, 3, 0.0) as found:
        with torch.no_grad():
            scores = det(x)  # [2, 6]: every box of the batch, for each input
    assert det.score.boxes is None  # cleared after the batch
    for n in range(2):
        order = out[n]["scores"].argsort(descending=True)[:2]  # box_detections_per_img=2: slot 2 is empty
        torch.testing.assert_close(found.boxes[n, :2], out[n]["boxes"][order])
        assert found.labels[n, :2].tolist() == out[n]["labels"][order].tolist() and found.labels[n, 2] == -1
        torch.testing.assert_close(scores[n, found.targets[n, :2]], out[n]["scores"][order])  # each box matches itself
    assert found.valid.tolist() == [[True, True, False]] * 2 and torch.isnan(found.scores[:, 2]).all()
    assert found.targets.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_gradcam_of_a_box_equals_a_hand_written_one(det):
    from torchvision.ops import box_iou

    from pipeline.scores import detection_batch
    from pipeline.techniques import Pass

    x = torch.rand(1, 3, D, D, generator=torch.Generator().manual_seed(1))
    layer = "backbone.body.layer4"
    before = {k: v.clone() for k, v in det.state_dict().items()}
    with detection_batch(det, x, 2, 0.0) as found:
        shared = Pass(det, x, [layer], TargetSpec.parse("topk:2"), targets=found.targets)
        cam = get_technique("gradcam")().attribute(det, x, [layer], TargetSpec.parse("topk:2"), shared=shared)
    cam = cam.maps[layer, "cam"]
    assert hook_count(det) == 0 and all(torch.equal(before[k], v) for k, v in det.state_dict().items())
    for j in range(2):
        store = {}
        handle = det.net.get_submodule(layer).register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            out = det.net(x.clone().requires_grad_(True))[0]
        finally:
            handle.remove()
        same = (out["labels"] == found.labels[0, j]) & (box_iou(found.boxes[0, j:j + 1], out["boxes"].detach())[0] >= 0.5)
        best = torch.where(same, box_iou(found.boxes[0, j:j + 1], out["boxes"].detach())[0], torch.tensor(-1.0)).argmax()
        (g,) = torch.autograd.grad(out["scores"][best], store["a"])
        want = (g.mean((2, 3), keepdim=True) * store["a"]).sum(1).clamp_min(0)
        torch.testing.assert_close(cam[:, j], want.detach(), rtol=1e-4, atol=1e-7)


def test_boxes_are_drawn_on_the_image():
    from pipeline.io.render import draw_boxes

    display = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    got = draw_boxes(display, np.array([[[4, 4, 20, 24], [0, 0, 5, 5]]]), np.array([[1, -1]]), lambda c: f"c{c}")
    assert (got[0, 24, 4:21] > 0).any(1).all() and (got[0, 4:25, 20] > 0).any(1).all()  # the box's edges
    assert not got[0, 15:23, 6:18].any() and not display.any()  # inside (below its title) empty, input untouched
    assert not draw_boxes(display, np.array([[[0, 0, 5, 5]]]), np.array([[-1]]), str).any()  # an empty slot: no box


def test_detection_runs_end_to_end_with_boxes_stored_and_empty_slots_nan(make_cfg, tmp_path):
    from pipeline.runner import run
    from pipeline.store import open_run

    write_images(tmp_path / "imgs", 2, size=(D, D))
    torch.save(tiny_detector().state_dict(), tmp_path / "det.pt")
    model = ["model=checkpoint", f"model.path={tmp_path / 'det.pt'}", "model.arch=tests.test_targets_dense:tiny_detector",
             f"model.input_size={D}", f"model.resize={D}"]
    data = ["data=folder", f"data.path={tmp_path / 'imgs'}", "num_workers=0"]
    run(make_cfg(*model, *data, "target=topk:3", "score.min_score=0", "technique=[gradcam,saliency]"), tmp_path / "run")
    with open_run(tmp_path / "run") as r:
        assert r.run_key["layers"] == ["backbone.body.layer4"]
        boxes, labels = r.maps("detections")["input", "boxes"].read(), r.maps("detections")["input", "labels"].read()
        scores = r.maps("detections")["input", "scores"].read()
        cam = r.maps("gradcam")["backbone.body.layer4", "cam"].read()
        grad = r.maps("saliency")["input", "grad"].read()
        target, logit = r.column("target").read(), r.column("logit").read()
    assert boxes.shape == (2, 3, 4) and labels.shape == (2, 3) and (labels[:, 2] == -1).all()  # 2 boxes per input
    assert np.isfinite(cam[:, :2]).all() and np.isnan(cam[:, 2]).all() and np.isnan(grad[:, 2]).all()
    assert (target == labels).all() and np.allclose(logit[:, :2], scores[:, :2], atol=1e-6)
    assert ((boxes[:, :2] >= 0) & (boxes[:, :2] <= D)).all()
    assert len(list((tmp_path / "run" / "png" / "gradcam").glob("*.png"))) == 2
    with pytest.raises(ConfigError, match="detection model, whose targets are its detected boxes"):
        run(make_cfg(*model, *data, "target=3", "technique=gradcam"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="takes images in \\[0, 1\\]"):
        run(make_cfg(*model, *data, "model.mean=[0.5,0.5,0.5]", "technique=gradcam"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="evaluate.deletion"):
        run(make_cfg(*model, *data, "evaluate.deletion=true", "technique=gradcam"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "maps.h5").exists()


def test_torchvision_detectors_take_the_pipelines_squares_in_0_1():
    for name in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn"):
        cfg = OmegaConf.structured(ModelConfig(kind="torchvision", name=name, weights=None, input_size=D, resize=D))
        m = build_model(cfg)
        assert isinstance(m.module, Scored) and m.module.kind == "detection" and m.num_classes == 91
        assert m.preprocess.mean == (0.0, 0.0, 0.0) and m.preprocess.std == (1.0, 1.0, 1.0)
        assert m.module.net.transform.min_size == (D,) and m.module.net.transform.max_size == D
