"""Token and channels-last layers read as maps without a reshape function (pipeline.layouts)."""
import numpy as np
import pytest
import timm
import torch
from torch import nn

from pipeline.hooks import hook_count
from pipeline.layouts import NCHW, Layout, detect
from pipeline.models import default_layer, probe_shapes
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique

PRED = TargetSpec.parse("pred")


def tiny_vit(**kw):
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2,
                                                            num_heads=2, num_classes=10, **kw).eval()


class ChannelsLast(nn.Module):
    """conv -> to NHWC -> LayerNorm over channels (NHWC output) -> back to NCHW -> relu -> pool -> fc."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(6)
        self.back = Permute(0, 3, 1, 2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = self.ln(self.conv(x).permute(0, 2, 3, 1))  # [N, h, w, C]
        return self.fc(torch.relu(self.back(y)).mean((2, 3)))


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


def hand_gradcam(model, x, module, to_maps):
    """Grad-CAM as a user writes it with a reshape_transform (pytorch-grad-cam's recipe)."""
    got = {}

    def hook(mod, inputs, out):
        out.retain_grad()
        got["out"] = out

    handle = module.register_forward_hook(hook)
    try:
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        handle.remove()
    acts, grads = to_maps(got["out"].detach()), to_maps(got["out"].grad)
    return torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))  # [N, 1, h, w]


def test_gradcam_on_vit_tokens_equals_the_hand_reshape():
    model, x = tiny_vit(), torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = get_technique("gradcam")().attribute(model, x, ["blocks.1.norm1"], PRED).maps["blocks.1.norm1", "cam"]

    def reshape(t):  # drop the class token, 16 tokens -> 4 x 4, channels first
        return t[:, 1:].reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    want = hand_gradcam(model, x.clone(), model.blocks[1].norm1, reshape)
    assert ours.shape == (3, 1, 4, 4) and float(want.abs().max()) > 0
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    assert hook_count(model) == 0


@pytest.mark.parametrize("name", ["gradcam", "ablationcam", "scorecam", "eigencam", "activations",
                                  "channel_relevance", "dataset_examples"])
def test_a_channels_last_layer_gives_the_maps_of_its_nchw_twin(name):
    """`ln` outputs [N, h, w, C]; `back` outputs the same values as [N, C, h, w]: every technique
    must give the same maps on both (Ablation-CAM zeroes the channel axis, wherever it is)."""
    model, x = ChannelsLast().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    technique = get_technique(name)()
    a = technique.attribute(model, x, ["ln"], PRED).maps
    b = technique.attribute(model, x, ["back"], PRED).maps
    for (layer, output), value in a.items():
        torch.testing.assert_close(value, b["back", output], rtol=1e-5, atol=1e-6)
    assert hook_count(model) == 0


def test_ablation_on_tokens_zeroes_a_channel_of_the_grid_only():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ours = get_technique("ablationcam")().attribute(model, x, ["blocks.1.norm1"], PRED).maps["blocks.1.norm1", "cam"]
    with torch.no_grad():
        logits = model(x)
        target = logits.argmax(1)
        y = logits.gather(1, target[:, None])[:, 0]
        captured = {}
        h = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("a", o.clone()))
        model(x)
        h.remove()
        acts = captured["a"][:, 1:].reshape(2, 4, 4, 16).permute(0, 3, 1, 2)  # [N, C, 4, 4]
        weights = torch.empty(2, 16)
        for c in range(16):
            def zero(m, i, o, c=c):
                o = o.clone()
                o[:, 1:, c] = 0  # the grid tokens' channel c; the class token kept
                return o
            h = model.blocks[1].norm1.register_forward_hook(zero)
            yc = model(x).gather(1, target[:, None])[:, 0]
            h.remove()
            weights[:, c] = (y - yc) / y
        want = torch.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-6)


