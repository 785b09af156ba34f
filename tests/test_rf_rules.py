"""The receptive-field rule table (pipeline.rf.rules): one model per family of rules, checked against
references computed here (numpy box filters, nearest / bilinear resampling, the hand recurrence),
the lookup and its errors, and that the models traced in these tests reach every rule of the table.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.rf import END, GraphError, Support, SupportGraph, ops, rules
from tests.test_receptive_fields import (Fork, ForkNet, ResidualNet, SENet, ShiftedAdd, box2d, fields_of,
                                         np_, recurrence, three_convs)


class Fn(nn.Module):
    """One function of its input(s), so that it has a module name in the traced graph."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


class FConv(nn.Module):
    """F.conv2d(x, weight, None, stride 1, padding 1): a 3x3 convolution as a function call."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 3, 3))

    def forward(self, x):
        return F.conv2d(x, self.weight, None, 1, 1)


class FLinear(nn.Module):
    """F.linear over the last axis."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return F.linear(x, self.weight)


def windows(functional: bool) -> nn.Sequential:
    """conv 3x3 p1 -> max pool 3 s2 p1 -> avg pool 2 (s2): as modules or as F.* calls."""
    torch.manual_seed(0)
    if functional:
        layers = [FConv(3, 4), Fn(lambda x: F.max_pool2d(x, 3, 2, 1)), Fn(lambda x: F.avg_pool2d(x, kernel_size=2))]
    else:
        layers = [nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2)]
    return nn.Sequential(*layers).eval()


