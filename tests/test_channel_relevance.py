"""channel_relevance: Grad-CAM's channel weight x mean activation per target, against a hand
computation; its per-class summary (ties, unseen classes, channel choice); the Pass it shares with
gradcam; and runs that are resumed, lose their summary, or are sharded and merged."""
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from pipeline.merge import merge
from pipeline.runner import run
from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, get_technique
from pipeline.techniques.channel_relevance import parse_channels
from tests.conftest import tiny_overrides
from tests.test_store import assert_same_summary, summary_of
from tests.tinymodels import CountForwards, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")
TOPK2 = TargetSpec.parse("topk:2")


def make(**options):
    return get_technique("channel_relevance")(**options)


def by_hand(model, x, targets):
    """{layer: contribution [N, K, C] float64} for relu1 and relu2 of TinyNet, from autograd here:
    the spatial mean of d logit_k / d A_c times the spatial mean of A_c."""
    with torch.enable_grad():
        a1 = F.relu(model.bn1(model.conv1(x))).detach().requires_grad_()
        a2 = F.relu(model.conv2(a1))
        logits = model.fc(model.pool(a2).flatten(1))
        per_target = [torch.autograd.grad(logits.gather(1, targets[:, k:k + 1]).sum(), [a1, a2], retain_graph=True)
                      for k in range(targets.shape[1])]
    out = {}
    for i, (layer, a) in enumerate((("relu1", a1), ("relu2", a2))):
        alpha = torch.stack([g[i].mean((2, 3)) for g in per_target], 1)  # [N, K, C]
        out[layer] = (alpha * a.detach().mean((2, 3))[:, None]).double().numpy()
    return out


def per_class(contribution, targets, classes):
    """(mean [classes, C] with NaN for unseen classes, count [classes]) by a plain loop."""
    C = contribution.shape[-1]
    sums, counts = np.zeros((classes, C)), np.zeros(classes, dtype=np.int64)
    for n in range(contribution.shape[0]):
        for k in range(contribution.shape[1]):
            sums[targets[n, k]] += contribution[n, k]
            counts[targets[n, k]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


# -- the maths ---------------------------------------------------------------------------------------
def test_contributions_and_their_class_means_equal_a_hand_computation():
    model, x = tiny_net(), torch.rand(6, 3, 16, 16)
    technique = make(top=3)
    result = technique.attribute(model, x, ["relu1", "relu2"], TOPK2)
    targets = result.targets
    assert targets.shape == (6, 2)
    expected = by_hand(model, x, targets)
    rows = {key: m.numpy() for key, m in result.maps.items()}
    summary = technique.summarize(rows)
    for layer, C in (("relu1", 8), ("relu2", 16)):
        got = rows[layer, "contribution"]
        assert got.shape == (6, 2, C) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[layer], rtol=1e-5, atol=1e-8)
        assert np.array_equal(rows[layer, "classes"], targets.numpy()) and rows[layer, "classes"].dtype == np.int64
        assert rows[layer, "num_classes"].tolist() == [10] * 6
        mean, count = per_class(expected[layer], targets.numpy(), 10)
        assert np.array_equal(summary[layer, "count"], count) and count.sum() == 12
        seen = count > 0
        assert 0 < seen.sum() < 10  # some classes are never a top-2 target: NaN / -1 there
        np.testing.assert_allclose(summary[layer, "mean"][seen], mean[seen], rtol=1e-5, atol=1e-9)
        assert np.isnan(summary[layer, "mean"][~seen]).all() and np.isnan(summary[layer, "top_values"][~seen]).all()
        top = np.argsort(-mean[seen], axis=1, kind="stable")[:, :3]
        assert np.array_equal(summary[layer, "top_channels"][seen], top)
        assert (summary[layer, "top_channels"][~seen] == -1).all()
        np.testing.assert_allclose(summary[layer, "top_values"][seen], np.take_along_axis(mean[seen], top, 1), rtol=1e-5)
        assert summary[layer, "channels"].tolist() == list(range(C))


def test_the_contributions_add_up_to_the_mean_of_the_gradcam_map_before_its_relu():
    model, x = tiny_net(), torch.rand(3, 3, 16, 16)
    p = Pass(model, x, ["relu1", "relu2"], TOPK2, needs=make().needs)
    contribution = make().attribute(model, x, p.layers, TOPK2, shared=p).maps
    cams = get_technique("gradcam")(relu=False).attribute(model, x, p.layers, TOPK2, shared=p).maps
    for layer in p.layers:
        torch.testing.assert_close(contribution[layer, "contribution"].sum(2), cams[layer, "cam"].mean((2, 3)),
                                   rtol=1e-5, atol=1e-7)


