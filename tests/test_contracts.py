"""Typed contracts (pipeline.contracts): shapes and their grammar, every technique's declared
outputs against what it really returns (images, clips, data-free), Draw, and registration refusing
untyped declarations."""
import numpy as np
import pytest
import torch

from pipeline.contracts import Display, Draw, Family, Kind, Output, Scale, parse_shape, shape_variants
from pipeline.io.render import CLIP_DRAWERS, IMAGE_DRAWERS
from pipeline.models import Preprocess, probe_shapes
from pipeline.targets import TargetSpec
from pipeline.techniques import REGISTRY, Technique, get_technique, register
from tests.tinymodels import TinyNet3D, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster on shared cores

SMALL = dict(steps=2, channels="0-1", classes="0,1", size=16, samples=2, top=2)  # options that keep runs short
N, K, S, T = 2, 3, 16, 4  # inputs, targets (topk:3), input side, clip frames


def small(name, **extra):
    cls = get_technique(name)
    return cls(**{k: v for k, v in {**SMALL, **extra}.items() if k in cls.Options.__dataclass_fields__})


def check_maps(technique, maps, bound, layer_sizes=None):
    """Every returned output is declared and fits its declared shape and dtype; the symbols bind
    to `bound`, to `layer_sizes(layer)` and consistently across one layer's outputs."""
    assert maps, f"{technique.name} returned nothing"
    per_layer = {}
    for (layer, output), m in maps.items():
        assert output in technique.outputs, f"{technique.name}: {layer}/{output} is not declared"
        decl = technique.outputs[output]
        shape = (len(m),) if isinstance(m, list) else tuple(m.shape)
        sizes = per_layer.setdefault(layer, {**bound, **(layer_sizes(layer) if layer_sizes else {})})
        got = decl.match(shape, sizes)
        assert got is not None, f"{technique.name}: {layer}/{output} is {list(shape)}, declared {decl.shape} with {sizes}"
        sizes.update(got)
        if decl.dtype == "str":
            assert isinstance(m, list) and all(isinstance(v, str) for v in m), (layer, output)
        elif decl.dtype:
            assert str(m.dtype) == f"torch.{decl.dtype}", (layer, output, m.dtype)
        else:
            assert m.is_floating_point(), (layer, output, m.dtype)


