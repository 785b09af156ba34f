"""Occlusion by incremental inference: the same drop maps as full inference, and the fallback."""
import logging

import pytest
import torch
import torchvision
from torch import nn

from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from pipeline.techniques import base, incremental, occlusion

TOP2 = TargetSpec.parse("topk:2")


def drops(model, x, window, stride, max_batch, inc, fill=0.0):
    technique = get_technique("occlusion")(window=window, stride=stride, fill=fill, incremental=inc)
    return technique.attribute(model, x, [], TOP2, max_batch=max_batch).maps["input", "drop"]


def boxes_computed(monkeypatch):
    """Counts the convolutions / pools computed on a box (not on full maps)."""
    calls = []
    real = incremental.Incremental._windowed

    def spy(self, *args):
        out = real(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(incremental.Incremental, "_windowed", spy)
    return calls


def no_full_inference(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("full inference ran")

    monkeypatch.setattr(base.Pass, "rows_logits", refuse)


def check_equal(model, x, window, stride, max_batch, monkeypatch, fill=0.0):
    full = drops(model, x, window, stride, max_batch, False, fill)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = boxes_computed(monkeypatch)
    no_full_inference(monkeypatch)
    rows, real_run = [], incremental.Incremental._run
    monkeypatch.setattr(incremental.Incremental, "_run", lambda self, patch: rows.append(len(patch.src))
                        or real_run(self, patch))
    inc = drops(model, x, window, stride, max_batch, True, fill)
    assert max(rows) <= max_batch and sum(rows) == x.shape[0] * full_windows(x, window, stride)
    assert inc.shape == full.shape == (x.shape[0], 2) + tuple(x.shape[2:])
    assert full.abs().max() > 0
    # float32: full inference differs from itself by ~1.2e-5 between max_batch 7 and 16 (VGG11 here);
    # float64 (test_float64_is_exact) shows the algorithm itself is exact
    assert ((inc - full).abs().max() / full.abs().max()) <= (2e-5 if x.dtype == torch.float32 else 1e-10)
    assert any(calls), "no convolution was computed on a box"
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state) and not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    return calls


def full_windows(x, window, stride):
    return len(occlusion.starts(x.shape[2], window, stride)) * len(occlusion.starts(x.shape[3], window, stride))


def seeded(build):
    torch.manual_seed(0)
    return build().eval()


@pytest.mark.parametrize("window,stride,max_batch", [(16, 8, 16), (32, 16, 1), (16, 12, 7)])
def test_vgg11_equals_full_inference(window, stride, max_batch, monkeypatch, one_thread):
    model = seeded(lambda: torchvision.models.vgg11(weights=None))
    x = torch.randn(2, 3, 64, 72)  # 72 - 16 is no multiple of 12: a last window flush with the edge
    check_equal(model, x, window, stride, max_batch, monkeypatch)


@pytest.mark.parametrize("build", [torchvision.models.vgg11, torchvision.models.resnet18])
def test_float64_is_exact(build, monkeypatch, one_thread):
    model = seeded(lambda: build(weights=None)).double()
    check_equal(model, torch.randn(2, 3, 64, 72, dtype=torch.float64), 16, 12, 7, monkeypatch)


@pytest.mark.parametrize("window,stride,max_batch", [(16, 8, 16), (32, 16, 5)])
def test_resnet18_residual_adds_equal_full_inference(window, stride, max_batch, monkeypatch, one_thread):
    model = seeded(lambda: torchvision.models.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64)
    check_equal(model, x, window, stride, max_batch, monkeypatch, fill=0.5)


def test_mobilenet_v2_depthwise_relu6_equals_full_inference(monkeypatch, one_thread):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None)
    for m in model.modules():  # BN statistics of random inputs: the init's saturate every ReLU6 (drops ~0)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    model.eval()
    check_equal(model, torch.randn(2, 3, 64, 64), 16, 8, 16, monkeypatch)


