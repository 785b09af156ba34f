"""Feature visualization: objectives, parameterizations, filter_vis and class_vis (CPU, fast)."""
import h5py
import pytest
import torch
from torch import nn

from pipeline.featvis import objectives as O
from pipeline.featvis import params as P
from pipeline.featvis import transforms as T
from pipeline.hooks import hook_count
from pipeline.models import Preprocess
from pipeline.runner import run
from pipeline.techniques import get_technique
from pipeline.techniques.filter_vis import parse_channels
from tests.conftest import tiny_overrides
from tests.tinymodels import TinyNet, tiny_net

CPU = torch.device("cpu")
PRE = Preprocess(16, 16, "area", (0.5,) * 3, (0.5,) * 3)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on shared cores


def generate(name, model, layers, seed=0, max_batch=8, class_names=None, **options):
    return get_technique(name)(**options).generate(
        model, layers, device=CPU, generator=torch.Generator().manual_seed(seed), max_batch=max_batch,
        class_names=class_names, preprocess=PRE)


# -- objectives, parameterizations, transforms ------------------------------------------------
def test_objectives_compose_and_take_one_channel_per_row():
    acts = {"a": torch.randn(3, 4, 5, 5)}
    logits, image = torch.randn(3, 6), torch.rand(3, 3, 8, 8)
    ch, pen = O.channel("a", 2), O.l2()
    torch.testing.assert_close((ch + 0.1 * pen)(acts, logits, image), ch(acts, logits, image) + 0.1 * pen(acts, logits, image))
    torch.testing.assert_close((ch - pen)(acts, logits, image), ch(acts, logits, image) - pen(acts, logits, image))
    torch.testing.assert_close((-ch)(acts, logits, image), -acts["a"][:, 2].mean((1, 2)))
    assert (ch + pen).layers == ("a",) and sum([ch, pen]).layers == ("a",)
    ids = torch.tensor([3, 0, 1])
    torch.testing.assert_close(O.channel("a", ids)(acts, logits, image), acts["a"][torch.arange(3), ids].mean((1, 2)))
    torch.testing.assert_close(O.neuron("a", ids)(acts, logits, image), acts["a"][torch.arange(3), ids, 2, 2])
    torch.testing.assert_close(O.class_logit(ids)(acts, logits, image), logits[torch.arange(3), ids])
    assert (O.l1()(acts, logits, image) <= 0).all() and (O.total_variation()(acts, logits, image) <= 0).all()
    assert torch.equal(O.l2()(acts, logits, torch.full((1, 3, 4, 4), 0.5)), torch.zeros(1))


@pytest.mark.parametrize("kind", ["pixel", "fourier"])
def test_parameterizations_give_images_in_unit_range_and_invert(kind):
    params, image_fn = P.make(kind, 2, 12, torch.Generator().manual_seed(0), CPU, sd=1.0)
    assert all(p.requires_grad and p.is_leaf for p in params)
    image = image_fn()
    assert image.shape == (2, 3, 12, 12) and image.min() >= 0 and image.max() <= 1
    _, again = P.from_image(kind, image.detach())
    torch.testing.assert_close(again(), image.detach(), atol=2e-3, rtol=0)


def test_fourier_decorrelation_round_trips_and_rows_use_their_own_generator():
    t = torch.randn(2, 3, 5, 7)
    assert P.decorrelate(t).shape == t.shape
    torch.testing.assert_close(P.correlate_inverse(P.decorrelate(t)), t, atol=1e-5, rtol=0)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = P.fourier(2, 8, gens, CPU)[1]()
    second = P.fourier(1, 8, [torch.Generator().manual_seed(2)], CPU)[1]()
    torch.testing.assert_close(both[1:], second)


def test_transforms_keep_the_shape_and_follow_the_generator():
    t = T.compose(T.jitter(2), T.random_scale([0.9, 1.1]), T.random_rotate([-10, 10]))
    x = torch.rand(3, 3, 10, 10)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]  # noqa: E731
    a, b = t(x, gens()), t(x, gens())
    assert a.shape == x.shape and torch.equal(a, b)
    alone = t(x[1:2], [torch.Generator().manual_seed(4)])  # a row's warp depends on its generator only
    torch.testing.assert_close(alone, a[1:2])
    shifted = T.jitter(1)(x, [torch.Generator().manual_seed(0) for _ in range(3)])
    dy, dx = torch.randint(-1, 2, (2,), generator=torch.Generator().manual_seed(0)).tolist()
    inner = shifted[:, :, 1:-1, 1:-1]  # away from the reflected border, a whole-pixel shift is exact
    torch.testing.assert_close(inner, x[:, :, 1 - dy:9 - dy, 1 - dx:9 - dx])


