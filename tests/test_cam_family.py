"""The CAM family beyond Grad-CAM: Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM, Ablation-CAM, Eigen-CAM."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.contracts import Kind
from pipeline.hooks import hook_count
from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, get_technique
from tests.test_techniques import RegionNet, region_mass
from tests.tinymodels import CountForwards, tiny_net

FAMILY = ["gradcampp", "xgradcam", "layercam", "scorecam", "ablationcam", "eigencam"]
GRADIENT_BASED = ["gradcam", "gradcampp", "xgradcam", "layercam"]


def make(name, **options):
    return get_technique(name)(**options)


# -- localization -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY)
def test_mass_lies_in_the_region_that_drives_the_class(name):
    for layer, fraction in region_mass(make(name)).items():
        assert fraction > 0.9, (layer, fraction)


def RegionNet3D() -> nn.Module:
    """A video CNN whose class 0 depends on one box of frame 2 only; its convs do not mix frames."""
    mask = torch.zeros(1, 1, 4, 16, 16)
    mask[..., 2, 4:10, 6:12] = 1
    return RegionNet(mask)


@pytest.mark.parametrize("name", FAMILY)
def test_video_cnn_gives_per_frame_maps_on_the_frame_that_drives_the_class(name):
    model = RegionNet3D().eval()
    x = torch.rand(2, 3, 4, 16, 16)  # [N, C, T, H, W]
    cams = make(name).attribute(model, x, ["relu1", "relu2"], TargetSpec.parse("topk:2")).maps
    inside = torch.zeros(4, 16, 16, dtype=torch.bool)
    inside[2, 4 - 2:10 + 2, 6 - 2:12 + 2] = True
    for layer in ("relu1", "relu2"):
        cam = cams[layer, "cam"]
        assert cam.shape == (2, 2, 4, 16, 16)
        target0 = cam[:, 0]  # [N, T, H, W]: the first target (class 0 for these inputs)
        assert target0.sum() > 0
        assert target0[:, inside].sum() / target0.sum() > 0.9, layer


# -- each method against its formula, from acts and grads computed here ---------------------------
def tiny_acts_grads(model, x, cls):
    """Activations and d(logit cls)/d(activations) of relu1 [N, 8, 16, 16] and relu2 [N, 16, 8, 8]."""
    with torch.enable_grad():
        a1 = model.relu1(model.bn1(model.conv1(x))).detach().requires_grad_()
        a2 = F.relu(model.conv2(a1))
        score = model.fc(model.pool(a2).flatten(1))[:, cls].sum()
        g1, g2 = torch.autograd.grad(score, [a1, a2])
    return {"relu1": (a1.detach(), g1), "relu2": (a2.detach(), g2)}


def gradcampp_formula(A, g):
    denom = 2 * g**2 + A.sum((2, 3), keepdim=True) * g**3
    alpha = torch.where(denom != 0, g**2 / denom, torch.zeros_like(g))
    return ((alpha * g.clamp_min(0)).sum((2, 3), keepdim=True) * A).sum(1).clamp_min(0)


FORMULAS = {
    "gradcampp": gradcampp_formula,
    # a dead channel (all zero) gives 0/0: it weighs nothing
    "xgradcam": lambda A, g: (((g * A).sum((2, 3), keepdim=True) / A.sum((2, 3), keepdim=True)).nan_to_num()
                              * A).sum(1).clamp_min(0),
    "layercam": lambda A, g: (g.clamp_min(0) * A).sum(1).clamp_min(0),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_gradient_cams_match_their_formula(name):
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    cams = make(name).attribute(model, x, ["relu1", "relu2"], TargetSpec.parse("3")).maps
    for layer, (A, g) in tiny_acts_grads(model, x, 3).items():
        torch.testing.assert_close(cams[layer, "cam"][:, 0], FORMULAS[name](A, g), rtol=1e-4, atol=1e-6)


def test_gradcampp_alpha_equals_the_papers_from_true_derivatives_of_exp_score():
    """alpha from the 2nd and 3rd derivatives of exp(score) themselves, not from the closed form:
    the exp trick is exact. Row i of a batch moves coordinate i of A by t_i, so the derivatives of
    the summed scores along t are the diagonal derivatives d^n exp(score) / dA_i^n."""
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    cam = make("gradcampp").attribute(model, x, ["relu2"], TargetSpec.parse("3")).maps["relu2", "cam"][:, 0]
    A, _ = tiny_acts_grads(model, x, 3)["relu2"]
    expected = []
    for a in A:  # [C, h, w]
        t = torch.zeros(a.numel(), requires_grad=True)
        with torch.enable_grad():
            moved = (a.flatten() + torch.diag(t)).view(-1, *a.shape)  # [C*h*w, C, h, w]
            exp_score = model.fc(moved.mean((2, 3)))[:, 3].exp()
            S1 = torch.autograd.grad(exp_score.sum(), t, create_graph=True)[0]
            S2 = torch.autograd.grad(S1.sum(), t, create_graph=True)[0]
            S3 = torch.autograd.grad(S2.sum(), t)[0]
        S1, S2, S3 = (d.detach().view(a.shape) for d in (S1, S2, S3))
        alpha = S2 / (2 * S2 + a.sum((1, 2), keepdim=True) * S3)
        grad = S1 / exp_score[0].detach()  # d logit / dA (row 0 is A itself at t = 0)
        w = (alpha.nan_to_num() * grad.clamp_min(0)).sum((1, 2), keepdim=True)
        expected.append((w * a).sum(0).clamp_min(0))
    torch.testing.assert_close(cam, torch.stack(expected), rtol=1e-4, atol=1e-6)


def test_scorecam_matches_one_masked_forward_per_channel():
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    result = make("scorecam").attribute(model, x, ["relu1", "relu2"], TargetSpec.parse("topk:2"))
    for layer, (A, _) in tiny_acts_grads(model, x, 0).items():
        for n in range(2):
            for k in range(2):
                cls, scores = int(result.targets[n, k]), []
                for c in range(A.shape[1]):
                    m = F.interpolate(A[n:n + 1, c:c + 1], size=(16, 16), mode="bilinear", align_corners=False)
                    m = (m - m.min()) / (m.max() - m.min()) if m.max() > m.min() else torch.zeros_like(m)
                    with torch.no_grad():
                        scores.append(model(x[n:n + 1] * m)[0, cls])
                w = torch.stack(scores).softmax(0)
                expected = (w[:, None, None] * A[n]).sum(0).clamp_min(0)
                torch.testing.assert_close(result.maps[layer, "cam"][n, k], expected, rtol=1e-4, atol=1e-6)


def test_ablationcam_matches_the_relative_score_drop():
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    cam = make("ablationcam").attribute(model, x, ["relu1"], TargetSpec.parse("3")).maps["relu1", "cam"][:, 0]
    with torch.no_grad():
        A = model.relu1(model.bn1(model.conv1(x))).clone()
        head = lambda a: model.fc(model.pool(F.relu(model.conv2(a))).flatten(1))[:, 3]
        y = head(A)
        drops = []
        for c in range(A.shape[1]):
            ablated = A.clone()
            ablated[:, c] = 0
            drops.append((y - head(ablated)) / y)
    w = torch.stack(drops, 1)  # [N, C]
    torch.testing.assert_close(cam, (w[..., None, None] * A).sum(1).clamp_min(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_is_the_first_principal_component_for_every_target(center):
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    cam = make("eigencam", relu=False, center=center).attribute(
        model, x, ["relu2"], TargetSpec.parse("topk:3")).maps["relu2", "cam"]
    A = tiny_acts_grads(model, x, 0)["relu2"][0].numpy().astype(np.float64)
    for n in range(2):
        X = A[n].reshape(A.shape[1], -1).T  # [positions, channels]
        if center:
            X = X - X.mean(0)
        v = np.linalg.svd(X)[2][0]
        v = -v if v.sum() < 0 else v
        for k in range(3):
            np.testing.assert_allclose(cam[n, k].numpy(), (X @ v).reshape(8, 8), rtol=1e-3, atol=1e-5)


# -- Score-CAM batching ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["scorecam", "ablationcam"])
def test_masked_forwards_are_batched_up_to_max_batch_with_the_same_maps(name):
    x = torch.rand(2, 3, 16, 16)
    target = TargetSpec.parse("topk:2")
    maps = {}
    for max_batch, top in [(1, None), (5, None), (64, None), (5, 3)]:
        model = CountForwards(tiny_net()).eval()
        options = {"tail": False} if name == "ablationcam" else {}  # whole forwards (the tail: below)
        result = make(name, top_channels=top, **options).attribute(model, x, ["net.relu1"], target, max_batch=max_batch)
        rows = 2 * (top or 8)  # N * channels: both targets read off each row's logits
        assert len(model.sizes) == 1 + math.ceil(rows / max_batch)  # the activations' forward, then rows
        assert sum(model.sizes[1:]) == rows and max(model.sizes[1:]) <= max_batch
        assert hook_count(model) == 0
        maps[max_batch, top] = result.maps["net.relu1", "cam"]
    torch.testing.assert_close(maps[1, None], maps[64, None])
    torch.testing.assert_close(maps[5, None], maps[64, None])
    assert not torch.allclose(maps[5, 3], maps[64, None])  # fewer channels, another map


class Residual(nn.Module):
    """conv -> [block: conv, bn, relu (the layer), conv, + block input] -> pool -> fc; the residual
    from before the layer is reused after it."""

    def __init__(self, mix: str = "add"):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.relu, self.out = nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(12 if mix == "cat" else 6, 4)
        self.mix = mix
        nn.init.uniform_(self.bn.running_mean, -0.1, 0.1)

    def forward(self, x):
        h = self.stem(x)
        y = self.out(self.relu(self.bn(self.conv(h))))
        if self.mix == "cat":  # a concatenation with the block input: a grown batch cannot broadcast
            y = torch.cat([y, h], 1)
        elif self.mix == "batch":  # subtracts the batch mean: a grown batch runs but changes every row
            y = y + h - y.mean(0, keepdim=True)
        else:
            y = y + h
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("engine", ["traced", "hook"])
@pytest.mark.parametrize("mix", ["add", "cat", "batch"])
@pytest.mark.parametrize("max_batch", [1, 3, 64])
def test_ablation_on_the_tail_equals_whole_forwards(mix, max_batch, engine, caplog, monkeypatch):
    """tail=true runs only the network after `relu` on the ablated copies: from the traced graph
    split at the layer (the layers before run once per input), or, for a model torch.fx cannot
    trace, from a hook that grows one input's batch at the layer (they run once per chunk). Where
    the rest cannot take the copies (a concatenation with a tensor from before the layer raises, a
    batch mean gives other logits for the unablated copy) it falls back to whole forwards. Same
    maps every way."""
    import pipeline.techniques.ablationcam as ablation

    if engine == "hook":
        monkeypatch.setattr(ablation, "traced_tail", lambda model, layer: None)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    target = TargetSpec.parse("topk:2")
    maps, sizes = {}, {}
    for tail in (True, False):
        model = CountForwards(Residual(mix)).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        grown = []
        handle = model.net.out.register_forward_hook(lambda m, i, o: grown.append(o.shape[0]))
        with caplog.at_level("INFO", logger="pipeline.techniques.ablationcam"):
            result = make("ablationcam", tail=tail).attribute(model, x, ["net.relu"], target, max_batch=max_batch)
        handle.remove()
        maps[tail], sizes[tail] = result.maps["net.relu", "cam"], (model.sizes[1:], grown[1:])
        assert hook_count(model) == 0 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert model.sizes[0] == 3 and max(sizes[tail][1]) <= max_batch  # tracing left no proxy in sizes
    torch.testing.assert_close(maps[True], maps[False], rtol=1e-4, atol=1e-5)  # (y - y_c) / y in float32
    assert float(maps[False].abs().sum()) > 0
    inputs, grown = sizes[True]
    first = min(6, max_batch - 1)  # input 0's first forward: the check copy and `first` channels
    forwards = 1 + math.ceil((6 - first) / max_batch) + 2 * math.ceil(6 / max_batch)
    if mix == "add" or (mix == "cat" and max_batch == 1):  # one copy at a time: a concatenation works too
        clean_runs = 3 if engine == "traced" else 0  # traced: each input once through the whole graph
        assert sum(grown) == 3 * 6 + 1 + clean_runs and len(grown) == forwards + clean_runs
        assert "whole forwards" not in caplog.text
        # traced: the model itself is never called again; hook: once per forward, one input each
        assert inputs == ([] if engine == "traced" else [1] * forwards)
    else:
        assert "whole forwards per ablated copy" in caplog.text
        assert inputs[-1] > 1 or max_batch == 1  # the fallback's whole forwards


@pytest.mark.parametrize("mix", ["add", "batch"])
def test_ablation_tail_fallback_counts_each_row_once(mix):
    """Progress: where the tail gives up (a batch mean changes the unablated copy's logits) the
    whole forwards redo the rows; the rows the tail announced are taken back, not counted twice."""
    from pipeline.progress import Progress

    model = Residual(mix).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    technique = make("ablationcam", tail=True)
    p = Pass(model, x, ["relu"], TargetSpec.parse("pred"), max_batch=4, needs=technique.needs)
    seen = []
    p.progress = Progress(lambda done, total: seen.append((done, total)))
    technique.attribute(model, x, ["relu"], TargetSpec.parse("pred"), max_batch=4, shared=p)
    rows = 2 * 6  # inputs x channels
    assert (p.progress.done, p.progress.total) == (rows, rows)
    assert max(total for _, total in seen) == rows


def test_ablation_hook_is_removed_when_the_model_raises_in_a_masked_forward():
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    p = Pass(model, x, ["relu1"], TargetSpec.parse("pred"), needs=make("ablationcam").needs)
    p.activations()
    model.boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        make("ablationcam").attribute(model, x, ["relu1"], p.target, shared=p)
    assert hook_count(model) == 0


# -- one shared Pass ------------------------------------------------------------------------------
def test_gradient_cams_share_one_forward_and_gradient_free_ones_add_only_their_rows():
    model = CountForwards(tiny_net()).eval()
    x = torch.rand(2, 3, 16, 16)
    layers, target = ["net.relu1", "net.conv2"], TargetSpec.parse("topk:2")
    names = GRADIENT_BASED + ["eigencam", "scorecam"]
    techniques = {name: make(name) for name in names}
    needs = frozenset().union(*(t.needs for t in techniques.values()))
    p = Pass(model, x, layers, target, max_batch=16, needs=needs)
    shared = {}
    for name in GRADIENT_BASED + ["eigencam"]:
        shared[name] = techniques[name].attribute(model, x, layers, target, shared=p).maps
    assert len(model.sizes) == 1  # one forward for every gradient-based CAM (and Eigen-CAM)
    shared["scorecam"] = techniques["scorecam"].attribute(model, x, layers, target, shared=p).maps
    rows = 2 * (8 + 16)  # N * (channels of relu1 + conv2); the K targets share each row
    assert len(model.sizes) == 1 + math.ceil(2 * 8 / 16) + math.ceil(2 * 16 / 16)
    assert sum(model.sizes[1:]) == rows
    for name in names:  # sharing changes nothing
        alone = make(name).attribute(model, x, layers, target).maps
        for key in alone:
            torch.testing.assert_close(shared[name][key], alone[key])


# -- config ---------------------------------------------------------------------------------------
def test_yaml_configs_compose_and_build(make_cfg):
    names = ["gradcam"] + FAMILY
    cfg = make_cfg(f"technique=[{','.join(names)}]", "technique.scorecam.top_channels=16")
    assert list(cfg.technique) == names
    assert cfg.technique.scorecam.top_channels == 16 and cfg.technique.ablationcam.top_channels is None
    assert cfg.technique.gradcampp.relu is True and cfg.technique.eigencam.center is False
    for name in names:
        technique = make(name, **cfg.technique[name])
        assert technique.kinds() == {"cam": Kind.HEATMAP}
    with pytest.raises(ValueError, match="top_channels"):
        make("scorecam", top_channels=0)
