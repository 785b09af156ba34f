"""Defaults that look right (issue 11, point 6) and the progress of data-free techniques (point 4):
class_vis's recipe and titles, filter_vis's titles, Eigen-CAM's sign, kernels on 1x1 convolutions,
receptive-field grids, and progress reported by filter_vis / class_vis / kernels / optimize."""

import cv2
import h5py
import numpy as np
import pytest
import torch
from torch import nn

import pipeline.io.render as R
from pipeline.config import RenderConfig
from pipeline.contracts import Draw, Scale
from pipeline.featvis import objectives as O
from pipeline.featvis import visualize
from pipeline.store import datasets, decode_strings
from pipeline.io.tiles import LABEL_MIN_SHRINK
from pipeline.models import Preprocess, build_efficientnet_lite0
from pipeline.progress import Progress
from pipeline.runner import run
from pipeline.techniques import get_technique
from pipeline.techniques.filter_vis import FilterVis
from tests.conftest import tiny_overrides
from tests.tinymodels import tiny_net

CPU = torch.device("cpu")
PRE = Preprocess(16, 16, "area", (0.5,) * 3, (0.5,) * 3)
OLD_RECIPE = dict(param="pixel", size=0, jitter=0, scales=[], degrees=[])  # class_vis's former defaults (steps 200)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on shared cores


@pytest.fixture(scope="module")
def lite0():
    """The embedded EfficientNet-Lite0 with its ImageNet weights (frozen, eval)."""
    return build_efficientnet_lite0().eval().requires_grad_(False)


class Recorder(Progress):
    """A Progress whose on_change records every (done, total)."""

    def __init__(self):
        self.calls = []
        super().__init__(on_change=lambda done, total: self.calls.append((done, total)))


def generate(name, model, layers, progress=None, max_batch=8, class_names=None, preprocess=PRE, **options):
    extra = {} if progress is None else {"progress": progress}
    return get_technique(name)(**options).generate(
        model, layers, device=CPU, generator=torch.Generator().manual_seed(0), max_batch=max_batch,
        class_names=class_names, preprocess=preprocess, **extra)


def check_progress(rec: Recorder, total: float, min_updates: int):
    """Total announced before any work, done rises step by step to it, many updates."""
    assert rec.calls, "no progress reported"
    assert rec.calls[0] == (0, total), rec.calls[:3]  # the whole work announced up front
    assert all(t == total for _, t in rec.calls)  # the total never moves while running
    dones = [d for d, _ in rec.calls]
    assert dones == sorted(dones) and dones[-1] == total
    assert len(rec.calls) - 1 >= min_updates, len(rec.calls)  # not once at the end


def titles(monkeypatch, draw):
    """The texts render.label writes while `draw()` runs."""
    seen = []
    real = R.label
    monkeypatch.setattr(R, "label", lambda tile, text, size: seen.append(text) or real(tile, text, size))
    draw()
    return seen


# -- progress of data-free techniques -----------------------------------------------------------
def test_visualize_steps_progress_by_the_batch_rows_after_every_step():
    model, rec = tiny_net(), Recorder()
    rec.add(3 * 4 * 2)
    gens = [torch.Generator().manual_seed(s) for s in range(3)]
    visualize(model, O.channel("relu1", torch.tensor([0, 1, 2])), batch=3, generators=gens, device=CPU, size=12,
              steps=4, lr=0.05, upscalings=1, preprocess=PRE, progress=rec)
    assert [d for d, _ in rec.calls] == [0] + [3 * k for k in range(1, 9)]  # 3 rows after each of 8 steps


def test_filter_vis_announces_channels_x_steps_x_scales_and_reports_each_step():
    model, opts = tiny_net(), dict(channels="0-2", size=12, steps=5, upscalings=1, jitter=1)
    rec = Recorder()
    out = generate("filter_vis", model, ["relu1", "conv2"], progress=rec, max_batch=2, **opts)
    # 2 layers x 3 channels x 5 steps x 2 scales; chunks of 2 + 1 rows: 2 layers x 2 chunks x 10 steps updates
    check_progress(rec, 2 * 3 * 5 * 2, min_updates=40)
    plain = generate("filter_vis", model, ["relu1", "conv2"], max_batch=2, **opts)
    for key in out:  # a progress never changes the results
        assert np.array_equal(np.asarray(out[key]), np.asarray(plain[key])), key


