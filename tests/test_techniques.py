import numpy as np
import pytest
import torch
from torch import nn

from pipeline.hooks import capture, hook_count
from pipeline.models import Preprocess
from pipeline.targets import TargetSpec
from pipeline.techniques import REGISTRY, get_technique, register
from tests.tinymodels import tiny_net

PRED = TargetSpec.parse("pred")


def make(name, **options):
    return get_technique(name)(**options)


# -- registry ---------------------------------------------------------------------------------
def test_registry_rejects_duplicates_and_lists_known_names():
    with pytest.raises(ValueError, match="already registered"):
        register("gradcam")(type("Again", (), {}))
    with pytest.raises(KeyError) as err:
        get_technique("gradcamm")
    assert "activations" in str(err.value) and "gradcam" in str(err.value) and "saliency" in str(err.value)


# -- every registered technique leaves the model as it found it ---------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


WEIGHTS_ONLY = {"kernels"}  # data-free techniques that read Conv2d weights and never run the model


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("raising", [False, True])
def test_no_hooks_left_and_model_unchanged(name, raising):
    attention = get_technique(name).attention  # reads attention weights: a tiny ViT instead of the CNN
    if attention:
        from tests.tinyvit import tiny_vit

        model = tiny_vit()
        for block in model.blocks:
            block.attn.fused_attn = True  # switched off for the pass, restored after
    else:
        model = tiny_net()
    for p in model.parameters():
        p.requires_grad_(True)  # a user model that is not frozen: still no parameter gradient
    before = _state(model)
    model.boom.armed = raising
    x = torch.rand(2, 3, 16, 16)
    technique = make(name)
    if not technique.uses_data:  # data-free (filter / class visualization): generate(), small options
        small = dict(steps=2, channels="0-1", classes="0,1", size=16)
        fields = technique.Options.__dataclass_fields__
        technique = make(name, **{k: v for k, v in small.items() if k in fields})
        # the last chosen layer is the Boom itself: a forward that stops after its layers still meets it
        layers = ["relu1", "boom"] if technique.uses_layers else []
        layers = ["conv1", "conv2"] if name in WEIGHTS_ONLY else layers
        call = lambda: technique.generate(model, layers, device=torch.device("cpu"),
                                          generator=torch.Generator().manual_seed(0), max_batch=8, class_names=None,
                                          preprocess=Preprocess(16, 16, "area", (0.5,) * 3, (0.5,) * 3))
        if raising and name in WEIGHTS_ONLY:
            assert call()  # never runs the model, so the armed Boom cannot fire
        elif raising:
            with pytest.raises(RuntimeError, match="boom"):
                call()
        else:
            assert call()
    elif raising:  # receptive-field techniques meet the Boom while tracing: a ValueError naming it
        with pytest.raises((RuntimeError, ValueError), match="boom"):
            technique.attribute(model, x, ["relu1", "conv2"], TargetSpec.parse("topk:2"))
    else:
        result = technique.attribute(model, x, ["relu1", "conv2"], TargetSpec.parse("topk:2"))
        assert result.targets.shape == (2, 2) and result.maps
    assert hook_count(model) == 0
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    if attention:
        assert all(block.attn.fused_attn for block in model.blocks)
        with pytest.raises(ValueError, match="attention"):  # and a CNN is refused before any work
            technique.check_model(tiny_net(), [])
    else:
        assert model.relu1.inplace and model.relu2.inplace


def test_attribute_refuses_training_mode():
    model = tiny_net().train()
    with pytest.raises(ValueError, match="eval"):
        make("saliency").attribute(model, torch.rand(1, 3, 8, 8), [], PRED)


# -- capture and inplace ReLUs ----------------------------------------------------------------
def test_capture_keeps_values_before_inplace_relu():
    model = tiny_net()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected_bn = model.bn1(model.conv1(x))
        with capture(model, ["bn1", "relu1"]) as acts:
            model(x)
    assert hook_count(model) == 0
    assert (acts["bn1"] < 0).any()  # not overwritten by the inplace ReLU that follows
    torch.testing.assert_close(acts["bn1"], expected_bn)
    torch.testing.assert_close(acts["relu1"], expected_bn.clamp_min(0))


