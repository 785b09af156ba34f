"""gradxinput, guided_backprop, deconvnet and guided_gradcam against hand-written maths."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch import nn

from pipeline.hooks import hook_count, relu_backward_rule
from pipeline.targets import TargetSpec
from pipeline.techniques import INPUT, Pass, get_technique
from tests.tinymodels import tiny_net

TOP2 = TargetSpec.parse("topk:2")


def run(name, model, x, layers=(), target=TOP2, **options):
    return get_technique(name)(**options).attribute(model, x, list(layers), target).maps


# -- the ReLU rules against a backward pass written out by hand ---------------------------------
class Rect(nn.Module):
    """A rectifier written in one of the ways a model may call it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.relu = nn.ReLU(inplace=True) if how == "module" else nn.ReLU6(inplace=True) if how == "relu6" else None

    def forward(self, x):
        if self.relu is not None:
            return self.relu(x)
        if self.how == "F.relu":
            return F.relu(x)
        if self.how == "torch.relu_":
            torch.relu_(x)  # result ignored: the inplace change itself must carry the rule
            return x
        return x.relu()


class TwoLayer(nn.Module):
    """logit = V . rect(W2 rect(W1 x + b1) + b2).flatten() + d, 1x1 convs on a 3x4x4 input."""

    def __init__(self, how, rng):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 5, 1), Rect(how)
        self.conv2, self.act2 = nn.Conv2d(5, 4, 1), Rect(how)
        self.fc = nn.Linear(4 * 16, 3)
        scale = 4.0 if how == "relu6" else 1.0  # pre-activations beyond 6 as well
        with torch.no_grad():
            for m in (self.conv1, self.conv2, self.fc):
                m.weight.copy_(torch.tensor(rng.normal(size=m.weight.shape) * scale, dtype=torch.float32))
                m.bias.copy_(torch.tensor(rng.normal(size=m.bias.shape), dtype=torch.float32))

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).flatten(1))


def hand_rule_grad(model, x, cls, rule, upper):
    """d logit_cls / dx with the ReLU rule, by numpy; x [N, 3, 4, 4] -> [N, 3, 4, 4]."""
    W1, b1 = model.conv1.weight.detach().numpy()[:, :, 0, 0], model.conv1.bias.detach().numpy()
    W2, b2 = model.conv2.weight.detach().numpy()[:, :, 0, 0], model.conv2.bias.detach().numpy()
    V = model.fc.weight.detach().numpy()[cls].reshape(4, 4, 4)  # [channel, h, w]
    pre1 = np.einsum("mc,nchw->nmhw", W1, x) + b1[:, None, None]
    pre2 = np.einsum("om,nmhw->nohw", W2, np.clip(pre1, 0, upper)) + b2[:, None, None]

    def back(g, pre):
        if rule == "deconvnet":
            return np.maximum(g, 0)
        return g * (pre > 0) * (pre < (upper or np.inf)) * (g > 0)

    g2 = back(np.broadcast_to(V, pre2.shape), pre2)
    g1 = back(np.einsum("om,nohw->nmhw", W2, g2), pre1)
    return np.einsum("mc,nmhw->nchw", W1, g1)


