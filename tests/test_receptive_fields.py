"""Receptive fields: SupportGraph geometry, the field table, rf_forward / rf_ratio / rf_backward and erf.

Every expected value here is computed independently of pipeline.rf: field sizes, jumps and centres
by the textbook recurrence written out below (and, for linear nets, by the extent of a real input
gradient), support maps by a small numpy box-filter reference, backward profiles by repeated 1D
convolution of [1/3, 1/3, 1/3] or an explicit loop over the window, ERFs by the same convolutions.
"""
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from pipeline.rf import END, GraphError, Support, SupportGraph
from pipeline.rf.table import field_table
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique

PRED = TargetSpec.parse("pred")


# -- independent references ---------------------------------------------------------------------
def recurrence(path):
    """[(kernel, stride, padding), ...] -> [(size, jump, start), ...] after each layer.

    size_l = size_{l-1} + (k - 1) * jump_{l-1};  jump_l = jump_{l-1} * s;
    start_l = start_{l-1} + ((k - 1) / 2 - p) * jump_{l-1}   (pixel centres at integer coordinates).
    """
    size, jump, start, out = 1.0, 1.0, 0.0, []
    for k, s, p in path:
        size, start, jump = size + (k - 1) * jump, start + ((k - 1) / 2 - p) * jump, jump * s
        out.append((size, jump, start))
    return out


def box1d(v: np.ndarray, k: int, s: int = 1, p: int = 0, axis: int = 0) -> np.ndarray:
    """Average over windows of k along `axis` with stride s and p zeros on both sides (explicit loop)."""
    v = np.moveaxis(np.asarray(v, dtype=np.float64), axis, 0)
    padded = np.concatenate([np.zeros((p,) + v.shape[1:]), v, np.zeros((p,) + v.shape[1:])])
    n_out = (len(padded) - k) // s + 1
    out = np.stack([padded[i * s : i * s + k].sum(0) / k for i in range(n_out)])
    return np.moveaxis(out, 0, axis)


def box2d(m: np.ndarray, k: int, s: int = 1, p: int = 0) -> np.ndarray:
    """A k x k averaging box (zero padding counts as outside) on a 2D map: separable."""
    return box1d(box1d(m, k, s, p, axis=0), k, s, p, axis=1)


def box1d_adjoint(g: np.ndarray, n_in: int, k: int, s: int, p: int) -> np.ndarray:
    """The transpose of box1d: spread each output's weight evenly over the k inputs of its window."""
    out = np.zeros(n_in)
    for o, value in enumerate(g):
        for t in range(k):
            i = o * s + t - p
            if 0 <= i < n_in:
                out[i] += value / k
    return out


def n_fold_box(n: int) -> np.ndarray:
    """The n-fold 1D convolution of [1/3, 1/3, 1/3] (length 2n + 1, sums to 1)."""
    p = np.array([1.0])
    for _ in range(n):
        p = np.convolve(p, np.full(3, 1 / 3))
    return p


def placed(profile: np.ndarray, centre: int, length: int) -> np.ndarray:
    """A symmetric profile centred at `centre` in a zero vector of `length`."""
    out = np.zeros(length)
    half = len(profile) // 2
    out[centre - half : centre + half + 1] = profile
    return out


def grad_extent(net: nn.Module, layer_upto: int, in_hw: int, unit: int):
    """(lo, hi) input rows with a non-zero gradient of unit (unit, unit) of net[:layer_upto + 1]."""
    x = torch.zeros(1, 3, in_hw, in_hw, dtype=torch.float64, requires_grad=True)
    out = net[: layer_upto + 1].double()(x)
    out[0, :, unit, unit].sum().backward()
    rows = torch.nonzero(x.grad.abs().sum((0, 1, 3)) > 0).flatten()
    cols = torch.nonzero(x.grad.abs().sum((0, 1, 2)) > 0).flatten()
    assert rows.tolist() == cols.tolist()
    assert rows.tolist() == list(range(int(rows[0]), int(rows[-1]) + 1))  # no holes
    return int(rows[0]), int(rows[-1])


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# -- small models --------------------------------------------------------------------------------
def head(channels: int, classes: int = 3):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)]