def spatial_sizes(model, side):
    """layer -> {h, w} of its output for a [1, 3, side, side] input ("input" -> the input's)."""
    shapes = {**probe_shapes(model, side), "input": (1, 3, side, side)}
    return lambda layer: dict(zip(("h", "w"), shapes[layer][-2:])) if len(shapes[layer]) == 4 else {}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_declared_shapes_match_what_every_technique_returns_on_images(name, tmp_path):
    model, cls = tiny_net(), get_technique(name)
    if not cls.uses_data:  # data-free: generate() once, M rows per layer
        technique = small(name)
        layers = ["conv1", "conv2"] if name == "kernels" else (["relu1", "conv2"] if cls.uses_layers else [])
        maps = technique.generate(model, layers, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                  max_batch=8, preprocess=Preprocess(S, S, "area", (0.5,) * 3, (0.5,) * 3))
        check_maps(technique, maps, {"S": S} if name != "kernels" else {})
        return
    technique = small(name, cache_dir=str(tmp_path))
    x = torch.rand(N, 3, S, S)
    sizes = spatial_sizes(model, S)
    if cls.attention:  # attention weights: a tiny ViT (4 x 4 patches), maps on its patch grid
        from tests.tinyvit import tiny_vit

        model, sizes = tiny_vit(img_size=S), lambda layer: {"h": S // 4, "w": S // 4}
    result = technique.attribute(model, x, ["relu1", "conv2"], TargetSpec.parse(f"topk:{K}"))
    check_maps(technique, result.maps, {"N": N, "K": K, "H": S, "W": S}, sizes)
    assert isinstance(technique.draw(), Draw)


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if c.uses_data and c.video))
def test_declared_shapes_match_what_every_video_technique_returns_on_clips(name):
    technique = small(name)
    x = torch.rand(N, 3, T, S, S)
    result = technique.attribute(TinyNet3D().eval(), x, ["relu1", "relu2"], TargetSpec.parse(f"topk:{K}"))
    # h, w stay free: a 3D layer's CAM is resized to the clip
    check_maps(technique, result.maps, {"N": N, "K": K, "T": T, "H": S, "W": S})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_declaration_is_typed_and_per_input_outputs_lead_with_N(name):
    cls = get_technique(name)
    assert isinstance(cls.family, Family) and cls.outputs
    for output, decl in {**cls.outputs, **cls.summary_outputs}.items():
        assert isinstance(decl, Output) and isinstance(decl.kind, Kind), (name, output)
    lead = "N" if cls.uses_data else "M"
    for output, decl in cls.outputs.items():
        assert all(dims[0] == lead for dims in shape_variants(decl.shape)), (name, output, decl.shape)
    assert cls.has_summary == bool(cls.summary_outputs)
    if not cls.uses_data:  # render_gallery reads the gallery by this name
        assert cls.outputs_of(Kind.GALLERY) == ("images",)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_renderer_draws_every_drawn_kind_at_its_declared_rank(name):
    """One input's map has the declared rank minus the batch axis; clips are the shapes with T."""
    for output, decl in get_technique(name).outputs.items():
        if decl.kind in (Kind.DATA, Kind.GALLERY, Kind.RF) or "..." in decl.shape:
            continue  # stored only; drawn by render_gallery / rf_rows; any rank
        for dims in shape_variants(decl.shape):
            drawers = CLIP_DRAWERS if "T" in dims else IMAGE_DRAWERS
            assert drawers[decl.kind][0] == len(dims) - 1, (name, output, dims)


def test_erf_summary_matches_its_declaration_and_merge_recomputes_exactly_it():
    technique = get_technique("erf")()
    result = technique.attribute(tiny_net(), torch.rand(N, 3, S, S), ["relu1", "conv2"], TargetSpec.parse("pred"))
    rows = {key: m.numpy() for key, m in result.maps.items()}
    summary = technique.summarize(rows)
    for (layer, output), a in summary.items():
        decl = technique.summary_outputs[output]
        assert decl.match(a.shape, {"H": S, "W": S}) is not None, (layer, output, a.shape)
        assert (decl.dtype or "float32") == str(a.dtype)
    assert {output for _, output in summary} == set(technique.summary_outputs)


# -- the shape grammar ------------------------------------------------------------------------
def test_shapes_parse_into_required_and_optional_groups():
    assert parse_shape("[N, K, (T,) h, w]") == [(("N",), False), (("K",), False), (("T",), True),
                                                (("h",), False), (("w",), False)]
    assert shape_variants("[N, (T,) 3]") == [("N", "T", "3"), ("N", "3")]
    assert shape_variants("[N, C, ...]") == [("N", "C", "...")]
    for bad in ["N, K", "[N, (T]", "[..., N]", "[N, K!]", "[N, ()]", "[N, (...)]"]:
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)
    with pytest.raises(ValueError):
        Output(Kind.DATA, "[N,")