def test_chosen_channels_are_those_columns_and_the_top_names_channel_ids():
    model, x = tiny_net(), torch.rand(4, 3, 16, 16)
    every = make().attribute(model, x, ["relu2"], TOPK2).maps
    for spec in ("3-5", [5, 3, 4, 4], "4,3,5"):
        technique = make(channels=spec, top=8)
        some = technique.attribute(model, x, ["relu2"], TOPK2).maps
        torch.testing.assert_close(some["relu2", "contribution"], every["relu2", "contribution"][:, :, 3:6])
        summary = technique.summarize({k: m.numpy() for k, m in some.items()})
        assert summary["relu2", "channels"].tolist() == [3, 4, 5]
        seen = summary["relu2", "count"] > 0
        top = summary["relu2", "top_channels"]
        assert top.shape == (10, 3)  # t = min(top, chosen channels)
        assert all(sorted(row) == [3, 4, 5] for row in top[seen].tolist())
        mean = summary["relu2", "mean"]
        np.testing.assert_array_equal(summary["relu2", "top_values"][seen],
                                      np.take_along_axis(mean[seen], top[seen] - 3, 1))


def test_the_summary_breaks_ties_by_channel_leaves_unseen_classes_empty_and_ignores_how_rows_are_split():
    t = make(top=3)
    contribution = np.array([[[1.0, 2.0, 2.0, 0.5]], [[3.0, 0.0, 0.0, 0.5]], [[-1.0, 4.0, 1.0, 1.0]],
                             [[2.0, 2.0, 2.0, 2.0]]], dtype=np.float32)  # [R=4, K=1, C=4]
    classes = np.array([[0], [0], [2], [3]])
    rows = {("l", "contribution"): contribution, ("l", "classes"): classes, ("l", "num_classes"): np.full(4, 5)}
    whole = t.finalize(t.partial(rows, list("abcd")))
    assert whole["l", "count"].tolist() == [2, 0, 1, 1, 0]
    np.testing.assert_array_equal(whole["l", "mean"][0], [2.0, 1.0, 1.0, 0.5])
    assert whole["l", "top_channels"].tolist() == [[0, 1, 2], [-1] * 3, [1, 2, 3], [0, 1, 2], [-1] * 3]
    np.testing.assert_array_equal(whole["l", "top_values"][[0, 2, 3]], [[2, 1, 1], [4, 1, 1], [2, 2, 2]])
    assert np.isnan(whole["l", "mean"][[1, 4]]).all() and np.isnan(whole["l", "top_values"][[1, 4]]).all()
    assert {k: a.dtype.name for k, a in whole.items()} == {
        ("l", "mean"): "float32", ("l", "count"): "int64", ("l", "top_channels"): "int64",
        ("l", "top_values"): "float32", ("l", "channels"): "int64"}
    for output, a in ((o, whole["l", o]) for _, o in whole):
        assert t.summary_outputs[output].match(a.shape, {"classes": 5, "C": 4}) is not None, output
    for cut in range(1, 4):
        part = lambda s: t.partial({k: v[s] for k, v in rows.items()}, list("abcd")[s])
        for stats in (t.combine(part(slice(0, cut)), part(slice(cut, 4))), t.combine(part(slice(cut, 4)), part(slice(0, cut)))):
            assert_same_summary(t.finalize(stats), whole)
    with pytest.raises(ValueError, match="disagree on the number of classes"):
        t.partial({**rows, ("l", "num_classes"): np.array([5, 5, 6, 5])}, list("abcd"))
    with pytest.raises(ValueError, match="outside 0..4"):
        t.partial({**rows, ("l", "classes"): np.array([[0], [5], [2], [3]])}, list("abcd"))


def test_channel_choices_and_options_are_checked_before_any_work():
    assert parse_channels("all", 4) == [0, 1, 2, 3] and parse_channels("2-3", 4) == [2, 3]
    assert parse_channels([3, 1, 3], 4) == [1, 3] and parse_channels("0-1,3", 4) == [0, 1, 3] and parse_channels(2) == [2]
    make(channels="0-15").check_layers({"relu2": (1, 16, 8, 8), "pool": (1, 16)})
    with pytest.raises(ValueError, match=r"channel_relevance: layer 'relu1' \(8 channels\).*0-7"):
        make(channels="4-9").check_layers({"relu2": (1, 16, 8, 8), "relu1": (1, 8, 16, 16)})
    with pytest.raises(ValueError, match="3D video"):
        make().check_layers({"relu1": (1, 4, 4, 16, 16)})
    with pytest.raises(ValueError, match="expected all, ids and ranges"):
        make(channels="first")
    with pytest.raises(ValueError, match="top=0"):
        make(top=0)