def three_convs(stride_mid: int = 1) -> nn.Sequential:
    """conv 3x3 p1 -> relu -> conv 3x3 p1 (stride_mid) -> relu -> conv 3x3 p1 -> pool -> flatten -> fc:
    modules "0", "2", "4" are the convolutions, "5" the global pool, "6" flatten, "7" the fc."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=stride_mid, padding=1), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), *head(4)).eval()


def linear_ones(spec, channels: int = 4) -> nn.Sequential:
    """Convolutions only (no nonlinearity, no bias), every weight 1.0; spec [(k, s, p), ...]; then a head."""
    layers, c_in = [], 3
    for k, s, p in spec:
        conv = nn.Conv2d(c_in, channels, k, stride=s, padding=p, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        layers.append(conv)
        c_in = channels
    torch.manual_seed(0)
    return nn.Sequential(*layers, *head(channels)).eval()


class ResidualBlock(nn.Module):
    """conv 3x3 (padding 1) branch + identity."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


class ResidualNet(nn.Module):
    """stem 1x1 conv -> ResidualBlock "block" -> ResidualBlock "block2" (stride-2 3x3 + strided 1x1) -> head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = ResidualBlock(4)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.skip = nn.Conv2d(4, 4, 1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(self.stem(x))
        x = torch.relu(self.down(x)) + self.skip(x)
        return self.fc(self.pool(x).flatten(1))


class Join(nn.Module):
    def forward(self, a, b):
        return a + b


class ShiftedAdd(nn.Module):
    """Two 3x3 branches with different centres added ("join"): conv p1 (centred on i) and conv p0
    after padding 2 on the left and top only (centred on i - 1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3)
        self.join = Join()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.join(self.a(x), self.b(nn.functional.pad(x, (2, 0, 2, 0))))
        return self.fc(y.mean((2, 3)))


class Fork(nn.Module):
    """Two branches concatenated along channels: a 1x1 conv (1 channel) and a 3x3 conv (3 channels)."""

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, 1, 1)
        self.b = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class ForkNet(nn.Module):
    """stem 1x1 -> Fork (4 channels: a | b b b) -> both a 1x1 conv "mix" and a 3x3 conv "grouped"
    with 2 groups (channels a, b | b, b) -> pooled, added, fc."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 1)
        self.fork = Fork(4)
        self.mix = nn.Conv2d(4, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        f = self.fork(self.stem(x))
        return self.fc((self.pool(self.mix(f)) + self.pool(self.grouped(f))).flatten(1))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc(mean over space of x))."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        s = torch.sigmoid(self.fc(x.mean((2, 3))))
        return x * s[:, :, None, None]


class SENet(nn.Module):
    """conv 3x3 -> SqueezeExcite "se" -> torchvision's SqueezeExcitation "se2" -> flatten -> fc (no pool)."""

    def __init__(self, hw: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.se = SqueezeExcite(4)
        self.se2 = torchvision.ops.SqueezeExcitation(4, 2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * hw * hw, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.se2(self.se(self.conv(x)))))


class DataDependentGate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace control flow on a tensor's value
            return x
        return -x


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = DataDependentGate()

    def forward(self, x):
        return self.gate(self.conv(x))


class UntraceableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stage = Stage()

    def forward(self, x):
        return self.stage(x)


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


class RollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shifter = Roll()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv2(self.shifter(self.conv(x)))


def technique(name: str, model: nn.Module, layers, hw, **options):
    t = get_technique(name)(**options)
    t.prepare(model, layers, torch.zeros(1, 3, *hw))
    return t


def fields_of(graph: SupportGraph, layer: str):
    """((size, jump, start) for H, (size, jump, start) for W) of a layer."""
    return tuple((f.size, f.jump, f.start) for f in graph.fields()[layer])


# -- 1. a plain stack of convolutions ------------------------------------------------------------
def test_three_conv_stack_fields():
    graph = SupportGraph(three_convs(), torch.zeros(1, 3, 16, 16))
    fields = graph.fields()
    expected = recurrence([(3, 1, 1)] * 3)
    assert [e[0] for e in expected] == [3, 5, 7]  # the hand recurrence itself
    for layer, (size, jump, start) in zip(["0", "2", "4"], expected):
        for f in fields[layer]:  # H and W
            assert (f.size, f.jump, f.start) == (size, jump, start)
    assert (fields["4"][0].size, fields["4"][0].jump) == (7, 1)
    assert fields["1"] == fields["0"] and fields["3"] == fields["2"]  # ReLU passes


def test_stride_two_in_the_middle():
    path = [(3, 1, 1), (3, 2, 1), (3, 1, 1)]
    expected = recurrence(path)
    assert [(s, j) for s, j, _ in expected] == [(3, 1), (5, 2), (9, 2)]  # 3; 3+2*1; 5+2*2 with jump 1*2
    graph = SupportGraph(three_convs(stride_mid=2), torch.zeros(1, 3, 16, 16))
    for layer, e in zip(["0", "2", "4"], expected):
        assert fields_of(graph, layer) == (e, e)


