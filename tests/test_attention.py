"""Attention rollout and Chefer et al.'s relevance on tiny timm / torchvision ViTs, against hand
computations that recompute every block's attention from its qkv weights (no hook at all)."""
import math

import numpy as np
import pytest
import torch
import torchvision

from pipeline.attention import attention_maps, attention_modules
from pipeline.config import ConfigError
from pipeline.hooks import hook_count
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from tests.tinymodels import tiny_net
from tests.tinyvit import tiny_vit

TOP2, TOP3 = TargetSpec.parse("topk:2"), TargetSpec.parse("topk:3")
GRID = (4, 4)  # 16 x 16 input, 4 x 4 patches
# prefix tokens: the class token; class token + 2 registers; none (mean-pooled head)
VARIANTS = {"cls": ({}, 1), "registers": ({"reg_tokens": 2}, 3), "pooled": ({"class_token": False, "global_pool": "avg"}, 0)}


def inputs(n=3, side=16, seed=1):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def hand_forward(model, x):
    """(logits, [attention [N, heads, T, T] per block]) of a timm ViT, each block written out:
    softmax(q k^T / sqrt(d)) from the block's qkv weights, then attention @ v, proj, MLP."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    atts = []
    for blk in model.blocks:
        a_in = blk.norm1(h)
        B, T, C = a_in.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(a_in).reshape(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(C // heads), -1)
        atts.append(att)
        h = h + blk.ls1(blk.attn.proj((att @ v).transpose(1, 2).reshape(B, T, C)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h)), atts


def class_row(R, prefix):
    """The class token's row over the patch tokens (no prefix: the mean row) as the 4 x 4 grid."""
    row = R[0] if prefix else R.mean(0)
    return row[prefix:].reshape(GRID)