def test_capture_removes_hooks_when_the_model_raises():
    model = tiny_net()
    model.boom.armed = True
    with pytest.raises(RuntimeError):
        with capture(model, ["conv1", "boom"]):
            model(torch.rand(1, 3, 8, 8))
    assert hook_count(model) == 0


# -- activations ------------------------------------------------------------------------------
def test_activations_maps_means_and_topk():
    model = tiny_net()
    x = torch.rand(3, 3, 16, 16)
    result = make("activations", topk=4).attribute(model, x, ["relu2", "fc"], PRED)
    with torch.no_grad():
        feat = model.relu2(model.conv2(model.relu1(model.bn1(model.conv1(x))))).clone()
        logits = model(x)
    torch.testing.assert_close(result.maps["relu2", "maps"], feat)
    torch.testing.assert_close(result.maps["relu2", "mean"], feat.mean((2, 3)))
    assert torch.equal(result.maps["relu2", "topk"], feat.mean((2, 3)).topk(4, 1).indices)
    torch.testing.assert_close(result.maps["fc", "mean"], logits)  # [N, C] layers work too
    assert torch.equal(result.targets[:, 0], logits.argmax(1))


# -- saliency against a gradient worked out by hand ---------------------------------------------
class HandNet(nn.Module):
    """logit_c = sum_p V[c, p] * relu(a . x_p + b) + d_c over the pixels p of a 3x4x4 input."""

    def __init__(self, a, b, V, d):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, V.shape[0])
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(a).view(1, 3, 1, 1))
            self.conv.bias.fill_(b)
            self.fc.weight.copy_(torch.tensor(V))
            self.fc.bias.copy_(torch.tensor(d))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_saliency_equals_hand_computed_gradient():
    rng = np.random.default_rng(3)
    a, b = np.array([0.5, -1.0, 2.0], np.float32), 0.1
    V, d = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    model = HandNet(a, b, V, d).eval()
    result = make("saliency").attribute(model, torch.tensor(x), [], TargetSpec.parse("2"))
    # d logit_2 / d x[c, p] = V[2, p] * a[c] * [a . x_p + b > 0]
    pre = np.einsum("c,nchw->nhw", a, x) + b
    expected = V[2].reshape(1, 1, 4, 4) * a.reshape(1, 3, 1, 1) * (pre > 0)[:, None]
    np.testing.assert_allclose(result.maps["input", "grad"][:, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.maps["input", "maxabs"][:, 0].numpy(), np.abs(expected).max(1), rtol=1e-5)
    assert result.targets.tolist() == [[2], [2]]


# -- Grad-CAM ---------------------------------------------------------------------------------
class RegionNet(nn.Module):
    """Class 0's score depends on the input inside one box only (the rest is masked out).

    `mask` [1, 1, H, W] (default: rows 8..15, cols 20..27 of a 32x32 input), or [1, 1, T, H, W]
    for a video CNN whose convs do not mix frames."""

    def __init__(self, mask=None):
        super().__init__()
        if mask is None:
            mask = torch.zeros(1, 1, 32, 32)
            mask[..., 8:16, 20:28] = 1
        self.register_buffer("mask", mask)
        if mask.dim() == 4:
            conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False)  # noqa: E731
        else:
            conv = lambda i, o: nn.Conv3d(i, o, (1, 3, 3), padding=(0, 1, 1), bias=False)  # noqa: E731
        self.conv1 = conv(3, 6)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(6, 8)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8, 2)
        torch.manual_seed(0)
        with torch.no_grad():
            self.conv1.weight.uniform_(0, 0.2)
            self.conv2.weight.uniform_(-0.05, 0.2)
            self.fc.weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x * self.mask))))
        return self.fc(x.flatten(2).mean(2))


def region_mass(technique) -> dict:
    """{layer: fraction of the class-0 map's mass inside RegionNet's box} for relu1 and relu2."""
    x = torch.rand(3, 3, 32, 32)
    cams = technique.attribute(RegionNet().eval(), x, ["relu1", "relu2"], TargetSpec.parse("0")).maps
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8 - 2:16 + 2, 20 - 2:28 + 2] = True  # the box, grown by the two 3x3 convs' reach
    fractions = {}
    for layer in ("relu1", "relu2"):
        cam = cams[layer, "cam"][:, 0]  # [N, 32, 32]
        assert cam.sum() > 0, layer
        fractions[layer] = float(cam[:, inside].sum() / cam.sum())
    return fractions