def test_fields_match_gradient_extent_with_offsets():
    """Unusual padding (0 and a 4-wide stride-2 window): size, jump and centre from a real gradient."""
    path = [(3, 1, 0), (4, 2, 1), (3, 1, 0)]
    net = linear_ones(path)
    graph = SupportGraph(net, torch.zeros(1, 3, 24, 24))
    expected = recurrence(path)
    assert expected == [(3, 1, 1), (6, 2, 1.5), (10, 2, 3.5)]
    for index, (size, jump, start) in enumerate(expected):
        assert fields_of(graph, str(index)) == ((size, jump, start),) * 2
        # brute force: units u and u + 1 of that layer, on a linear all-ones net (no cancellation)
        u = 2
        lo, hi = grad_extent(net, index, 24, u)
        lo1, hi1 = grad_extent(net, index, 24, u + 1)
        assert hi - lo + 1 == size
        assert (lo + hi) / 2 == start + u * jump
        assert lo1 - lo == jump and hi1 - hi == jump


def test_dilated_conv_field_and_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2, padding=2), *head(4)).eval()
    t = technique("rf_forward", model, ["0"], (9, 9), crop=[4, 4, 1, 1])
    assert fields_of(t.graph, "0") == ((5, 1, 0),) * 2  # effective kernel 2 * (3 - 1) + 1 = 5
    m = np_(t.compute("cpu")["0"])[0]
    expected = np.zeros((9, 9))
    expected[np.ix_([2, 4, 6], [2, 4, 6])] = 1 / 9  # the pixel is seen by the units 0 and +-2 away
    np.testing.assert_allclose(m, expected, atol=1e-7)


# -- 2. torchvision resnet18 and vgg16 -----------------------------------------------------------
def resnet18_path():
    """(layer name or None, (k, s, p)) along the longest path of resnet18 (the 3x3 convolutions;
    the 1x1 downsample shortcuts lie inside it)."""
    path = [("conv1", (7, 2, 3)), ("maxpool", (3, 2, 1))]
    for stage in range(1, 5):
        first_stride = 1 if stage == 1 else 2
        convs = [(3, first_stride, 1)] + [(3, 1, 1)] * 3  # two BasicBlocks of two 3x3 convs
        path += [(None, c) for c in convs[:-1]] + [(f"layer{stage}", convs[-1])]
    return path