def test_a_shape_binds_its_symbols_and_refuses_what_does_not_fit():
    cam = Output(Kind.HEATMAP, "[N, K, (T,) h, w]")
    assert cam.match((2, 3, 8, 8), {"N": 2}) == {"N": 2, "K": 3, "h": 8, "w": 8}
    assert cam.match((2, 3, 4, 8, 8), {"N": 2, "K": 3}) == {"N": 2, "K": 3, "T": 4, "h": 8, "w": 8}
    assert cam.match((3, 3, 8, 8), {"N": 2}) is None  # another batch
    assert cam.match((2, 3, 8), {}) is None and cam.match((2, 3, 4, 5, 8, 8), {}) is None  # rank
    assert Output(Kind.TILES, "[N, top, 3, S, S]").match((2, 4, 3, 16, 15)) is None  # S twice
    assert Output(Kind.IMAGE, "[N, 3, H, W]").match((2, 1, 16, 16)) is None  # the literal 3
    many = Output(Kind.CHANNELS, "[N, C, ...]")
    assert many.match((2, 8)) == {"N": 2, "C": 8} and many.match((2, 8, 4, 4, 4)) is not None
    assert many.match((2,)) is None


def test_kinds_are_a_str_enum_that_reads_as_its_value():
    assert Kind("heatmap") is Kind.HEATMAP and Kind.RF == "rf"
    assert str(Kind.GRADIENT) == "gradient" and f"{Kind.TILES}" == "tiles" and f"{Family.CAM:>5}" == "  cam"
    assert Output("heatmap", "[N, K, h, w]").kind is Kind.HEATMAP  # a name is read as its Kind
    with pytest.raises(ValueError):
        Kind("heatmp")


def test_draw_reads_option_strings_as_members_and_refuses_others():
    draw = Draw("weighted", "fraction", {"conv1": "RF 3"}, [[0, 0, 4, 4]])
    assert draw.display is Display.WEIGHTED and draw.scale is Scale.FRACTION and draw.crop_boxes == ([0, 0, 4, 4],)
    assert Draw().display is Display.HEATMAP and Draw().scale is Scale.MAX and not Draw().layer_boxes
    with pytest.raises(ValueError):
        Draw(display="pie")


def test_rf_techniques_draw_their_crops_and_layer_boxes():
    x = torch.rand(1, 3, S, S)
    forward = get_technique("rf_forward")(crop=[2, 2, 4, 4], display="weighted")
    forward.attribute(tiny_net(), x, ["conv2"], TargetSpec.parse("pred"))
    draw = forward.draw()
    assert draw.crop_boxes == ([2, 2, 4, 4],) and draw.display is Display.WEIGHTED and draw.scale is Scale.FRACTION
    assert set(draw.labels) == {"conv1", "conv2"} and not draw.layer_boxes
    erf = get_technique("erf")()
    erf.check_model(tiny_net(), ["conv2"])
    erf.attribute(tiny_net(), x, ["conv2"], TargetSpec.parse("pred"))
    assert set(erf.draw().layer_boxes) == {"conv2"} and erf.draw().scale is Scale.MAX and not erf.draw().crop_boxes


# -- registration refuses untyped declarations ----------------------------------------------------
def test_register_refuses_outputs_that_are_not_declared_as_Output():
    class Strings(Technique):
        family = Family.CAM
        outputs = {"cam": "heatmap"}

    class NoFamily(Technique):
        outputs = {"cam": Output(Kind.HEATMAP, "[N, K, h, w]")}

    class NoOptions(Technique):
        family = Family.CAM
        outputs = {"cam": Output(Kind.HEATMAP, "[N, K, h, w]")}
        Options = dict

    for cls, message in [(Strings, "Output"), (NoFamily, "family"), (NoOptions, "Options")]:
        with pytest.raises(TypeError, match=message):
            register("contracts_test_technique")(cls)
    assert "contracts_test_technique" not in REGISTRY


def test_runner_side_helpers_read_the_declaration():
    ig = get_technique("integrated_gradients")
    assert ig.kinds() == {"attr": Kind.GRADIENT, "maxabs": Kind.HEATMAP, "error": Kind.DATA, "rel_error": Kind.DATA}
    assert ig.outputs_of(Kind.HEATMAP) == ("maxabs",) and get_technique("kernels").outputs_of(Kind.HEATMAP) == ()
    assert np.all([isinstance(k, Kind) for c in REGISTRY.values() for k in c.kinds().values()])
