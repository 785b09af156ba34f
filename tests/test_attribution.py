"""SmoothGrad, Integrated Gradients and occlusion: maths, batching and configs."""
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, get_technique
from pipeline.maps import gaussian_blur
from pipeline.techniques.integrated_gradients import BASELINE_KEY, baseline
from tests.tinymodels import CountForwards, tiny_net

TOP2 = TargetSpec.parse("topk:2")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make(name, **options):
    return get_technique(name)(**options)


class SmoothNet(nn.Module):
    """A small smooth CNN (softplus, tanh) for 2D [N, 3, H, W] or, with video=True, 3D clips."""

    def __init__(self, video=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv3d if video else nn.Conv2d
        self.conv1, self.act1 = conv(3, 8, 3, padding=1), nn.Softplus()
        self.conv2, self.act2 = conv(8, 16, 3, stride=2, padding=1), nn.Tanh()
        self.fc = nn.Linear(16, 5)
        self.eval()

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(x.flatten(2).mean(2))


def normalised(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(shape, generator=g)
    view = (1, 3) + (1,) * (len(shape) - 2)
    return (pixels - torch.tensor(MEAN).view(view)) / torch.tensor(STD).view(view)


# -- Integrated Gradients --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["riemann", "gauss_legendre"])
@pytest.mark.parametrize("kind,mean,std", [("black", MEAN, STD), ("black", None, None),
                                           ("blur", None, None), ("noise", MEAN, STD)])
def test_ig_completeness_within_one_percent(method, kind, mean, std):
    model, x = SmoothNet(), normalised(2, 3, 12, 12)
    ig = make("integrated_gradients", steps=64, method=method, baseline=kind, sigma=2.0, mean=mean, std=std)
    maps = ig.attribute(model, x, [], TOP2).maps
    attr = maps["input", "attr"]  # [N, K, 3, H, W]
    assert attr.shape == (2, 2, 3, 12, 12) and maps["input", "maxabs"].shape == (2, 2, 12, 12)
    # the baseline the technique used: a standalone Pass keys its draws by seed 0 and position
    b = baseline(x, kind, 2.0, mean, std, Pass(model, x, [], TOP2).input_generators(BASELINE_KEY))
    with torch.no_grad():
        logits, base_logits = model(x), model(b)
    targets = logits.topk(2, 1).indices
    gap = logits.gather(1, targets) - base_logits.gather(1, targets)  # f(x) - f(b), [N, K]
    total = attr.flatten(2).sum(2)
    assert ((total - gap).abs() <= 0.01 * gap.abs()).all(), (total, gap)
    torch.testing.assert_close(maps["input", "error"], total - gap, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps["input", "rel_error"], (total - gap).abs() / gap.abs(), atol=1e-4, rtol=1e-3)
    assert (maps["input", "rel_error"] < 0.01).all()


def test_ig_of_a_linear_model_is_input_minus_baseline_times_weight():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).eval()
    x = normalised(2, 3, 6, 6)
    for method in ("riemann", "gauss_legendre"):
        maps = make("integrated_gradients", steps=3, method=method, mean=MEAN, std=STD).attribute(
            lin, x, [], TargetSpec.parse("1")).maps
        black = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
        expected = (x - black) * lin[1].weight[1].view(1, 3, 6, 6)
        torch.testing.assert_close(maps["input", "attr"][:, 0], expected.detach())


def test_ig_baselines():
    x = normalised(2, 3, 10, 10)
    g = [torch.Generator().manual_seed(n) for n in range(2)]
    black = baseline(x, "black", 1.0, MEAN, STD, g)
    torch.testing.assert_close(black * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1),
                               torch.zeros_like(x))  # pixel 0 in every channel
    assert torch.equal(baseline(x, "black", 1.0, None, None, g), x.amin((2, 3), keepdim=True).expand_as(x))
    pixels = baseline(x, "noise", 1.0, MEAN, STD, g) * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.std() > 0.2
    blurred = gaussian_blur(x, 1.5)
    torch.testing.assert_close(blurred.mean((2, 3)), x.mean((2, 3)), atol=0.1, rtol=0)  # replicated edges
    assert blurred.std() < x.std()
    flat = torch.full((1, 3, 2, 5, 5), 0.7)  # clip [N, C, T, H, W]: each frame blurred alone
    torch.testing.assert_close(gaussian_blur(flat, 3.0), flat)
    with pytest.raises(ValueError, match="baseline"):
        make("integrated_gradients", baseline="white")
    with pytest.raises(ValueError, match="mean and std"):
        make("integrated_gradients", mean=MEAN)