def vgg16_path():
    """(features.<i>, (k, s, p)) for vgg16's features: 3x3 p1 convs (each followed by a ReLU) and 2x2 pools."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    path, i = [], 0
    for v in cfg:
        if v == "M":
            path.append((f"features.{i}", (2, 2, 0)))
            i += 1
        else:
            path.append((f"features.{i}", (3, 1, 1)))
            i += 2
    return path


def test_resnet18_fields_and_table():
    model = torchvision.models.resnet18(weights=None).eval()
    graph = SupportGraph(model, torch.zeros(1, 3, 224, 224))
    names, steps = zip(*resnet18_path())
    expected = {n: e for n, e in zip(names, recurrence(steps)) if n}
    literature = {"conv1": (7, 2), "maxpool": (11, 4), "layer1": (43, 4), "layer2": (99, 8),
                  "layer3": (211, 16), "layer4": (435, 32)}
    fields = graph.fields()
    for layer, (size, jump) in literature.items():
        assert expected[layer][:2] == (size, jump)  # the hand recurrence agrees with the literature
        assert fields_of(graph, layer) == (expected[layer],) * 2
        assert expected[layer][2] == 0  # every window is centred by its padding
    assert fields["layer4.1.bn2"] == fields["layer4.1.conv2"]
    assert fields["avgpool"] is None and fields["fc"] is None
    rows = {r.layer: r for r in field_table(graph)}
    assert rows["layer4"].size == (435, 435) and rows["layer4"].jump == (32, 32)
    assert rows["layer4"].centre == (0, 0) and rows["layer2"].type == "Sequential"
    assert "fc" not in rows and "avgpool" not in rows


def test_vgg16_fields_and_centres():
    # vgg16's classifier holds 120M parameters whose random init takes seconds: build it on the meta
    # device; the graph records shapes only and the support maps are computed on CPU.
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None).eval()
    graph = SupportGraph(model, torch.zeros(1, 3, 224, 224, device="meta"))
    path = vgg16_path()
    names, steps = zip(*path)
    expected = dict(zip(names, recurrence(steps)))
    # the recurrence by hand: pool1 (features.4) 6/2, pool3 (features.16) 44/8, conv5_3 196/16, pool5 212/32
    assert expected["features.4"] == (6, 2, 0.5)
    assert expected["features.16"] == (44, 8, 3.5)
    assert expected["features.28"][:2] == (196, 16)  # conv5_3 (literature: 196)
    assert expected["features.30"] == (212, 32, 15.5)  # pool5 (literature: 212)
    fields = graph.fields()
    for layer in ["features.0", "features.4", "features.9", "features.16", "features.28", "features.30"]:
        assert fields_of(graph, layer) == (expected[layer],) * 2, layer
    assert fields["features.29"] == fields["features.28"]  # ReLU
    assert fields["avgpool"] == fields["features.30"]  # adaptive pool 7 -> 7 keeps the geometry
    assert fields["classifier"] is None


# -- 3. rf_forward -------------------------------------------------------------------------------
def test_rf_forward_whole_image_is_one_inside_and_less_at_corners():
    H = 16
    model = three_convs()
    t = technique("rf_forward", model, ["4"], (H, H), crop=[0, 0, H, H])
    assert t.drawn == ["0", "2", "4"]
    maps = t.compute("cpu")
    ref = np.ones((H, H))
    for layer, (size, jump, start) in zip(t.drawn, recurrence([(3, 1, 1)] * 3)):
        ref = box2d(ref, 3, 1, 1)
        m = np_(maps[layer])
        assert m.shape == (1, H, H)
        np.testing.assert_allclose(m[0], ref, atol=1e-6)
        half = (size - 1) / 2
        inside = [i for i in range(H) if start + i * jump - half >= 0 and start + i * jump + half <= H - 1]
        block = m[0][np.ix_(inside, inside)]
        np.testing.assert_allclose(block, 1.0, atol=1e-6)
        outside = np.ones((H, H), bool)
        outside[np.ix_(inside, inside)] = False
        assert (m[0][outside] < 1 - 1e-4).all()
        assert (m[0][[0, 0, -1, -1], [0, -1, 0, -1]] < 1).all()
    # by hand: conv1 corner sees 4 of 9 pixels; conv2 corner averages 4/9, 6/9, 6/9, 1 and five zeros
    np.testing.assert_allclose(np_(maps["0"])[0, 0, 0], 4 / 9, atol=1e-6)
    np.testing.assert_allclose(np_(maps["2"])[0, 0, 0], (4 + 6 + 6 + 9) / 81, atol=1e-6)


def test_rf_forward_attribute_repeats_per_input_and_crop():
    model = three_convs()
    t = get_technique("rf_forward")(crop=[[0, 0, 8, 16], [3, 5, 2, 4]])
    x = torch.randn(2, 3, 16, 16)
    res = t.attribute(model, x, ["2"], PRED)
    assert set(res.maps) == {("0", "map"), ("2", "map")}
    m = res.maps["2", "map"]
    assert m.shape == (2, 2, 16, 16)
    assert torch.equal(m[0], m[1])  # the maps do not depend on the pixels
    mask = np.zeros((16, 16))
    mask[5:9, 3:5] = 1
    np.testing.assert_allclose(np_(m[0, 1]), box2d(box2d(mask, 3, 1, 1), 3, 1, 1), atol=1e-6)


def test_rf_forward_stride_and_crop_match_reference():
    H = 17
    model = three_convs(stride_mid=2)
    t = technique("rf_forward", model, ["4"], (H, H), crop=[2, 4, 7, 5])
    maps = t.compute("cpu")
    mask = np.zeros((H, H))
    mask[4:9, 2:9] = 1
    ref0 = box2d(mask, 3, 1, 1)
    ref2 = box2d(ref0, 3, 2, 1)
    ref4 = box2d(ref2, 3, 1, 1)
    for layer, ref in [("0", ref0), ("2", ref2), ("4", ref4)]:
        np.testing.assert_allclose(np_(maps[layer])[0], ref, atol=1e-6)


# -- 4. linearity --------------------------------------------------------------------------------
def halves_and_whole(H, W):
    return [[0, 0, W // 2, H], [W // 2, 0, W - W // 2, H], [0, 0, W, H]]


@pytest.mark.parametrize("make,layers,hw", [
    (three_convs, ["4"], (16, 16)),
    (ResidualNet, ["block", "skip", "down"], (15, 15)),
    (ForkNet, ["mix", "grouped"], (12, 10)),
    (lambda: torchvision.models.mobilenet_v2(weights=None).eval(), ["features.3", "features.6", "features.18"], (64, 64)),
], ids=["three_convs", "residual", "fork", "mobilenet_v2"])
def test_rf_forward_is_linear_in_the_crop(make, layers, hw):
    model = make().eval()
    t = technique("rf_forward", model, layers, hw, crop=halves_and_whole(*hw))
    maps = t.compute("cpu")
    assert set(maps) == set(t.drawn) and len(t.drawn) >= 3
    for layer, m in maps.items():
        assert m.shape[0] == 3
        torch.testing.assert_close(m[0] + m[1], m[2], atol=1e-5, rtol=0, msg=layer)
        assert m[0].abs().sum() > 0 and m[1].abs().sum() > 0  # both halves reach every layer


def test_propagate_mask_plus_complement_is_whole_image_mobilenet():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    graph = SupportGraph(model, torch.zeros(1, 3, 48, 48))
    torch.manual_seed(1)
    mask = (torch.rand(1, 1, 48, 48) > 0.7).float()  # any mask, not just a box
    layers = ["features.2", "features.3", "features.10", "features.16", "features.18"]
    with torch.no_grad():
        out = graph.propagate(torch.cat([mask, 1 - mask, torch.ones_like(mask)]), layers)
    for layer in layers:
        s = out[layer]
        assert isinstance(s, Support) and s.map.shape[0] == 3
        torch.testing.assert_close(s.map[0] + s.map[1], s.map[2], atol=1e-5, rtol=0, msg=layer)


# -- 5. rf_ratio ---------------------------------------------------------------------------------
def test_rf_ratio_equals_forward_inside_and_differs_at_borders():
    H = 16
    model = three_convs()
    crop = [0, 0, 8, 16]  # the left half
    fwd = technique("rf_forward", model, ["4"], (H, H), crop=[crop, [0, 0, H, H]]).compute("cpu")
    ratio = technique("rf_ratio", model, ["4"], (H, H), crop=crop).compute("cpu")
    for layer, (size, _, _) in zip(["0", "2", "4"], recurrence([(3, 1, 1)] * 3)):
        f, whole, r = np_(fwd[layer][0]), np_(fwd[layer][1]), np_(ratio[layer][0])
        half = int((size - 1) / 2)
        inner = slice(half, H - half)  # units whose field lies inside the image
        np.testing.assert_allclose(r[inner, inner], f[inner, inner], atol=1e-6)
        np.testing.assert_allclose(r, f / whole, atol=1e-6)  # padding removed from both terms
        assert r[0, 0] == pytest.approx(1.0) and f[0, 0] < 1 - 1e-3  # the corner sees only crop pixels
        assert np.abs(r - f).max() > 0.1
    whole_ratio = technique("rf_ratio", model, ["4"], (H, H), crop=[0, 0, H, H]).compute("cpu")
    for m in whole_ratio.values():
        np.testing.assert_allclose(np_(m), 1.0, atol=1e-6)


def test_rf_ratio_is_zero_where_a_unit_sees_only_padding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=3), *head(4)).eval()  # 10 -> 14: a ring of pure padding
    ratio = technique("rf_ratio", model, ["0"], (10, 10), crop=[0, 0, 10, 10]).compute("cpu")["0"][0]
    fwd = technique("rf_forward", model, ["0"], (10, 10), crop=[0, 0, 10, 10]).compute("cpu")["0"][0]
    expected = np.zeros((14, 14))
    expected[1:-1, 1:-1] = 1.0  # unit i covers input i-3 .. i-1: units 0 and 13 see no pixel
    np.testing.assert_allclose(np_(ratio), expected, atol=1e-6)
    assert fwd[0, 0] == 0 and fwd[1, 1] == pytest.approx(1 / 9)


# -- 6. rf_backward ------------------------------------------------------------------------------
def test_rf_backward_centre_unit_is_the_threefold_box():
    H = 21
    model = three_convs()
    t = technique("rf_backward", model, ["4"], (H, H))
    maps = t.compute("cpu")
    assert set(maps) == {"input", "0", "2", "4"}
    c = H // 2  # the default crop: the centre unit of "4"
    for key, n in [("4", 0), ("2", 1), ("0", 2), ("input", 3)]:
        p = placed(n_fold_box(n), c, H)
        m = np_(maps[key])
        assert m.shape == (1, H, H)
        np.testing.assert_allclose(m[0], np.outer(p, p), atol=1e-7, err_msg=key)
    assert n_fold_box(3).tolist() == pytest.approx([v / 27 for v in [1, 3, 6, 7, 6, 3, 1]])
    assert np_(maps["input"]).sum() == pytest.approx(1.0, abs=1e-6)


def test_rf_backward_corner_unit_loses_the_padding_share():
    H = 21
    t = technique("rf_backward", three_convs(), ["4"], (H, H), crop=[0, 0, 1, 1])
    m = np_(t.compute("cpu")["input"])[0]
    # each layer's zero padding drops the share that falls outside: unit 0 -> [1/3, 1/3] on "2"
    # -> [2, 2, 1] / 9 on "0" -> [4, 5, 3, 1] / 27 on the input (not the clipped 3-fold profile)
    g = np.eye(H)[0]
    for _ in range(3):
        g = box1d_adjoint(g, H, 3, 1, 1)
    np.testing.assert_allclose(g[:4], np.array([4, 5, 3, 1]) / 27)
    np.testing.assert_allclose(m, np.outer(g, g), atol=1e-7)
    assert m.sum() == pytest.approx((13 / 27) ** 2, abs=1e-6)
    assert m[4:].sum() == 0 and m[:, 4:].sum() == 0


def test_rf_backward_with_a_stride_two_layer():
    H = 21
    model = three_convs(stride_mid=2)  # 21 -> 21 -> 11 -> 11
    t = technique("rf_backward", model, ["4"], (H, H))
    maps = t.compute("cpu")
    g4 = placed(np.array([1.0]), 5, 11)  # the centre unit of the 11 x 11 map
    g2 = box1d_adjoint(g4, 11, 3, 1, 1)
    g0 = box1d_adjoint(g2, H, 3, 2, 1)
    gin = box1d_adjoint(g0, H, 3, 1, 1)
    # by hand: back through the stride-2 conv, units 4, 5, 6 spread 1/9 on 7..9, 9..11, 11..13
    np.testing.assert_allclose(g0[7:14], np.array([1, 1, 2, 1, 2, 1, 1]) / 9)
    np.testing.assert_allclose(gin, np.convolve(g0, np.full(3, 1 / 3))[1:-1])
    for key, g in [("4", g4), ("2", g2), ("0", g0), ("input", gin)]:
        np.testing.assert_allclose(np_(maps[key])[0], np.outer(g, g), atol=1e-7, err_msg=key)
    assert np_(maps["input"]).sum() == pytest.approx(1.0, abs=1e-6)


def test_rf_backward_crop_of_several_units_is_their_average():
    H = 21
    t = technique("rf_backward", three_convs(), ["4"], (H, H), crop=[9, 10, 2, 1])  # x 9..10, y 10
    maps = t.compute("cpu")
    p = n_fold_box(3)
    expected = np.outer(placed(p, 10, H), (placed(p, 9, H) + placed(p, 10, H)) / 2)
    np.testing.assert_allclose(np_(maps["input"])[0], expected, atol=1e-7)
    assert np_(maps["input"]).sum() == pytest.approx(1.0, abs=1e-6)
    four = np.zeros((H, H))
    four[10, 9:11] = 0.5
    np.testing.assert_allclose(np_(maps["4"])[0], four, atol=1e-7)


def test_rf_backward_attribute_shape():
    model = three_convs()
    res = get_technique("rf_backward")().attribute(model, torch.randn(2, 3, 13, 13), ["2"], PRED)
    assert res.maps["input", "map"].shape == (2, 1, 13, 13)
    assert res.maps["2", "map"].shape == (2, 1, 13, 13)


# -- 7. erf ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 4])
def test_erf_of_a_linear_box_stack_is_the_analytic_kernel(channels):
    H = 21
    model = linear_ones([(3, 1, 1)] * 3, channels=channels)
    t = get_technique("erf")()
    t.check_model(model, ["1", "2"])
    torch.manual_seed(0)
    x = torch.randn(2, 3, H, H)
    res = t.attribute(model, x, ["1", "2"], PRED)
    c = H // 2
    for layer, n in [("1", 2), ("2", 3)]:
        m = np_(res.maps[layer, "map"])
        assert m.shape == (2, 1, H, H)
        p = placed(n_fold_box(n), c, H)
        for row in m:
            np.testing.assert_allclose(row[0] / row[0].sum(), np.outer(p, p), atol=1e-7)
            # paths from one colour channel to the unit: C per layer, 9 positions per 3x3 window;
            # summed over the 3 colour channels
            assert row.sum() == pytest.approx(3 * channels ** n * 9 ** n, rel=1e-5)

    rows = {(layer, "map"): np_(res.maps[layer, "map"]) * np.array([1.0, 3.0])[:, None, None, None]
            for layer in ["1", "2"]}
    summary = t.summarize(rows)
    for layer, n in [("1", 2), ("2", 3)]:
        np.testing.assert_allclose(summary[layer, "mean"], rows[layer, "map"].mean(0)[0], rtol=1e-6)
        sigma = math.sqrt(n * 2 / 3)  # n boxes of width 3, each of variance 2/3
        np.testing.assert_allclose(summary[layer, "sigma"], [sigma, sigma], rtol=1e-5)
        size = 2 * n + 1
        assert summary[layer, "rf"].tolist() == [size, size]
        assert summary[layer, "rf_box"].tolist() == [c - n, c - n, size, size]


def test_erf_unit_and_channel_options():
    H = 15
    model = linear_ones([(3, 1, 1)] * 2)
    t = get_technique("erf")(unit=[3, 6], channel=2)
    res = t.attribute(model, torch.randn(1, 3, H, H), ["1"], PRED)
    m = np_(res.maps["1", "map"])[0, 0]
    p = n_fold_box(2)
    np.testing.assert_allclose(m / m.sum(), np.outer(placed(p, 6, H), placed(p, 3, H)), atol=1e-7)


# -- 8. branching rules ----------------------------------------------------------------------------
def test_residual_add_averages_the_maps():
    t = technique("rf_forward", ResidualNet(), ["block"], (11, 11), crop=[5, 5, 1, 1])
    assert t.drawn == ["stem", "block.conv", "block"]
    maps = t.compute("cpu")
    mask = np.zeros((11, 11))
    mask[5, 5] = 1
    np.testing.assert_allclose(np_(maps["stem"])[0], mask, atol=1e-7)  # a 1x1 conv
    m = np_(maps["block"])[0]
    np.testing.assert_allclose(m, (box2d(mask, 3, 1, 1) + mask) / 2, atol=1e-7)
    assert m[5, 5] == pytest.approx((1 / 9 + 1) / 2) and m[4, 4] == pytest.approx(1 / 18) and m[3, 3] == 0
    graph = t.graph
    assert fields_of(graph, "block") == ((3, 1, 0),) * 2  # union of a 3 and a 1
    # block2: relu(3x3 s2 p1) + 1x1 s2: union of (5, 2, 0) and (3, 2, 0)
    assert fields_of(graph, "down") == ((5, 2, 0),) * 2 and fields_of(graph, "skip") == ((3, 2, 0),) * 2


def test_add_of_branches_with_different_centres_takes_the_union():
    graph = SupportGraph(ShiftedAdd(), torch.zeros(1, 3, 9, 9))
    assert fields_of(graph, "a") == ((3, 1, 0),) * 2
    assert fields_of(graph, "b") == ((3, 1, -1),) * 2  # F.pad 2 on the left: the window sits at i-2 .. i
    # the add: bounds [-1, 1] and [-2, 0] -> [-2, 1]: size 4, centre -0.5
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 3:6, 2:4] = 1
    with torch.no_grad():
        out = graph.propagate(mask, ["a", "b", "join"])
    s = out["join"]
    assert fields_of(graph, "join") == ((4, 1, -0.5),) * 2
    assert tuple((f.size, f.jump, f.start) for f in s.fields) == ((4, 1, -0.5),) * 2
    m = mask[0, 0].numpy()
    a = box2d(m, 3, 1, 1)
    b = box2d(np.pad(m, ((2, 0), (2, 0))), 3, 1, 0)
    np.testing.assert_allclose(np_(out["b"].full())[0, 0], b, atol=1e-7)
    np.testing.assert_allclose(np_(s.full())[0, 0], (a + b) / 2, atol=1e-7)


def test_concatenation_keeps_per_channel_maps_and_a_1x1_conv_averages_them():
    graph = SupportGraph(ForkNet(), torch.zeros(1, 3, 9, 9))
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1
    with torch.no_grad():
        out = graph.propagate(mask, ["fork", "mix", "grouped", "fork.a", "fork.b"])
    m = mask[0, 0].numpy()
    b = box2d(m, 3, 1, 1)
    fork = out["fork"]
    assert fork.shape == (1, 4, 9, 9)
    full = np_(fork.full())[0]
    for ch in range(4):
        np.testing.assert_allclose(full[ch], m if ch == 0 else b, atol=1e-7)
    mix = np_(out["mix"].full())[0]
    np.testing.assert_allclose(mix[0], (m + 3 * b) / 4, atol=1e-7)
    assert mix[0, 4, 4] == pytest.approx((1 + 3 / 9) / 4) and mix[0, 3, 4] == pytest.approx(3 / 9 / 4)
    assert (mix[1:] == mix[0]).all()
    # groups of 2 input channels: (a, b) and (b, b), each averaged, then boxed; 2 outputs per group
    grouped = np_(out["grouped"].full())[0]
    first, second = box2d((m + b) / 2, 3, 1, 1), box2d(b, 3, 1, 1)
    for ch, ref in enumerate([first, first, second, second]):
        np.testing.assert_allclose(grouped[ch], ref, atol=1e-7)
    assert fields_of(graph, "fork.a") == ((1, 1, 0),) * 2 and fields_of(graph, "fork") == ((3, 1, 0),) * 2


def test_squeeze_excite_gate_passes_x_and_pools_end_the_path():
    graph = SupportGraph(SENet(), torch.zeros(1, 3, 8, 8))
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 2:5, 1:3] = 1
    with torch.no_grad():
        out = graph.propagate(mask, ["conv", "se", "se2", "se.fc", "se2.avgpool", "se2.fc1", "flatten", "fc"])
    for layer in ["se", "se2"]:
        assert torch.equal(out[layer].full(), out["conv"].full())
        assert out[layer].fields == out["conv"].fields
    np.testing.assert_allclose(np_(out["se2"].full())[0, 0], box2d(mask[0, 0].numpy(), 3, 1, 1), atol=1e-7)
    for layer in ["se.fc", "se2.avgpool", "se2.fc1", "flatten", "fc"]:
        assert out[layer] is END
    fields = graph.fields()
    assert fields["se"] == fields["conv"]
    assert all(fields[k] is None for k in ["se.fc", "se2.avgpool", "se2.fc1", "se2.scale_activation",
                                          "flatten", "fc"])


def test_global_pool_and_linear_end_the_spatial_path():
    model = three_convs()
    fields = SupportGraph(model, torch.zeros(1, 3, 16, 16)).fields()
    assert fields["4"] is not None
    assert fields["5"] is None and fields["6"] is None and fields["7"] is None
    with pytest.raises(ValueError, match="spatial path ended"):
        technique("rf_forward", model, ["7"], (16, 16))


# -- 9. errors -------------------------------------------------------------------------------------
def test_untraceable_module_is_named():
    with pytest.raises(GraphError, match=r"'stage\.gate'.*DataDependentGate"):
        SupportGraph(UntraceableNet(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"stage\.gate"):
        technique("rf_forward", UntraceableNet(), ["stage.conv"], (8, 8))


def test_op_without_rule_is_named():
    graph = SupportGraph(RollNet(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(GraphError, match=r"roll.*'shifter'"):
        graph.fields()
    with pytest.raises(GraphError, match=r"roll.*'shifter'"):
        graph.propagate(torch.ones(1, 1, 8, 8), ["conv2"])
    with pytest.raises(ValueError, match=r"roll.*'shifter'"):
        technique("rf_forward", RollNet(), ["conv2"], (8, 8))
    # the part before the roll is fine
    assert isinstance(graph.propagate(torch.ones(1, 1, 8, 8), ["conv"])["conv"], Support)


# -- 10. the embedded default model --------------------------------------------------------------
def efficientnet_lite0_path():
    """(k, s, p_left) along tf_efficientnet_lite0: stem, then the depthwise conv of each block
    (the 1x1 convs add nothing); TF 'same' padding pads (k - s) // 2 ... on the left at even sizes."""
    stages = [(1, 3, 1), (2, 3, 2), (2, 5, 2), (3, 3, 2), (3, 5, 1), (4, 5, 2), (1, 3, 1)]  # repeats, k, s
    path = [(3, 2)]
    for repeats, k, s in stages:
        path += [(k, s)] + [(k, 1)] * (repeats - 1)
    return path