def test_class_vis_and_kernels_report_progress_and_keep_their_results():
    model, rec = tiny_net(), Recorder()
    out = generate("class_vis", model, [], progress=rec, max_batch=2, classes="0,1,2", size=16, steps=4)
    check_progress(rec, 3 * 4, min_updates=8)  # chunks of 2 and 1 rows, 4 steps each
    plain = generate("class_vis", model, [], max_batch=2, classes="0,1,2", size=16, steps=4)
    assert torch.equal(out["logits", "images"], plain["logits", "images"])
    assert torch.equal(out["logits", "objective"], plain["logits", "objective"])

    rec = Recorder()
    out = generate("kernels", model, ["conv1", "conv2"], progress=rec)
    check_progress(rec, 2, min_updates=2)  # one unit per layer
    plain = generate("kernels", model, ["conv1", "conv2"])
    assert all(torch.equal(out[k], plain[k]) for k in out if k[1] != "label")


# -- (a) class_vis: good images by default, the old recipe by options, class-name titles ---------
def test_class_vis_defaults_follow_filter_vis_and_the_old_recipe_stays_reachable(make_cfg):
    o, f = get_technique("class_vis")().options, FilterVis.Options()
    assert (o.param, o.decorrelate, o.jitter, o.scales, o.degrees) == ("fourier", True, f.jitter, f.scales, f.degrees)
    assert (o.size, o.steps, o.lr) == (128, 256, 0.05)
    cfg = make_cfg("technique=class_vis").technique.class_vis  # the yaml says the same
    assert (cfg.param, cfg.size, cfg.jitter, list(cfg.scales), cfg.preset) == ("fourier", 128, 8, f.scales, None)
    preset = get_technique("class_vis")(preset="simonyan2013").options
    assert {k: getattr(preset, k) for k in OLD_RECIPE} == OLD_RECIPE and preset.steps == 200
    # preset=simonyan2013 is the same computation as the explicit options
    model = tiny_net()
    a = generate("class_vis", model, [], classes="1,2", preset="simonyan2013")
    b = generate("class_vis", model, [], classes="1,2", steps=200, **OLD_RECIPE)
    assert torch.equal(a["logits", "images"], b["logits", "images"]) and a["logits", "images"].shape[-1] == 16
    with pytest.raises(ValueError, match="simonyan2013"):
        get_technique("class_vis")(preset="lucid")


def high_frequency(images: torch.Tensor) -> list:
    """Per image, the fraction of its spectral energy above half the Nyquist frequency."""
    x = images.float() / 255
    power = torch.fft.rfft2(x - x.mean((-1, -2), keepdim=True)).abs().square().sum(1)  # [M, H, W//2+1]
    fy = torch.fft.fftfreq(x.shape[-2]).abs()[:, None]
    fx = torch.fft.rfftfreq(x.shape[-1])[None, :]
    high = torch.maximum(fy, fx) > 0.25
    return (power[:, high].sum(1) / power.flatten(1).sum(1)).tolist()


def test_class_vis_defaults_make_images_not_high_frequency_noise_on_the_real_model(lite0):
    pre = Preprocess(224, 256, "area", (0.5,) * 3, (0.5,) * 3)
    short = dict(classes="285,963", size=64, steps=16)  # a short run of each recipe (the measure shows early)
    new = generate("class_vis", lite0, [], preprocess=pre, **short)
    old = generate("class_vis", lite0, [], preprocess=pre, **short, **{k: v for k, v in OLD_RECIPE.items() if k != "size"})
    assert all(h < 0.25 for h in high_frequency(new["logits", "images"])), high_frequency(new["logits", "images"])
    assert all(h > 0.3 for h in high_frequency(old["logits", "images"])), high_frequency(old["logits", "images"])
    assert (new["logits", "objective"][:, -1] > new["logits", "objective"][:, 0] + 10).all()


def test_class_vis_tiles_are_titled_with_the_class_name(monkeypatch, tmp_path):
    model = tiny_net(num_classes=3)
    named = generate("class_vis", model, [], classes="0,blue", class_names=["red", "green", "blue"], size=16, steps=2)
    assert list(named["logits", "label"]) == ["red (0)", "blue (2)"]
    unnamed = generate("class_vis", model, [], classes="1", size=16, steps=2)
    assert list(unnamed["logits", "label"]) == ["class 1"]
    arrays = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in named.items()}
    seen = titles(monkeypatch, lambda: R.render_gallery(tmp_path, "class_vis", arrays, RenderConfig()))
    obj = named["logits", "objective"][:, -1].tolist()
    assert seen == [f"red (0) · {obj[0]:.1f}", f"blue (2) · {obj[1]:.1f}"]


# -- (b) filter_vis titles name the channel -----------------------------------------------------
def test_filter_vis_titles_say_which_number_is_the_channel(monkeypatch, tmp_path):
    out = generate("filter_vis", tiny_net(), ["relu1"], channels="3,5", size=12, steps=2)
    assert list(out["relu1", "label"]) == ["relu1 · ch 3", "relu1 · ch 5"]
    arrays = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in out.items()}
    seen = titles(monkeypatch, lambda: R.render_gallery(tmp_path, "filter_vis", arrays, RenderConfig()))
    obj = out["relu1", "objective"][:, -1].tolist()
    assert seen == [f"relu1 · ch 3 · {obj[0]:.1f}", f"relu1 · ch 5 · {obj[1]:.1f}"]