class Resample(nn.Module):
    """1x1 stem (8 x 8) -> F.adaptive_max_pool2d to 4 x 4 -> F.interpolate x2 nearest -> nn.Upsample
    x2 bilinear (16 x 16) -> nn.AdaptiveAvgPool2d(8) -> global pool -> fc."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 2, 1)
        self.grid = Fn(lambda x: F.adaptive_max_pool2d(x, 4))
        self.near = Fn(lambda x: F.interpolate(x, scale_factor=2, mode="nearest"))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.cells = nn.AdaptiveAvgPool2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        x = self.cells(self.up(self.near(self.grid(self.stem(x)))))
        return self.fc(self.pool(x).flatten(1))


class ChannelsLast(nn.Module):
    """Fork (per-channel maps: a 1x1 conv | three 3x3 conv channels) -> permute to [N, H, W, C] ->
    LayerNorm, Linear, GELU, F.linear -> movedim back -> transpose H and W and back (swapaxes) ->
    1x1 conv (a ConvNeXt-style block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = Fork(3)
        self.to_last = Fn(lambda x: x.permute(0, 2, 3, 1))
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.proj = FLinear(8, 4)
        self.to_first = Fn(lambda x: x.movedim(3, 1))
        self.flip = Fn(lambda x: x.transpose(2, 3))
        self.unflip = Fn(lambda x: x.swapaxes(-1, -2))
        self.head = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.proj(self.act(self.mlp(self.norm(self.to_last(self.conv(x))))))
        return self.head(self.unflip(self.flip(self.to_first(x))))


class Paths(nn.Module):
    """Fork (per-channel maps, 4 channels), then reshapes and reductions that keep the spatial axes
    ("groups", "merged", "summed", "back", "kept", "cast") or end them ("rows", "over_w", "pooled")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = Fork(3)
        self.groups = Fn(lambda x: x.reshape(x.size(0), 2, 2, x.shape[2], x.shape[3]))  # [N, 2, 2, H, W]
        self.merged = Fn(lambda x: torch.flatten(x, 1, 2))  # [N, 4, H, W]
        self.summed = Fn(lambda x: x.sum(1))  # [N, H, W]
        self.back = Fn(lambda x: x.view(-1, 1, x.shape[1], x.shape[2]))  # [N, 1, H, W]
        self.kept = Fn(lambda x: x.mean(dim=x.dim() - 3, keepdim=True))
        self.cast = Fn(lambda x: x.to(x.dtype))
        self.rows = Fn(lambda x: x.flatten(x.ndim - 2))  # [N, 4, H * W]
        self.over_w = FLinear(8, 3)  # over W, a spatial axis
        self.pooled = Fn(lambda x: x.amax((2, 3)))

    def forward(self, x):
        y = self.conv(x)
        z = self.cast(self.kept(self.back(self.summed(self.merged(self.groups(y))))))
        return z, self.rows(y), self.over_w(y), self.pooled(y)


class Pieces(nn.Module):
    """Fork (channel 0: a 1x1 conv, channels 1-3: a 3x3 conv), then chunk, split, indexing and a
    concatenation of two pieces; and a slice of channels of a plain conv's map ("sliced")."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fork = Fork(3)
        self.halves = Fn(lambda x: x.chunk(2, 1)[0])  # channels 0, 1
        self.rest = Fn(lambda x: torch.split(x, [1, 3], dim=1)[1])  # channels 1-3
        self.last = Fn(lambda x: x[:, -1])  # channel 3, the channel axis dropped
        self.tail = Fn(lambda x: x[..., :, :][:, 2:])  # channels 2, 3
        self.join = Fn(lambda a, b: torch.cat([a, b], dim=1))  # channels 0, 1, 2, 3
        self.stem = nn.Conv2d(3, 4, 3, padding=1)  # one map for all channels
        self.sliced = Fn(lambda x: x[:, 2:])

    def forward(self, x):
        f = self.fork(x)
        return self.join(self.halves(f), self.tail(f)), self.rest(f), self.last(f), self.sliced(self.stem(x))


class ConvThen(nn.Module):
    """conv 3x3 "conv" -> `then` (a module, or a function wrapped in Fn)."""

    def __init__(self, then):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.then = then if isinstance(then, nn.Module) else Fn(then)

    def forward(self, x):
        return self.then(self.conv(x))


def softmaxes() -> nn.Module:
    """conv 3x3 -> softmax over channels ("then.0") -> log_softmax over channels ("then.1")."""
    return ConvThen(nn.Sequential(Fn(lambda x: x.softmax(dim=1)), Fn(lambda x: torch.log_softmax(x, 1))))


def crop_mask(h: int, w: int, rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(1, 1, h, w)
    mask[0, 0, rows, cols] = 1
    return mask


def propagate(model: nn.Module, mask: torch.Tensor, layers):
    graph = SupportGraph(model.eval(), torch.zeros(1, 3, *mask.shape[2:]))
    with torch.no_grad():
        return graph, graph.propagate(mask, layers)


def bilinear_up2(m: np.ndarray) -> np.ndarray:
    """x2 bilinear upsampling, align_corners=False: output j samples input (j + 0.5) / 2 - 0.5 (clamped)."""
    def along(v, axis):
        v = np.moveaxis(v, axis, 0)
        rows = []
        for j in range(2 * len(v)):
            src = max((j + 0.5) / 2 - 0.5, 0.0)
            i0 = int(np.floor(src))
            w = src - i0
            rows.append((1 - w) * v[i0] + w * v[min(i0 + 1, len(v) - 1)])
        return np.moveaxis(np.stack(rows), 0, axis)
    return along(along(m, 0), 1)


def every_channel(support: Support) -> np.ndarray:
    """[C, *spatial] of one input's full map (channels first)."""
    return np_(support.full())[0]


# -- convolution and pooling: functions and modules ------------------------------------------------
def test_functional_windows_match_modules_and_the_reference():
    mask = crop_mask(16, 16, slice(3, 9), slice(5, 8))
    expected_fields = recurrence([(3, 1, 1), (3, 2, 1), (2, 2, 0)])
    assert expected_fields == [(3, 1, 0), (5, 2, 0), (7, 4, 1)]
    m = mask[0, 0].numpy()
    refs = [box2d(m, 3, 1, 1)]
    refs += [box2d(refs[0], 3, 2, 1), box2d(box2d(refs[0], 3, 2, 1), 2, 2, 0)]
    outs = {}
    for functional in (False, True):
        graph, out = propagate(windows(functional), mask, ["0", "1", "2"])
        outs[functional] = out
        for layer, ref, fields in zip(["0", "1", "2"], refs, expected_fields):
            full = every_channel(out[layer])
            assert full.shape == (4,) + ref.shape
            for channel in full:
                np.testing.assert_allclose(channel, ref, atol=1e-7, err_msg=f"{layer} functional={functional}")
            assert fields_of(graph, layer) == (fields,) * 2
    for layer in ["0", "1", "2"]:
        assert torch.equal(outs[False][layer].full(), outs[True][layer].full())


# -- adaptive pooling and interpolation ------------------------------------------------------------
def test_adaptive_pool_and_interpolation_resample_the_map():
    mask = crop_mask(8, 8, slice(1, 4), slice(2, 7))
    graph, out = propagate(Resample(), mask, ["stem", "grid", "near", "up", "cells", "pool", "fc"])
    m = mask[0, 0].numpy()
    grid = m.reshape(4, 2, 4, 2).mean((1, 3))  # each cell averages its 2 x 2 pixels
    near = np.repeat(np.repeat(grid, 2, 0), 2, 1)
    up = bilinear_up2(near)
    cells = up.reshape(8, 2, 8, 2).mean((1, 3))
    for layer, ref in [("grid", grid), ("near", near), ("up", up), ("cells", cells)]:
        np.testing.assert_allclose(every_channel(out[layer])[0], ref, atol=1e-6, err_msg=layer)
    # grid: a 2-pixel window with stride 2, centred between pixels 0 and 1. Resampling by r (input
    # elements per output element): output j sits at input element (j + 0.5) r - 0.5; nearest
    # keeps the size, (bi)linear adds one input element's jump.
    assert fields_of(graph, "grid") == ((2, 2, 0.5),) * 2
    assert fields_of(graph, "near") == ((2, 1, 0.5 + (0.5 * 0.5 - 0.5) * 2),) * 2 == ((2, 1, 0),) * 2
    assert fields_of(graph, "up") == ((2 + 1, 0.5, (0.5 * 0.5 - 0.5) * 1),) * 2
    assert fields_of(graph, "cells") == ((3 + 0.5, 1, -0.25 + 0.5 * 0.5),) * 2  # a 2-element window of jump 0.5
    assert out["pool"] is END and out["fc"] is END


# -- channels-last features and moved axes ---------------------------------------------------------
def crop_through(model, size, crop, layers):
    """(graph, maps by layer, the crop's mask [H, W], its 3x3 box filter) of a crop propagated."""
    mask = crop_mask(*size, *crop)
    graph, out = propagate(model, mask, layers)
    m = mask[0, 0].numpy()
    return graph, out, m, box2d(m, 3, 1, 1)


def test_channels_last_block_and_transposes_move_the_spatial_axes():
    layers = ["conv", "to_last", "norm", "mlp", "act", "proj", "to_first", "flip", "unflip", "head"]
    graph, out, m, b = crop_through(ChannelsLast(), (6, 10), (slice(0, 2), slice(3, 9)), layers)
    ref = (m + 3 * b) / 4  # a linear layer over channels mixes all four channels' maps
    for layer, refs in [("to_last", [m, b, b, b]), ("norm", [m, b, b, b]), ("mlp", [ref] * 8),
                        ("act", [ref] * 8), ("proj", [ref] * 4)]:
        s = out[layer]
        assert s.dims == (1, 2) and s.shape == (1, 6, 10, len(refs)), layer
        full = np_(s.full())[0]
        for c, channel_ref in enumerate(refs):
            np.testing.assert_allclose(full[..., c], channel_ref, atol=1e-7, err_msg=layer)
    assert out["to_first"].dims == (2, 3)
    np.testing.assert_allclose(every_channel(out["to_first"])[0], ref, atol=1e-7)
    flipped = out["flip"]
    assert flipped.shape == (1, 4, 10, 6) and flipped.dims == (3, 2)  # the H axis now last
    np.testing.assert_allclose(every_channel(flipped)[0], ref.T, atol=1e-7)
    assert out["unflip"].dims == (2, 3)
    for layer in ["unflip", "head"]:
        np.testing.assert_allclose(every_channel(out[layer])[0], ref, atol=1e-7, err_msg=layer)
    for layer in layers:
        assert fields_of(graph, layer) == ((3, 1, 0),) * 2, layer


# -- reshapes, reductions, shape queries; where the spatial path ends ------------------------------
def test_reshapes_and_reductions_keep_or_end_the_spatial_path():
    layers = ["conv", "groups", "merged", "summed", "back", "kept", "cast", "rows", "over_w", "pooled"]
    graph, out, m, b = crop_through(Paths(), (8, 8), (slice(2, 6), slice(0, 3)), layers)
    mean = (m + 3 * b) / 4  # a reduction over channels averages their maps
    expected = {"groups": ((1, 2, 2, 8, 8), [m, b, b, b]), "merged": ((1, 4, 8, 8), [m, b, b, b]),
                "summed": ((1, 8, 8), [mean]), "back": ((1, 1, 8, 8), [mean]), "kept": ((1, 1, 8, 8), [mean]),
                "cast": ((1, 1, 8, 8), [mean])}
    for layer, (shape, refs) in expected.items():
        s = out[layer]
        assert s.shape == shape and s.dims == (len(shape) - 2, len(shape) - 1), layer
        full = np_(s.full()).reshape(-1, 8, 8)
        assert len(full) == len(refs), layer
        for channel, ref in zip(full, refs):
            np.testing.assert_allclose(channel, ref, atol=1e-7, err_msg=layer)
        assert fields_of(graph, layer) == ((3, 1, 0),) * 2, layer
    for layer in ["rows", "over_w", "pooled"]:
        assert out[layer] is END, layer
        assert graph.fields()[layer] is None


# -- splitting, indexing and concatenating channels ------------------------------------------------
def test_split_index_and_concatenate_keep_the_maps_of_the_channels_taken():
    mask = crop_mask(9, 9, slice(4, 5), slice(4, 5))
    graph, out = propagate(Pieces(), mask, ["fork", "halves", "rest", "last", "tail", "join", "sliced"])
    m = mask[0, 0].numpy()
    b = box2d(m, 3, 1, 1)
    per_channel = {"fork": [m, b, b, b], "halves": [m, b], "rest": [b, b, b], "tail": [b, b], "join": [m, b, b, b],
                   "sliced": [b, b]}
    for layer, refs in per_channel.items():
        full = every_channel(out[layer])
        assert len(full) == len(refs), layer
        for channel, ref in zip(full, refs):
            np.testing.assert_allclose(channel, ref, atol=1e-7, err_msg=layer)
    last = out["last"]
    assert last.shape == (1, 9, 9) and last.dims == (1, 2)
    np.testing.assert_allclose(np_(last.full())[0], b, atol=1e-7)
    assert fields_of(graph, "halves") == ((3, 1, 0),) * 2  # the union of the 1x1 and the 3x3 field
    assert fields_of(graph, "rest") == ((3, 1, 0),) * 2


def test_softmax_over_channels_passes_the_map():
    mask = crop_mask(7, 7, slice(0, 3), slice(0, 3))
    _, out = propagate(softmaxes(), mask, ["conv", "then.0", "then.1"])
    for layer in ["then.0", "then.1"]:
        assert torch.equal(out[layer].full(), out["conv"].full()) and out[layer].fields == out["conv"].fields


# -- the lookup --------------------------------------------------------------------------------------
class SameConv(nn.Conv2d):
    """A subclass of a listed module (like timm's Conv2dSame)."""


def test_module_lookup_goes_by_the_nearest_listed_class():
    assert rules.module_rule("c", SameConv(3, 4, 3)) is ops.conv_module
    assert rules.module_rule("bn", nn.BatchNorm2d(4)) is ops.passthrough
    assert rules.module_rule("up", nn.UpsamplingNearest2d(scale_factor=2)) is ops.upsample_module
    assert rules.module_rule("gap", nn.AdaptiveMaxPool2d(1)) is ops.adaptive
    with pytest.raises(GraphError, match=r"^receptive fields: no rule for module 'sm' \(Softmax\)$"):
        rules.module_rule("sm", nn.Softmax(dim=1))


def test_function_lookup_and_its_error():
    assert rules.function_rule("add", "call_function", "block") is ops.elementwise
    assert rules.function_rule("flatten", "call_method", "block") is ops.reshape
    with pytest.raises(GraphError) as err:
        rules.function_rule("flip", "call_method", "block")
    assert str(err.value) == ("receptive fields: no rule for 'flip' (call_method) in module 'block'; "
                              "see pipeline/rf/rules.py for the operations it knows")


def test_a_name_given_two_rules_is_refused():
    with pytest.raises(ValueError, match="'add' has two receptive-field rules"):
        rules._by_name((["add", "mul"], ops.elementwise), (["add"], ops.passthrough))


# -- errors while propagating ------------------------------------------------------------------------
@pytest.mark.parametrize("model, message", [
    (ConvThen(lambda x: torch.roll(x, 1, dims=3)),
     r"^receptive fields: no rule for 'roll' \(call_function\) in module 'then'; see pipeline/rf/rules\.py"),
    (ConvThen(lambda x: x.flip(3)),
     r"^receptive fields: no rule for 'flip' \(call_method\) in module 'then'; see pipeline/rf/rules\.py"),
    (ConvThen(nn.Softmax(dim=1)), r"^receptive fields: no rule for module 'then' \(Softmax\)$"),
    (ConvThen(nn.ConvTranspose2d(4, 4, 2, stride=2)), r"^transposed convolution 'then' has no receptive-field rule$"),
    (ConvThen(lambda x: torch.cat([x, x], dim=2)), "^concatenation along a spatial axis has no receptive-field rule$"),
    (ConvThen(lambda x: x.chunk(2, dim=3)[0]), "^splitting along a spatial axis has no receptive-field rule$"),
    (ConvThen(lambda x: x[:, :, 1:]), "^indexing a spatial axis has no receptive-field rule$"),
    (ConvThen(lambda x: x.softmax(-1)), "^softmax over a spatial axis has no receptive-field rule$"),
    (ConvThen(lambda x: F.max_pool2d(x, 2, return_indices=True)[0]),
     "^max_pool2d_with_indices: cannot tell its output shape$"),
    (ConvThen(lambda x: F.pad(x.permute(0, 2, 3, 1), (1, 1))),
     "^padding a channels-last tensor has no receptive-field rule$"),
    # a rule's own failure is named with the operation and the module
    (ConvThen(nn.Sequential(Fn(lambda x: x.transpose(2, 3)), nn.Conv2d(4, 4, 3))),
     r"^receptive fields: then\.1 in module 'then\.1': expects a channels-first tensor"),
], ids=["function", "method", "module", "transposed", "cat", "chunk", "index", "softmax", "with_indices", "pad", "wrapped"])
def test_errors_name_the_operation(model, message):
    graph = SupportGraph(model.eval(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(GraphError, match=message):
        graph.fields()


# -- every rule of the table is reached ----------------------------------------------------------------
TRACED = [
    (lambda: windows(False), (16, 16)), (lambda: windows(True), (16, 16)), (Resample, (8, 8)),
    (ChannelsLast, (6, 10)), (Paths, (8, 8)), (Pieces, (9, 9)), (softmaxes, (7, 7)),
    (three_convs, (16, 16)), (ResidualNet, (11, 11)), (ShiftedAdd, (9, 9)), (ForkNet, (9, 9)), (SENet, (8, 8)),
]


def test_every_rule_in_the_table_is_reached(monkeypatch):
    reached = set()

    def spy(rule):
        def recorded(op):
            reached.add(rule)
            return rule(op)
        return recorded

    every = set(rules.FUNCTION_RULES.values()) | set(rules.MODULE_RULES.values())
    for table in ("FUNCTION_RULES", "MODULE_RULES"):
        monkeypatch.setattr(rules, table, {key: spy(rule) for key, rule in getattr(rules, table).items()})
    for make, hw in TRACED:
        SupportGraph(make().eval(), torch.zeros(1, 3, *hw)).fields()
    missing = sorted(r.__name__ for r in every - reached)
    assert not missing, f"rules no model here reaches: {missing}"
    assert reached == every