# -- SmoothGrad ------------------------------------------------------------------------------
def test_smoothgrad_without_noise_is_the_vanilla_gradient():
    model, x = tiny_net(), torch.rand(2, 3, 16, 16)
    vanilla = make("saliency").attribute(model, x, [], TOP2).maps
    smooth = make("smoothgrad", samples=3, noise=0.0).attribute(model, x, [], TOP2).maps
    torch.testing.assert_close(smooth["input", "grad"], vanilla["input", "grad"])
    torch.testing.assert_close(smooth["input", "maxabs"], vanilla["input", "maxabs"])
    squared = make("smoothgrad", samples=2, noise=0.0, squared=True).attribute(model, x, [], TOP2).maps
    torch.testing.assert_close(squared["input", "grad"], vanilla["input", "grad"].square())


def test_smoothgrad_noise_is_relative_to_each_inputs_range():
    """A model that rescales its input sees the same noisy copies: the maps scale back exactly."""
    model, x = tiny_net(), torch.rand(2, 3, 8, 8)
    scaled = nn.Sequential(Scale(0.01), model).eval()
    a = make("smoothgrad", samples=4, noise=0.2).attribute(model, x, [], TOP2).maps["input", "grad"]
    b = make("smoothgrad", samples=4, noise=0.2).attribute(scaled, x * 100, [], TOP2).maps["input", "grad"]
    torch.testing.assert_close(b * 100, a, atol=1e-5, rtol=1e-4)
    vanilla = make("saliency").attribute(model, x, [], TOP2).maps["input", "grad"]
    assert (a - vanilla).abs().max() > 0.05 * vanilla.abs().max()  # the noise did something


class Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