def hand_rollout(atts, prefix, fusion="mean", ratio=0.0):
    """[N, h, w] numpy, one input and one block at a time."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    out = []
    for n in range(atts[0].shape[0]):
        T = atts[0].shape[-1]
        R = np.eye(T)
        for a in atts:
            A = fuse(a[n].detach().double().numpy(), axis=0)
            drop = int(ratio * (T - 1))
            for row in range(T):  # the lowest entries of the row, the class token's column kept
                A[row, np.argsort(A[row, 1:])[:drop] + 1] = 0.0
            A = A + np.eye(T)
            R = (A / A.sum(1, keepdims=True)) @ R
        out.append(class_row(R, prefix))
    return np.stack(out)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rollout_equals_the_hand_computation_and_is_the_same_for_every_target(variant):
    kw, prefix = VARIANTS[variant]
    model, x = tiny_vit(**kw), inputs()
    assert model.num_prefix_tokens == prefix
    result = get_technique("attention_rollout")().attribute(model, x, [], TOP3)
    ours = result.maps["attention", "map"]
    with torch.no_grad():
        logits, atts = hand_forward(model, x)
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)  # the hand forward is the model's
    assert ours.shape == (3, 3, *GRID) and torch.equal(result.targets, logits.topk(3, 1).indices)
    want = torch.from_numpy(hand_rollout(atts, prefix)).float()
    for k in range(3):
        torch.testing.assert_close(ours[:, k], want, rtol=1e-5, atol=1e-6)
    assert float(want.std()) > 0  # a map, not a constant


@pytest.mark.parametrize("fusion,ratio", [("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)])
def test_head_fusion_and_discard_ratio_equal_the_hand_computation(fusion, ratio):
    model, x = tiny_vit(), inputs(2, seed=4)
    ours = get_technique("attention_rollout")(head_fusion=fusion, discard_ratio=ratio).attribute(
        model, x, [], TargetSpec.parse("pred")).maps["attention", "map"][:, 0]
    with torch.no_grad():
        _, atts = hand_forward(model, x)
    want = torch.from_numpy(hand_rollout(atts, 1, fusion, ratio)).float()
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    plain = torch.from_numpy(hand_rollout(atts, 1)).float()
    assert not torch.allclose(want, plain, atol=1e-4)  # the option changes the map


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="head_fusion='median'"):
        get_technique("attention_rollout")(head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio=1.0"):
        get_technique("attention_rollout")(discard_ratio=1.0)


@pytest.mark.parametrize("variant", ["cls", "registers"])
def test_chefer_equals_autograd_on_the_recomputed_attention(variant):
    kw, prefix = VARIANTS[variant]
    model, x = tiny_vit(**kw), inputs()
    result = get_technique("chefer2021")().attribute(model, x, [], TOP2)
    ours = result.maps["attention", "map"]
    x = x.clone().requires_grad_(True)  # so the recomputed attention is in the graph
    logits, atts = hand_forward(model, x)
    assert torch.equal(result.targets, logits.topk(2, 1).indices)
    rows = torch.arange(3)
    for k in range(2):
        grads = torch.autograd.grad(logits[rows, result.targets[:, k]].sum(), atts, retain_graph=True)
        want = []
        for n in range(3):
            T = atts[0].shape[-1]
            R = torch.eye(T, dtype=torch.float64)
            for a, g in zip(atts, grads):
                abar = (g[n].double() * a[n].detach().double()).clamp(min=0).mean(0)
                R = R + abar @ R
            want.append(class_row(R, prefix))
        want = torch.stack(want).float()
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(ours[:, k], want, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ours[:, 0], ours[:, 1])  # per target


def hand_torchvision_rollout(model, x):
    """Rollout of a torchvision ViT, its attention recomputed from in_proj_weight (no hook)."""
    with torch.no_grad():
        h = model._process_input(x)
        h = torch.cat([model.class_token.expand(x.shape[0], -1, -1), h], 1) + model.encoder.pos_embedding
        R = None
        for layer in model.encoder.layers:
            a_in = layer.ln_1(h)
            mha = layer.self_attention
            B, T, C = a_in.shape
            d = C // mha.num_heads
            q, k, _ = (a_in @ mha.in_proj_weight.T + mha.in_proj_bias).reshape(B, T, 3, mha.num_heads, d).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), -1).mean(1) + torch.eye(T)
            att = att / att.sum(-1, keepdim=True)
            R = att if R is None else att @ R
            h = layer(h)
    return R[:, 0, 1:].reshape(x.shape[0], *GRID)


def test_torchvision_vit_rollout_equals_the_hand_computation_and_chefer_is_refused():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32, num_classes=10).eval()
    x = inputs(2)
    ours = get_technique("attention_rollout")().attribute(model, x, [], TOP2).maps["attention", "map"]
    want = hand_torchvision_rollout(model, x)
    torch.testing.assert_close(ours[:, 0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[:, 1], want)
    assert hook_count(model) == 0
    chefer = get_technique("chefer2021")()
    with pytest.raises(ValueError, match="torchvision's nn.MultiheadAttention .*use attention_rollout"):
        chefer.check_model(model, [])
    with pytest.raises(ValueError, match="torchvision"):
        chefer.attribute(model, x, [], TOP2)


@pytest.mark.parametrize("name", ["attention_rollout", "chefer2021"])
def test_fused_attn_restored_no_hooks_no_parameter_grads_also_when_the_forward_raises(name):
    model = tiny_vit()
    for p in model.parameters():
        p.requires_grad_(True)
    for block in model.blocks:
        block.attn.fused_attn = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    technique = get_technique(name)()
    technique.attribute(model, inputs(2), [], TOP2)
    model.boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        technique.attribute(model, inputs(2), [], TOP2)
    assert [b.attn.fused_attn for b in model.blocks] == [True, True]
    assert hook_count(model) == 0 and not model.training
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_attention_maps_records_each_block_once_per_pass_and_restores_the_flag():
    model, x = tiny_vit(), inputs(2)
    model.blocks[0].attn.fused_attn, model.blocks[1].attn.fused_attn = True, False
    with torch.no_grad(), attention_maps(model) as att:
        model(x)
        model(x)
        assert [b.attn.fused_attn for b in model.blocks] == [False, False]
    assert len(att) == 2 and att[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(att[0].sum(-1), torch.ones(2, 2, 17))
    assert [b.attn.fused_attn for b in model.blocks] == [True, False] and hook_count(model) == 0
    assert [name for name, _, _ in attention_modules(model)] == ["blocks.0.attn", "blocks.1.attn"]


@pytest.mark.parametrize("name", ["attention_rollout", "chefer2021"])
def test_a_cnn_is_refused_before_any_work(name, make_cfg, tiny_checkpoint, tmp_path):
    from pipeline.runner import run
    from tests.conftest import tiny_overrides, write_images

    with pytest.raises(ValueError, match=f"{name} reads the attention weights of a transformer .*TinyNet has no "
                                         "attention module"):
        get_technique(name)().check_model(tiny_net(), [])
    write_images(tmp_path / "img", 2)
    with pytest.raises(ConfigError, match=f"{name} reads the attention weights"):
        run(make_cfg(*tiny_overrides(tiny_checkpoint, tmp_path / "img", f"technique={name}")), tmp_path / "run")
    assert not (tmp_path / "run" / "maps.h5").exists()
    with pytest.raises(ConfigError, match="TfEfficientNetLite0|EfficientNet|has no attention module"):
        run(make_cfg(f"technique={name}", "num_workers=0"), tmp_path / "embedded")
    assert not (tmp_path / "embedded" / "maps.h5").exists()


VIT = ["model=timm", "model.name=vit_tiny_patch16_224", "model.pretrained=false"]


def test_a_vit_runs_both_end_to_end_into_maps_h5_and_pngs(make_cfg, tmp_path):
    from pipeline.runner import run
    from pipeline.store import open_run

    cfg = make_cfg(*VIT, "technique=[attention_rollout,chefer2021]", "target=topk:2", "data.limit=2",
                   "num_workers=0")
    summary = run(cfg, tmp_path / "run")
    assert summary.done == 2
    with open_run(tmp_path / "run") as r:
        rollout = np.asarray(r.maps("attention_rollout")["attention", "map"])
        chefer = np.asarray(r.maps("chefer2021")["attention", "map"])
    assert rollout.shape == chefer.shape == (2, 2, 14, 14)
    assert np.array_equal(rollout[:, 0], rollout[:, 1]) and np.isfinite(chefer).all()
    for name in ("attention_rollout", "chefer2021"):
        assert len(list((tmp_path / "run" / "png" / name).glob("*.png"))) == 2, name


def test_windowed_attention_is_refused_before_work_and_at_the_batch():
    from timm.models.swin_transformer import SwinTransformer

    from pipeline.attention import check_recorded

    torch.manual_seed(0)
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                           num_classes=10).eval()
    assert len(attention_modules(swin)) == 2  # timm's WindowAttention is reached, but its windows are no grid
    for name in ("attention_rollout", "chefer2021"):
        with pytest.raises(ValueError, match="states its patch grid .*Swin is not supported"):
            get_technique(name)().check_model(swin, [])
    with torch.no_grad(), attention_maps(swin) as att:
        swin(inputs(2, 32))
    with pytest.raises(ValueError, match="not one global self-attention"):
        check_recorded(att, swin, 2)
    assert hook_count(swin) == 0