def test_layouts_are_found_from_the_model_and_the_shape():
    vit = tiny_vit()
    assert detect((1, 17, 16), (32, 32), vit) == Layout("tokens", 1, (4, 4))
    assert detect((1, 16, 16), (32, 32), vit) == Layout("tokens", 0, (4, 4))  # patch_embed: no class token yet
    assert detect((1, 56, 56, 96), (224, 224)) == Layout("nhwc")
    assert detect((1, 96, 56, 56), (224, 224)) is NCHW
    assert detect((1, 7, 7, 7), (224, 224)) is NCHW  # ambiguous: read as it is (layout=nhwc forces)
    assert detect((1, 17, 16), (32, 32)) is NCHW  # no stated grid: tokens only when forced
    assert detect((1, 5 + 12 * 16, 24), (96, 128), override="tokens") == Layout("tokens", 5, (12, 16))  # registers
    assert Layout("tokens", 5, (12, 16)).map_shape((1, 197, 24)) == (1, 24, 12, 16)
    with pytest.raises(ValueError, match="cannot be read as layout=tokens"):
        detect((1, 64, 7, 7), (224, 224), override="tokens")
    with pytest.raises(ValueError, match="expected one of"):
        detect((1, 17, 16), (32, 32), override="tokenz")


def test_vit_family_default_layers_are_the_tokens_entering_the_last_attention():
    import torchvision

    vit = tiny_vit()
    assert default_layer(vit, probe_shapes(vit, 32), (32, 32)) == "blocks.1.norm1"
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                              mlp_dim=32, num_classes=10).eval()
    torch.nn.init.normal_(tv.heads.head.weight)  # torchvision starts the head at zero: no gradient at all
    layer = default_layer(tv, probe_shapes(tv, 32), (32, 32))
    assert layer == "encoder.layers.encoder_layer_1.ln_1"
    cam = get_technique("gradcam")().attribute(tv, torch.randn(2, 3, 32, 32), [layer], PRED).maps[layer, "cam"]
    assert cam.shape == (2, 1, 4, 4) and float(cam.abs().sum()) > 0
    cnn = ChannelsLast().eval()
    assert default_layer(cnn, probe_shapes(cnn, 16), (16, 16)) == "back"  # the last map, ln read as maps too


VIT = ["model=timm", "model.name=vit_tiny_patch16_224", "model.pretrained=false"]


def test_a_vit_runs_end_to_end_on_its_default_layer(make_cfg, tmp_path):
    """No layers, no reshape: timm's ViT-Tiny (random weights) on two sample photos, Grad-CAM on
    the tokens entering the last attention, stored as 14 x 14 maps and drawn; the listing shows
    the grid."""
    from pipeline.layers import layer_table
    from pipeline.runner import run
    from pipeline.store import open_run

    run(make_cfg(*VIT, "technique=gradcam", "data.limit=2", "num_workers=0"), tmp_path / "run")
    with open_run(tmp_path / "run") as r:
        assert r.maps("gradcam")["blocks.11.norm1", "cam"].shape == (2, 1, 14, 14)
    assert len(list((tmp_path / "run").rglob("*.png"))) >= 2
    table = layer_table(make_cfg(*VIT))
    assert "tokens 1+14x14" in table and "default layers: ['blocks.11.norm1']" in table