# -- batching: max_batch 1 and 64 give the same maps, and no forward is larger -------------------
@pytest.mark.parametrize("name,options", [
    ("smoothgrad", dict(samples=3, noise=0.2)),
    ("integrated_gradients", dict(steps=4, baseline="noise")),
    ("occlusion", dict(window=6, stride=5, incremental=False)),  # model(rows) counted; incremental: test_incremental
])
def test_small_max_batch_gives_the_same_maps(name, options):
    x = torch.rand(2, 3, 16, 16)
    results = {}
    for max_batch in (1, 5, 64):
        model = CountForwards(tiny_net()).eval()
        results[max_batch] = make(name, **options).attribute(model, x, [], TOP2, max_batch=max_batch).maps
        rows = model.sizes[1:]  # after the Pass's own forward of the batch
        assert max(rows) <= max_batch and (max_batch == 1 or len(rows) < sum(rows))
    for key, value in results[64].items():
        torch.testing.assert_close(results[1][key], value, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(results[5][key], value, atol=1e-5, rtol=1e-4)


def test_random_draws_follow_the_seed():
    model, x = tiny_net(), torch.rand(2, 3, 16, 16)
    run = lambda seed: make("smoothgrad", samples=2).attribute(
        model, x, [], TOP2, shared=Pass(model, x, [], TOP2, seed=seed)).maps["input", "grad"]
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


# -- occlusion -------------------------------------------------------------------------------
class BoxNet(nn.Module):
    """Class 0 = sum of the input inside rows 4..9, cols 10..15 of a 20x20 input; class 1 = its negative."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(1, 3, 20, 20)
        mask[..., 4:10, 10:16] = 1
        self.register_buffer("mask", mask)

    def forward(self, x):
        s = (x * self.mask).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_occlusion_puts_its_mass_on_the_region_the_score_depends_on():
    x = torch.rand(2, 3, 20, 20) + 0.5
    drop = make("occlusion", window=4, stride=2).attribute(BoxNet().eval(), x, [], TargetSpec.parse("0")).maps
    drop = drop["input", "drop"][:, 0]  # [N, 20, 20]
    assert drop.shape == (2, 20, 20) and (drop >= -1e-5).all()
    reach = torch.zeros(20, 20, dtype=torch.bool)
    reach[4 - 3:10 + 3, 10 - 3:16 + 3] = True  # the box grown by what a 4 px window covering it reaches
    assert drop[:, ~reach].abs().max() < 1e-5 and drop[:, 4:10, 10:16].min() > 0
    assert drop[:, 6:8, 12:14].mean() > drop[:, reach].mean()  # the box's core beats its fringe


def hand_occlusion(model, x, target, window, stride, fill, frames=0):
    """The definition, one window at a time, for one input x [C, (T,) H, W]: the mean drop of the
    windows covering each position (a 2D input is a clip of one frame)."""
    C, T, H, W = x.shape if x.dim() == 4 else (x.shape[0], 1, *x.shape[1:])
    total, count = torch.zeros(T, H, W), torch.zeros(T, H, W)
    tw = frames or T
    with torch.no_grad():
        f = model(x[None])[0, target]
        for t0 in sorted({*range(0, T - tw + 1, tw), T - tw}):
            for i in sorted({*range(0, H - window + 1, stride), H - window}):
                for j in sorted({*range(0, W - window + 1, stride), W - window}):
                    box = (slice(t0, t0 + tw), slice(i, i + window), slice(j, j + window))
                    occluded = x.clone()
                    occluded.view(C, T, H, W)[(slice(None),) + box] = fill
                    total[box] += f - model(occluded[None])[0, target]
                    count[box] += 1
    out = total / count
    return out if x.dim() == 4 else out[0]


def test_occlusion_equals_a_hand_loop_over_windows():
    model, x = tiny_net(), torch.rand(2, 3, 8, 8)
    maps = make("occlusion", window=4, stride=3, fill=0.3).attribute(model, x, [], TOP2, max_batch=7)
    targets = maps.targets
    drop = maps.maps["input", "drop"]
    assert drop.shape == (2, 2, 8, 8)
    for n in range(2):
        for k in range(2):
            expected = hand_occlusion(model, x[n], int(targets[n, k]), 4, 3, 0.3)
            torch.testing.assert_close(drop[n, k], expected, atol=1e-5, rtol=1e-4)


# -- clips [N, C, T, H, W]: per-frame maps --------------------------------------------------------
def test_clips_give_per_frame_maps():
    model, x = SmoothNet(video=True), torch.rand(2, 3, 4, 8, 8)
    sal = make("saliency").attribute(model, x, [], TOP2).maps["input", "grad"]
    sg = make("smoothgrad", samples=2, noise=0.0).attribute(model, x, [], TOP2).maps
    torch.testing.assert_close(sg["input", "grad"], sal)
    assert sg["input", "maxabs"].shape == (2, 2, 4, 8, 8)
    ig = make("integrated_gradients", steps=64, method="gauss_legendre", baseline="blur", sigma=1.0)
    maps = ig.attribute(model, x, [], TOP2).maps
    assert maps["input", "attr"].shape == (2, 2, 3, 4, 8, 8) and maps["input", "maxabs"].shape == (2, 2, 4, 8, 8)
    assert (maps["input", "rel_error"] < 0.01).all()
    result = make("occlusion", window=4, stride=4, frames=3).attribute(model, x, [], TOP2)
    drop = result.maps["input", "drop"]
    assert drop.shape == (2, 2, 4, 8, 8)
    expected = hand_occlusion(model, x[1], int(result.targets[1, 0]), 4, 4, 0.0, frames=3)
    torch.testing.assert_close(drop[1, 0], expected, atol=1e-5, rtol=1e-4)
    whole = make("occlusion", window=4, stride=4).attribute(model, x, [], TOP2).maps["input", "drop"]
    assert torch.equal(whole, whole[:, :, :1].expand_as(whole))  # windows span the clip: same map per frame


# -- configs ---------------------------------------------------------------------------------
def test_yaml_configs_compose_and_build(make_cfg):
    cfg = make_cfg("technique=[smoothgrad,integrated_gradients,occlusion]",
                   "technique.integrated_gradients.method=gauss_legendre", "model.mean=[0.1,0.2,0.3]")
    assert list(cfg.technique) == ["smoothgrad", "integrated_gradients", "occlusion"]
    built = {name: get_technique(name)(**OmegaConf.to_container(options, resolve=True))
             for name, options in cfg.technique.items()}
    assert built["smoothgrad"].options.samples == 25 and built["smoothgrad"].options.noise == 0.15
    ig = built["integrated_gradients"].options
    assert (ig.steps, ig.method, ig.baseline) == (32, "gauss_legendre", "black")
    assert ig.mean is None  # filled by setup() from the model's resolved preprocessing
    from pipeline.models import build_model

    loaded = build_model(cfg.model)
    built["integrated_gradients"].setup(loaded)
    assert ig.mean == pytest.approx([0.1, 0.2, 0.3]) and ig.std == pytest.approx(list(loaded.preprocess.std))
    assert (built["occlusion"].options.window, built["occlusion"].options.fill) == (32, 0.0)
    with pytest.raises(Exception, match="samples"):
        make_cfg("technique=smoothgrad", "technique.smoothgrad.samples=many")