def test_it_shares_one_forward_and_one_backward_per_target_with_gradcam(monkeypatch):
    model, x, layers = CountForwards(tiny_net()).eval(), torch.rand(3, 3, 16, 16), ["net.relu1", "net.relu2"]
    techniques = {"gradcam": get_technique("gradcam")(), "channel_relevance": make()}
    alone = {name: t.attribute(model, x, layers, TOPK2).maps for name, t in techniques.items()}
    model.sizes.clear()
    backwards = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    p = Pass(model, x, layers, TOPK2, needs=frozenset().union(*(t.needs for t in techniques.values())))
    shared = {name: t.attribute(model, x, layers, TOPK2, shared=p).maps for name, t in techniques.items()}
    assert model.sizes == [3] and len(backwards) == 2  # one forward, one backward per target, for both
    for name in techniques:
        assert shared[name].keys() == alone[name].keys()
        for key in alone[name]:
            torch.testing.assert_close(shared[name][key], alone[name][key])


# -- runs: no pictures, resumed, lost summary, shards ---------------------------------------------------
@pytest.fixture
def relevance_cfg(make_cfg, image_folder, tiny_checkpoint):
    def cfg(*extra, technique="channel_relevance"):
        c = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, f"technique={technique}", "layers=[relu1,relu2]",
                                     "target=topk:2", *extra))
        with open_dict(c):
            c.technique.channel_relevance.top = 4
        return c

    return cfg


def test_a_run_stores_rows_and_the_summary_and_draws_no_picture(relevance_cfg, tmp_path):
    out = tmp_path / "run"
    run(relevance_cfg(), out)  # render.png is on
    assert not (out / "png").exists() or not any((out / "png").rglob("*.png"))
    summary, (stats, rows) = summary_of(out, "channel_relevance")
    assert rows == 7 and int(summary["relu2", "count"].sum()) == 14 and summary["relu2", "top_channels"].shape == (10, 4)
    with h5py.File(out / "maps.h5", "r", locking=False) as f:
        assert f["channel_relevance/relu2/contribution"].shape == (7, 2, 16)
        assert np.array_equal(f["channel_relevance/relu2/classes"][:], f["target"][:])
    gradcam_too = tmp_path / "with_gradcam"
    run(relevance_cfg(technique="[gradcam,channel_relevance]"), gradcam_too)
    pngs = sorted(p.relative_to(gradcam_too).parts[1] for p in (gradcam_too / "png").rglob("*.png"))
    assert pngs and set(pngs) == {"gradcam"}  # per-input Grad-CAM pictures only
    assert_same_summary(summary_of(gradcam_too, "channel_relevance")[0], summary)


@pytest.fixture
def sharded(relevance_cfg, tmp_path):
    """An unsharded run and its 3 shards (7 inputs, batch 3)."""
    full = tmp_path / "full"
    run(relevance_cfg("render.png=false"), full)
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, d in enumerate(shards):
        run(relevance_cfg("render.png=false", f"data.shard={i}/3"), d)
    return full, shards


def test_merged_shards_and_a_shard_killed_before_its_summary_equal_the_unsharded_run(sharded, tmp_path):
    full, (d0, d1, d2) = sharded
    expected = summary_of(full, "channel_relevance")[0]
    merge([d0, d1, d2], tmp_path / "merged.h5")
    merged, (_, rows) = summary_of(tmp_path / "merged.h5", "channel_relevance")
    assert rows == 7
    assert_same_summary(merged, expected)
    killed = tmp_path / "killed"
    shutil.copytree(d1, killed)
    with h5py.File(killed / "maps.h5", "a") as f:
        del f["summary/channel_relevance"]
    merge([d0, killed, d2], tmp_path / "recomputed.h5")  # its statistics come from its rows alone
    assert_same_summary(summary_of(tmp_path / "recomputed.h5", "channel_relevance")[0], expected)


def test_a_resumed_run_and_one_that_lost_its_summary_equal_a_clean_run(sharded, relevance_cfg, tmp_path):
    full, _ = sharded
    out = tmp_path / "resumed"
    run(relevance_cfg("render.png=false", "data.limit=3"), out)
    assert summary_of(out, "channel_relevance")[1][1] == 3
    run(relevance_cfg("render.png=false"), out)
    assert_same_summary(summary_of(out, "channel_relevance")[0], summary_of(full, "channel_relevance")[0])
    with h5py.File(out / "maps.h5", "a") as f:
        del f["summary/channel_relevance"]
    run(relevance_cfg("render.png=false"), out)  # nothing left to compute: recomputed from the rows
    summary, (_, rows) = summary_of(out, "channel_relevance")
    assert rows == 7
    assert_same_summary(summary, summary_of(full, "channel_relevance")[0])