def test_efficientnet_lite0_fields_and_table():
    from pipeline.models import build_efficientnet_lite0

    model = build_efficientnet_lite0().eval()
    graph = SupportGraph(model, torch.zeros(1, 3, 224, 224))
    fields = graph.fields()
    # stem: a 3-wide stride-2 window with TF 'same' padding (0 left, 1 right at 224): centre at pixel 1
    total_pad = max((math.ceil(224 / 2) - 1) * 2 + 3 - 224, 0)
    assert total_pad == 1
    assert fields_of(graph, "conv_stem") == ((3, 2, 1 - total_pad // 2),) * 2
    size, jump = 1, 1
    for k, s in efficientnet_lite0_path():
        size, jump = size + (k - 1) * jump, jump * s
    assert (size, jump) == (851, 32)
    for layer in ["conv_head", "bn2"]:
        assert [(f.size, f.jump) for f in fields[layer]] == [(size, jump)] * 2
    assert fields["global_pool"] is None and fields["classifier"] is None
    rows = field_table(graph)
    assert rows and rows[0].layer == "conv_stem" and rows[0].size == (3, 3) and rows[0].jump == (2, 2)
    last = rows[-1]
    assert last.jump == (32, 32) and last.size == (851, 851)
    assert all(r.jump[0] in (2, 4, 8, 16, 32) for r in rows)