def test_titles_are_stored_in_maps_h5_and_drawn_again_from_it(make_cfg, tiny_checkpoint, image_folder, tmp_path,
                                                              monkeypatch):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[filter_vis,class_vis]", "layers=[relu1]",
                                   "technique.filter_vis.channels='0,2'", "technique.filter_vis.steps=2",
                                   "technique.filter_vis.size=16", "technique.class_vis.classes='1,3'",
                                   "technique.class_vis.steps=2", "technique.class_vis.size=16", "data.limit=1"))
    run(cfg, tmp_path / "out")
    with h5py.File(tmp_path / "out" / "maps.h5", "r") as f:  # read back as MapsFile.group_arrays does
        arrays = {tuple(name.rsplit("/", 1)): np.asarray(decode_strings(ds[()])) if ds.dtype.kind in "OS" else ds[()]
                  for name, ds in datasets(f["filter_vis"]).items()}
    assert list(arrays["relu1", "label"]) == ["relu1 · ch 0", "relu1 · ch 2"]
    seen = titles(monkeypatch, lambda: R.render_gallery(tmp_path, "filter_vis", arrays, RenderConfig()))
    assert [t.rsplit(" · ", 1)[0] for t in seen] == ["relu1 · ch 0", "relu1 · ch 2"]  # a resumed run's gallery


# -- (c) Eigen-CAM's sign -------------------------------------------------------------------------
class Signed(nn.Module):
    """A 'layer' whose activations all point along u = (-1, 0.5) with positive strength a_p:
    a signed layer where the first direction's entries sum to < 0."""

    def __init__(self):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        a = x.mean(1, keepdim=True).abs() + 0.1  # [N, 1, H, W] > 0
        u = torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1)
        f = self.feat(a * u + 0.01 * x[:, :2])  # small noise off the direction
        return self.fc(f.mean((2, 3)))


def test_eigencam_map_agrees_with_the_activation_energy_on_a_signed_layer():
    from pipeline.targets import TargetSpec
    model = Signed().eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cam = get_technique("eigencam")().attribute(model, x, ["feat"], TargetSpec.parse("topk:2")).maps["feat", "cam"]
    assert cam.shape == (2, 2, 8, 8)
    assert (cam.flatten(1).amax(1) > 0).all()  # the channel-sum rule gave all-zero maps here
    raw = get_technique("eigencam")(relu=False).attribute(model, x, ["feat"], TargetSpec.parse("pred")).maps["feat", "cam"]
    with torch.no_grad():
        energy = model.feat(x.mean(1, keepdim=True).abs() + 0.1).abs()  # |a_p| u-norm up to a constant
    for n in range(2):
        corr = np.corrcoef(raw[n, 0].flatten().numpy(), energy[n, 0].flatten().numpy())[0, 1]
        assert corr > 0.99, corr  # the map follows the activation strength, with its sign


def test_eigencam_sign_is_deterministic_whatever_sign_the_svd_returns():
    from pipeline.techniques.eigencam import orient
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 20, 5, generator=g)  # signed activations [N, P, C]
    energy = X.norm(dim=2)
    v = torch.linalg.svd(X, full_matrices=False).Vh[:, 0]
    a, b = orient(v, X, energy), orient(-v, X, energy)
    assert torch.equal(a, b)
    assert (torch.einsum("npc,nc,np->n", X, a, energy) >= 0).all()
    assert ((X @ a[..., None]).flatten(1).amax(1) > 0).all()  # so relu leaves something


def test_eigencam_sample_maps_of_the_real_model_are_all_nonzero(make_cfg, tmp_path):
    layers = ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2", "conv_head"]  # signed block outputs and ReLU6 ones
    cfg = make_cfg("technique=eigencam", f"layers=[{','.join(layers)}]", "render.png=false", "num_workers=0")
    run(cfg, tmp_path / "out")
    with h5py.File(tmp_path / "out" / "maps.h5", "r") as f:
        for layer in layers:
            cam = f[f"eigencam/{layer}/cam"][()]  # [4, 1, h, w]
            assert cam.shape[0] == 4
            assert (cam.reshape(4, -1).max(1) > 0).all(), (layer, cam.reshape(4, -1).max(1))


# -- (d) kernels on 1x1 convolutions ---------------------------------------------------------------
class Pointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 1)
        self.pw = nn.Conv2d(4, 20, 1)

    def forward(self, x):
        return self.pw(self.rgb(x))