def test_gradcam_puts_its_mass_in_the_region_that_drives_the_class():
    for layer, fraction in region_mass(make("gradcam")).items():
        assert fraction > 0.99, (layer, fraction)


def test_gradcam_many_layers_in_one_pass_equal_one_at_a_time():
    model = tiny_net()
    x = torch.rand(4, 3, 16, 16)
    together = make("gradcam").attribute(model, x, ["relu1", "conv2", "relu2"], PRED).maps
    for layer in ("relu1", "conv2", "relu2"):
        alone = make("gradcam").attribute(model, x, [layer], PRED).maps
        torch.testing.assert_close(together[layer, "cam"], alone[layer, "cam"])


def test_gradcam_matches_the_formula():
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    cam = make("gradcam", relu=False).attribute(model, x, ["relu2"], TargetSpec.parse("3")).maps["relu2", "cam"]
    with torch.enable_grad():
        feat = model.relu2(model.conv2(model.relu1(model.bn1(model.conv1(x))))).detach().requires_grad_()
        score = model.fc(model.pool(feat).flatten(1))[:, 3].sum()
        (grad,) = torch.autograd.grad(score, feat)
    expected = (grad.mean((2, 3), keepdim=True) * feat).sum(1)
    torch.testing.assert_close(cam[:, 0], expected.detach())


class CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        n = self.net
        x = CountBackward.apply(n.relu1(n.bn1(n.conv1(x))))  # below the chosen layer
        return n.fc(n.pool(n.relu2(n.conv2(x))).flatten(1))


def test_gradcam_backward_stops_at_the_shallowest_layer():
    model = Counted().eval()
    x = torch.rand(2, 3, 16, 16)
    CountBackward.calls = 0
    make("gradcam").attribute(model, x, ["net.conv2", "net.relu2"], TargetSpec.parse("topk:2"))
    assert CountBackward.calls == 0
    make("saliency").attribute(model, x, [], PRED)
    assert CountBackward.calls == 1  # the counter does count when the backward passes through


def test_gradcam_rejects_a_layer_without_a_feature_map():
    with pytest.raises(ValueError, match="fc"):
        make("gradcam").check_layers({"fc": (1, 10)})


def test_topk_targets_give_one_map_per_target():
    model = tiny_net()
    x = torch.rand(2, 3, 16, 16)
    result = make("gradcam").attribute(model, x, ["relu2"], TargetSpec.parse("topk:3"))
    assert result.maps["relu2", "cam"].shape == (2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(result.targets, model(x).topk(3, 1).indices)
    k1 = make("gradcam").attribute(model, x, ["relu2"], TargetSpec("index", int(result.targets[0, 1])))
    torch.testing.assert_close(k1.maps["relu2", "cam"][0, 0], result.maps["relu2", "cam"][0, 1])


def test_target_by_class_name_and_close_names_on_a_miss():
    names = ["tabby", "tiger cat", "Egyptian cat", "espresso"]
    assert TargetSpec.parse("Egyptian cat", names) == TargetSpec("index", 2)
    assert TargetSpec.parse("egyptian CAT", names) == TargetSpec("index", 2)
    with pytest.raises(ValueError) as err:
        TargetSpec.parse("egyptan cat", names)
    assert "'Egyptian cat'" in str(err.value)
    with pytest.raises(ValueError, match="no class names"):
        TargetSpec.parse("cat", None)


def test_capture_can_stop_the_forward_after_the_last_layer():
    from pipeline.hooks import forward

    model = tiny_net()
    model.boom.armed = True  # after relu2: reached only if the pass is not stopped
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad(), capture(model, ["relu1", "conv2"], stop=True) as acts:
        assert forward(model, x) is None
        assert forward(model, x) is None  # and again: the stop resets per pass
    assert set(acts) == {"relu1", "conv2"} and hook_count(model) == 0
    model.boom.armed = False
    with torch.no_grad():
        torch.testing.assert_close(acts["conv2"], model.conv2(model.relu1(model.bn1(model.conv1(x)))))