class SENet(nn.Module):
    """conv -> squeeze-excite gate (global mixing) -> conv -> global pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(2))
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = torch.relu(self.conv(x * gate))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_squeeze_excite_materializes_then_runs_the_rest(monkeypatch, one_thread):
    calls = check_equal(seeded(SENet), torch.randn(3, 3, 32, 32), 8, 4, 10, monkeypatch)
    chunks = -(-3 * 7 * 7 // 10)  # 3 inputs x 7 x 7 windows, 10 rows at a time
    assert calls == [True] * 2 * chunks  # stem conv and pool on boxes; after the gate everything is full


def test_embedded_model_equals_full_inference(make_cfg, monkeypatch, one_thread):
    from pipeline.models import build_model

    model = build_model(make_cfg().model).module
    x = torch.randn(2, 3, 96, 96)
    check_equal(model, x, 32, 16, 16, monkeypatch)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.fc(self.conv(x).mean((2, 3)))


def test_untraceable_model_falls_back_to_full_inference(caplog, one_thread):
    model = seeded(Untraceable)
    x = torch.randn(2, 3, 20, 20)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        inc = drops(model, x, 8, 4, 4, True)
    assert "full inference" in caplog.text and "Untraceable" in caplog.text
    assert isinstance(occlusion._engine(model), str)
    assert torch.equal(inc, drops(model, x, 8, 4, 4, False))


def test_a_graph_that_does_not_reproduce_the_logits_falls_back(caplog, monkeypatch, one_thread):
    model = seeded(SENet)
    x = torch.randn(2, 3, 16, 16)
    real = incremental.Incremental.clean
    monkeypatch.setattr(incremental.Incremental, "clean", lambda self, x: real(self, x) + 1.0)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        inc = drops(model, x, 8, 4, 4, True)
    assert "does not reproduce" in caplog.text
    assert torch.equal(inc, drops(model, x, 8, 4, 4, False))


class Counting(nn.Module):
    """Records the batch size of every call, and how many calls: Python state tracing must not touch."""

    def __init__(self):
        super().__init__()
        self.net, self.sizes, self.calls = SENet(), [], 0

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.calls += 1
        return self.net(x)


def test_tracing_leaves_the_models_python_state_as_it_was(monkeypatch, one_thread):
    model = seeded(Counting)
    calls = boxes_computed(monkeypatch)
    drops(model, torch.randn(2, 3, 16, 16), 8, 4, 4, True)
    assert any(calls) and model.sizes == [2] and model.calls == 1  # the Pass's own forward only
    assert not hasattr(model, "graph") and isinstance(occlusion._engine(model), incremental.Incremental)


def test_each_copy_recomputes_only_its_boxes_flops(one_thread):
    """The saving itself, counted exactly (torch.utils.flop_counter): each convolution of each copy
    runs on its output box only (the 8 x 8 window grown by one pixel per 3 x 3 convolution), the
    clean input once in full, the linear layer after the global pool in full per copy."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    x = torch.randn(1, 3, 64, 64)
    edges = occlusion.starts(64, 8, 8)
    ys = torch.tensor(edges).repeat_interleave(len(edges))
    xs = torch.tensor(edges).repeat(len(edges))
    P = len(ys)
    engine = incremental.Incremental(model)
    with torch.no_grad():
        reference = model(x)
        with FlopCounterMode(display=False) as counter:
            logits = torch.cat([out for _, out in engine.rows(x, ys, xs, (8, 8), 0.0, P, 16, reference)])

    def conv(c_in, side):  # flop_counter: 2 per multiply-add
        return 2 * 8 * side * side * c_in * 9

    full = conv(3, 64) + 2 * conv(8, 64) + 2 * 8 * 10
    boxes = conv(3, 10) + conv(8, 12) + conv(8, 14) + 2 * 8 * 10
    assert counter.get_total_flops() == full + P * boxes  # 1/25 of P * full here
    copies = x.repeat(P, 1, 1, 1)
    for r, (y0, x0) in enumerate(zip(ys.tolist(), xs.tolist())):
        copies[r, :, y0:y0 + 8, x0:x0 + 8] = 0.0
    torch.testing.assert_close(logits, model(copies), rtol=1e-4, atol=1e-5)


def test_a_fallback_partway_counts_each_row_once(monkeypatch, one_thread):
    """The engine fails at its second chunk: full inference redoes every copy (same maps), and the
    rows the engine announced and did are taken back out of the progress, not counted twice."""
    from pipeline.progress import Progress

    model = seeded(lambda: torchvision.models.vgg11(weights=None))
    x = torch.randn(1, 3, 64, 64)
    want = drops(model, x, 16, 16, 4, False)
    calls, real = [], incremental.Incremental._run

    def flaky(self, patch):
        calls.append(len(patch.src))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, patch)

    monkeypatch.setattr(incremental.Incremental, "_run", flaky)
    technique = get_technique("occlusion")(window=16, stride=16, incremental=True)
    p = base.Pass(model, x, [], TOP2, max_batch=4, needs=technique.needs)
    seen = []
    p.progress = Progress(lambda done, total: seen.append((done, total)))
    got = technique.attribute(model, x, [], TOP2, max_batch=4, shared=p).maps["input", "drop"]
    rows = full_windows(x, 16, 16)
    assert calls == [4, 4] and (p.progress.done, p.progress.total) == (rows, rows)
    assert max(total for _, total in seen) == rows
    torch.testing.assert_close(got, want)