def test_techniques_that_read_layers_otherwise_refuse_tokens_before_work(make_cfg, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.runner import run

    with pytest.raises(ConfigError, match="erf reads layers as \\[N, C, h, w\\] only, and blocks.11.norm1 is tokens 1\\+14x14"):
        run(make_cfg(*VIT, "technique=erf", "data.limit=1"), tmp_path / "erf")
    with pytest.raises(ConfigError, match="layout='tokenz'"):
        run(make_cfg(*VIT, "technique=gradcam", "layout=tokenz"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot be read as layout=nhwc"):
        run(make_cfg(*VIT, "technique=gradcam", "layout=nhwc"), tmp_path / "nhwc")
    assert not (tmp_path / "erf" / "maps.h5").exists()


def test_dataset_examples_on_vit_tokens_keep_whole_input_patches(make_cfg, tmp_path, caplog):
    """Scores and argmax on the 14 x 14 token grid; tokens have no per-position receptive field,
    so the patches are the whole inputs (a warning says so), and the run finishes its summary."""
    from pipeline.runner import run
    from pipeline.store import open_run

    cfg = make_cfg(*VIT, "technique=dataset_examples", "technique.dataset_examples.channels=0-3",
                   "technique.dataset_examples.top=2", "data.limit=3", "num_workers=0", "render.png=false")
    with caplog.at_level("WARNING"):
        run(cfg, tmp_path / "run")
    assert "blocks.11.norm1 not [N, C, h, w] (tokens 1+14x14): their patches are whole inputs" in caplog.text
    with open_run(tmp_path / "run") as r:
        got = r.summary("dataset_examples")
        assert got["blocks.11.norm1", "top_ids"].shape == (4, 2)
        assert (np.asarray(got["blocks.11.norm1", "top_argmax"]) < 14).all()
        assert got["blocks.11.norm1", "top_patches"].shape[:2] == (4, 2)


def test_a_traced_graph_that_cannot_run_is_a_graph_error():
    """timm's ViT traces, but its traced SDPA call cannot run (is_causal left a proxy): the
    receptive-field machinery says so as a GraphError, which every caller already handles
    (no receptive fields in the listing, whole-input patches, a refusal), not a TypeError."""
    from pipeline.rf import GraphError
    from pipeline.rf.graph import SupportGraph

    with pytest.raises(GraphError, match="cannot run node scaled_dot_product_attention"):
        SupportGraph(tiny_vit(), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("objective", ["channel", "neuron"])
def test_filter_vis_on_a_channels_last_layer_equals_its_nchw_twin(objective):
    """The objective reads `ln` ([N, h, w, C]) as maps: the images and objectives equal those for
    `back` (the same values as [N, C, h, w]), for the mean over positions and the centre neuron.
    Random starts and warps are keyed by the layer's name, so both start grey and are not warped."""
    model = ChannelsLast().eval()
    technique = get_technique("filter_vis")(channels="0-3", size=16, steps=3, objective=objective, init_sd=0.0,
                                            jitter=0, scales=[1.0], degrees=[0.0])
    made = {layer: technique.generate(model, [layer], device=torch.device("cpu"),
                                      generator=torch.Generator().manual_seed(0), max_batch=4)
            for layer in ("ln", "back")}
    torch.testing.assert_close(made["ln"]["ln", "objective"], made["back"]["back", "objective"], rtol=1e-5, atol=1e-6)
    assert (made["ln"]["ln", "images"].int() - made["back"]["back", "images"].int()).abs().max() <= 1
    assert hook_count(model) == 0


def test_top_activated_on_vit_tokens_end_to_end(make_cfg, tmp_path):
    """The top channels of the token grid and their filter images, optimized through the same
    token reading at the ViT's own input size; a size the ViT cannot take is refused before work."""
    from pipeline.config import ConfigError
    from pipeline.runner import run
    from pipeline.store import open_run

    common = [*VIT, "technique=top_activated", "technique.top_activated.top=2", "technique.top_activated.steps=2",
              f"technique.top_activated.cache_dir={tmp_path / 'cache'}", "data.limit=2", "num_workers=0"]
    with pytest.raises(ConfigError, match="top_activated: the model cannot take 64 x 64 images up to blocks.11.norm1"):
        run(make_cfg(*common), tmp_path / "small")
    assert not (tmp_path / "small" / "maps.h5").exists()
    run(make_cfg(*common, "technique.top_activated.size=224"), tmp_path / "run")
    with open_run(tmp_path / "run") as r:
        got = r.maps("top_activated")
        channels, images = np.asarray(got["blocks.11.norm1", "channels"]), np.asarray(got["blocks.11.norm1", "images"])
    assert channels.shape == (2, 2) and (channels < 192).all() and images.shape == (2, 2, 3, 224, 224)
    assert len(list((tmp_path / "cache").rglob("*.png"))) == len(np.unique(channels))