def test_parse_channels():
    assert parse_channels("0-3,7,9") == [0, 1, 2, 3, 7, 9]
    assert parse_channels("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="has 8 channels"):
        parse_channels("6-8", 8)
    with pytest.raises(ValueError, match="expected all"):
        parse_channels("a-b")


# -- filter_vis ---------------------------------------------------------------------------------
def test_filter_vis_raises_the_channel_activation_and_leaves_the_model_alone():
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = generate("filter_vis", model, ["relu1"], channels="0,1,3,7", param="pixel", size=16, steps=40,
                   lr=0.1, jitter=2, scales=[1.0, 0.95, 1.05], init_sd=0.5)
    images, index, objective = out["relu1", "images"], out["relu1", "index"], out["relu1", "objective"]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 16, 16)
    assert index.tolist() == [0, 1, 3, 7] and objective.shape == (4, 40)
    assert (objective[:, 0] > 0).all() and (objective[:, -1] >= 5 * objective[:, 0]).all(), objective[:, [0, -1]]
    assert hook_count(model) == 0 and not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_filter_vis_batched_equals_one_at_a_time():
    model, opts = tiny_net(), dict(channels="0-3", size=16, steps=5, jitter=2)
    batched = generate("filter_vis", model, ["relu2"], max_batch=8, **opts)
    single = generate("filter_vis", model, ["relu2"], max_batch=1, **opts)
    a, b = batched["relu2", "images"].int(), single["relu2", "images"].int()
    assert (a - b).abs().max() <= 1 and (a == b).float().mean() > 0.99
    again = generate("filter_vis", model, ["relu2"], max_batch=8, **opts)
    assert torch.equal(again["relu2", "images"], batched["relu2", "images"])  # deterministic per seed
    assert not torch.equal(generate("filter_vis", model, ["relu2"], seed=1, **opts)["relu2", "images"], a.byte())


def test_filter_vis_preset_and_coarse_to_fine_sizes():
    technique = get_technique("filter_vis")(preset="resnet34")
    assert (technique.options.size, technique.options.upscalings, technique.options.steps) == (56, 12, 20)
    out = generate("filter_vis", tiny_net(), ["relu1"], channels="2", size=10, steps=2, upscalings=2,
                   upscale_factor=1.5, blur=3)
    assert out["relu1", "images"].shape == (1, 3, 22, 22) and out["relu1", "objective"].shape == (1, 6)


def test_filter_vis_checks_layers():
    technique = get_technique("filter_vis")(channels="0-9")
    with pytest.raises(ValueError, match="feature map"):
        technique.check_layers({"fc": (1, 10)})
    with pytest.raises(ValueError, match="has 8 channels"):
        technique.check_layers({"relu1": (1, 8, 16, 16)})
    technique.check_layers({"conv2": (1, 16, 8, 8)})
    with pytest.raises(ValueError, match="preset"):
        get_technique("filter_vis")(preset="vgg")


# -- class_vis ------------------------------------------------------------------------------------
def _colour_data(n, generator):
    """3 classes of 16 px images: a red, green or blue 6 px square on dim noise."""
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.rand(n, 3, 16, 16, generator=generator) * 0.3
    r, c = torch.randint(2, 10, (2, n, 1), generator=generator)
    ar = torch.arange(16)
    square = ((ar >= r) & (ar < r + 6))[:, :, None] & ((ar >= c) & (ar < c + 6))[:, None, :]  # [n, 16, 16]
    return x + 0.7 * square[:, None] * nn.functional.one_hot(y, 3)[:, :, None, None], y


def test_class_vis_makes_the_target_logit_the_largest():
    torch.manual_seed(0)
    model = TinyNet(num_classes=3)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        x, y = _colour_data(16, g)
        loss = nn.functional.cross_entropy(model((x - 0.5) / 0.5), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().requires_grad_(False)
    x, y = _colour_data(64, g)
    assert (model((x - 0.5) / 0.5).argmax(1) == y).float().mean() > 0.9
    # the paper's pixel recipe (no transforms): on this 16 px toy model the default Fourier recipe
    # raises each logit but does not make green's the largest (tests/test_defaults.py covers it)
    out = generate("class_vis", model, [], classes="0,green,2", class_names=["red", "green", "blue"],
                   size=16, steps=30, lr=0.1, param="pixel", jitter=0, scales=[], degrees=[])
    images = out["logits", "images"].float() / 255
    assert out["logits", "index"].tolist() == [0, 1, 2] and out["logits", "objective"].shape == (3, 30)
    assert model((images - 0.5) / 0.5).argmax(1).tolist() == [0, 1, 2]


def test_class_vis_names_are_looked_up_with_close_matches():
    technique = get_technique("class_vis")(classes="281,Egyptian cta")
    with pytest.raises(ValueError, match="Egyptian cat"):
        technique.generate(tiny_net(), [], device=CPU, generator=torch.Generator(), max_batch=4,
                           class_names=["x"] * 281 + ["tabby", "Egyptian cat"], preprocess=PRE)


# -- configs and the runner -------------------------------------------------------------------------
def test_configs_compose(make_cfg):
    cfg = make_cfg("technique=[filter_vis,class_vis]", "technique.filter_vis.channels='0-3,7'", "technique.class_vis.classes='281,Egyptian cat'")
    assert cfg.technique.filter_vis.channels == "0-3,7" and cfg.technique.filter_vis.preset is None
    assert cfg.technique.class_vis.classes == "281,Egyptian cat" and cfg.technique.class_vis.l2 == 0.01


def test_runner_writes_gallery_and_maps(make_cfg, tiny_checkpoint, image_folder, tmp_path):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[filter_vis,class_vis]",
                                   "layers=[relu1,conv2]", "technique.filter_vis.channels=0-2", "technique.filter_vis.steps=2",
                                   "technique.filter_vis.size=16", "technique.class_vis.classes='1,3'", "technique.class_vis.steps=2"))
    out = tmp_path / "out"
    run(cfg, out)
    with h5py.File(out / "maps.h5", "r") as f:
        assert f["filter_vis/relu1/images"].shape == (3, 3, 16, 16)
        assert list(f["filter_vis/conv2/index"][()]) == [0, 1, 2]
        assert f["class_vis/logits/images"].shape == (2, 3, 128, 128)  # class_vis's default size
    assert (out / "png" / "filter_vis.png").is_file() and (out / "png" / "class_vis.png").is_file()