@pytest.mark.parametrize("how", ["module", "relu6", "F.relu", "torch.relu_", "x.relu()"])
@pytest.mark.parametrize("rule,name", [("guided", "guided_backprop"), ("deconvnet", "deconvnet")])
def test_rules_equal_the_hand_written_backward(how, rule, name):
    rng = np.random.default_rng(5)
    model = TwoLayer(how, rng).eval()
    x = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    maps = run(name, model, torch.tensor(x), target=TargetSpec.parse("1"))
    expected = hand_rule_grad(model, x, 1, rule, 6.0 if how == "relu6" else None)
    np.testing.assert_allclose(maps[INPUT, "map"][:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)
    plain = run("saliency", model, torch.tensor(x), target=TargetSpec.parse("1"))[INPUT, "grad"]
    assert not torch.allclose(plain, maps[INPUT, "map"])  # the rule did change the backward


class ChangedInPlace(TwoLayer):
    """TwoLayer whose first rectifier's output is then changed in place (by 1.0: the same maths,
    a new version of the tensor), so its output can no longer give the mask in the backward."""

    def forward(self, x):
        h = self.act1(self.conv1(x))
        h.mul_(1.0)
        return self.fc(self.act2(self.conv2(h)).flatten(1))


@pytest.mark.parametrize("how", ["module", "relu6"])
def test_guided_keeps_masks_where_a_rectifier_output_is_changed_in_place(how):
    rng = np.random.default_rng(5)
    model = ChangedInPlace(how, rng).eval()
    x = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
    xt = torch.tensor(x).requires_grad_(True)
    with torch.enable_grad(), relu_backward_rule(model, "guided") as routed:
        logit = model(xt)[:, 1].sum()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(logit, xt)  # the fast path reads the (changed) output
    assert routed.calls == 2
    maps = run("guided_backprop", model, torch.tensor(x), target=TargetSpec.parse("1"))  # retried, masks kept
    expected = hand_rule_grad(model, x, 1, "guided", 6.0 if how == "relu6" else None)
    np.testing.assert_allclose(maps[INPUT, "map"][:, 0].numpy(), expected, rtol=1e-4, atol=1e-5)


# -- gradient x input ---------------------------------------------------------------------------
def test_gradxinput_equals_saliency_times_input():
    model, x = tiny_net(), torch.rand(2, 3, 16, 16)
    grad = run("saliency", model, x)[INPUT, "grad"]  # [N, K, C, H, W]
    maps = run("gradxinput", model, x)
    torch.testing.assert_close(maps[INPUT, "map"], grad * x[:, None])
    torch.testing.assert_close(maps[INPUT, "sum"], (grad * x[:, None]).sum(2))


class CountForward(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_one_forward_per_pass_shared_between_techniques():
    model, x = CountForward(tiny_net()).eval(), torch.rand(2, 3, 16, 16)
    run("guided_backprop", model, x)
    assert model.calls == 1  # the targets come off the guided forward itself
    model.calls = 0
    names = ["saliency", "gradxinput", "gradcam", "guided_backprop", "guided_gradcam", "deconvnet"]
    techniques = [get_technique(n)() for n in names]
    shared = Pass(model, x, ["net.relu1"], TOP2, needs=frozenset().union(*(t.needs for t in techniques)))
    for t in techniques:
        t.attribute(model, x, ["net.relu1"], TOP2, shared=shared)
    assert model.calls == 4  # input gradient, layer gradients, guided, deconvnet: one forward each


# -- inplace ReLUs, raising models, leftovers ---------------------------------------------------
def test_inplace_relus_give_the_same_map_and_are_left_as_found():
    model, x = tiny_net(), torch.rand(2, 3, 16, 16)
    outplace = copy.deepcopy(model)
    outplace.relu1.inplace = outplace.relu2.inplace = False
    for name in ("guided_backprop", "deconvnet"):
        torch.testing.assert_close(run(name, model, x)[INPUT, "map"], run(name, outplace, x)[INPUT, "map"])
    model.boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        run("guided_backprop", model, x)
    assert hook_count(model) == 0 and model.relu1.inplace and model.relu2.inplace
    assert torch._C._len_torch_function_stack() == 0  # the rule is off again
    model.boom.armed = False
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 3].sum(), xg)  # plain autograd is plain again
    torch.testing.assert_close(run("saliency", model, x, target=TargetSpec.parse("3"))[INPUT, "grad"][:, 0], grad)


class BNAct(nn.Module):
    """BatchNorm followed by its own ReLU6(inplace) submodule, like timm's BatchNormAct2d."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(c), nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.act(self.bn(x))


def test_relu6_inside_a_norm_act_block_is_routed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), BNAct(6), nn.Conv2d(6, 8, 3, padding=1), BNAct(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.rand(2, 3, 8, 8) * 20
    with torch.enable_grad(), relu_backward_rule(model, "guided") as routed:
        model(x)
    assert routed.calls == 2 and model[1].act.inplace
    guided = run("guided_backprop", model, x)[INPUT, "map"]
    assert not torch.allclose(guided, run("saliency", model, x)[INPUT, "grad"])


# -- models the rules cannot reach: a clear error, never the plain gradient ---------------------
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_model_without_relus_or_scripted_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match="no ReLU"):
        run("guided_backprop", model, torch.rand(1, 3, 8, 8))
    scripted = torch.jit.script(tiny_net())
    with pytest.raises(ValueError, match="TorchScript"):
        run("deconvnet", scripted, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown ReLU backward rule"):
        with relu_backward_rule(model, "guidedd"):
            pass


# -- Guided Grad-CAM ----------------------------------------------------------------------------
def test_guided_gradcam_equals_guided_backprop_times_upsampled_gradcam():
    model, x = tiny_net(), torch.rand(2, 3, 16, 16)
    layers = ["relu1", "conv2"]
    maps = run("guided_gradcam", model, x, layers)
    guided = run("guided_backprop", model, x)[INPUT, "map"]  # [N, K, 3, 16, 16]
    cams = run("gradcam", model, x, layers)
    for layer in layers:
        cam = cams[layer, "cam"]  # [N, K, h, w]
        up = F.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)
        assert maps[layer, "map"].shape == (2, 2, 3, 16, 16)
        torch.testing.assert_close(maps[layer, "map"], guided * up[:, :, None])
    assert cams["conv2", "cam"].shape[-1] == 8  # the upsampling did happen


# -- configs --------------------------------------------------------------------------------------
def test_yaml_configs_compose(make_cfg):
    names = ["gradxinput", "guided_backprop", "deconvnet", "guided_gradcam"]
    cfg = make_cfg(f"technique=[{','.join(names)}]", "technique.guided_gradcam.relu=false")
    assert list(cfg.technique) == names
    built = {n: get_technique(n)(**OmegaConf.to_container(cfg.technique[n])) for n in names}
    assert built["guided_gradcam"].options.relu is False
    with pytest.raises(ConfigCompositionException, match="relux"):
        make_cfg("technique=[guided_gradcam]", "technique.guided_gradcam.relux=false")