def test_kernels_draw_a_1x1_layer_as_its_weight_matrix():
    from pipeline.techniques.kernels import block_side
    torch.manual_seed(0)
    model = Pointwise().eval()
    out = generate("kernels", model, ["pw", "rgb"], size=48)
    W = model.pw.weight.detach()[:, :, 0, 0]  # [20, 4]
    side = block_side(20, 4)
    assert side == 16
    images = out["pw", "images"]
    assert images.shape == (2, 3, 48, 48)  # rows 0-15 and 16-19, each a 16 x 16 block repeated 3x
    grey = 127.5 * (1 + W / W.abs().max())
    first = images[0, 0, ::3, ::3].float()
    torch.testing.assert_close(first[:, :4], grey[:16].round(), atol=0, rtol=0)
    assert (first[:, 4:] == 255).all()  # beyond the matrix: white
    assert (images[1, 0, ::3, ::3][4:] == 255).all()
    assert out["pw", "index"].tolist() == [0, 16] and out["pw", "channel"].tolist() == [0, 0]
    assert list(out["pw", "label"]) == ["pw · 1x1\nout 0-15 · in 0-3", "pw · 1x1\nout 16-19 · in 0-3"]
    assert out["rgb", "images"].shape == (4, 3, 48, 48)  # 1x1 on RGB: a colour per filter, said so
    assert list(out["rgb", "label"]) == [f"rgb · f {o} · 1x1 RGB" for o in range(4)]
    assert (block_side(1280, 320), block_side(80, 240), block_side(32, 1)) == (64, 40, 16)


def test_kernels_1x1_tiles_are_titled_in_the_gallery(monkeypatch, tmp_path):
    out = generate("kernels", Pointwise().eval(), ["pw", "rgb"])
    arrays = {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in out.items()}
    seen = titles(monkeypatch, lambda: R.render_gallery(tmp_path, "kernels", arrays, RenderConfig()))
    assert seen[:2] == ["pw · 1x1\nout 0-15 · in 0-3", "pw · 1x1\nout 16-19 · in 0-3"]
    assert seen[2] == "rgb · f 0 · 1x1 RGB" and len(seen) == 6
    assert (tmp_path / "png" / "kernels.png").is_file()


# -- (e) receptive-field grids and readable labels ---------------------------------------------------
def test_a_30_layer_rf_png_wraps_into_a_grid_no_wider_than_the_cap(monkeypatch, tmp_path):
    cfg = RenderConfig()  # tile 160, gallery_columns 16
    rng = np.random.default_rng(0)
    layers = [f"blocks.{i // 4}.{i % 4}.conv_pwl" for i in range(30)]
    maps = {(layer, "map"): rng.random((1, 7, 7)).astype(np.float32) for layer in layers}
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    draw = Draw(labels={layer: f"RF {100 + i}" for i, layer in enumerate(layers)}, scale=Scale.FRACTION)
    seen = titles(monkeypatch, lambda: R.render_input(tmp_path, "x.jpg", "rf_forward", {"map": "rf"}, maps, image,
                                                     [], cfg, draw=draw))
    assert seen[1:] == [f"{layer} RF {100 + i}" for i, layer in enumerate(layers)]  # every layer's tile
    png = cv2.imread(str(R.png_path(tmp_path, "rf_forward", "x.jpg")))
    assert png.shape[1] <= R.RF_MAX_WIDTH, png.shape  # was 16 tiles = 2594 px
    rows = R.rf_rows([(layer, maps[layer, "map"]) for layer in layers], image, "x.jpg", cfg, draw)
    assert [len(r) for r in rows] == [8, 8, 8, 7]  # 31 tiles in even rows of at most 9
    assert png.shape[:2] == (4 * 162 + 2, 8 * 162 + 2)


def _put_text_calls(monkeypatch, text, size=160):
    calls = []
    real = cv2.putText
    monkeypatch.setattr(R.cv2, "putText", lambda img, t, org, font, scale, *a: calls.append((t, scale)) or real(img, t, org, font, scale, *a))
    R.label(np.zeros((size, size, 3), np.uint8), text, size)
    return calls


def test_long_labels_go_on_two_readable_lines_short_ones_stay(monkeypatch):
    long = "features.10.block.2.fc1 · 1x1 · out 320-639 · in 0-319"
    calls = _put_text_calls(monkeypatch, long)
    assert len(calls) == 2 and all(scale >= LABEL_MIN_SHRINK * 0.4 for _, scale in calls), calls
    assert calls[0][0].endswith(" ·") and " · ".join([calls[0][0][:-2], calls[1][0]]) == long
    assert [t for t, _ in _put_text_calls(monkeypatch, "a · b\nc")] == ["a · b", "c"]
    calls = _put_text_calls(monkeypatch, "blocks.5.2.conv_pwl RF 435")  # an rf label: one line, full size
    assert calls == [("blocks.5.2.conv_pwl RF 435", 0.4)]
