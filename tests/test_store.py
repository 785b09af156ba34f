"""pipeline.store (the one owner of maps.h5) and pipeline.summaries: the read API, float16 storage,
and run-level summaries that merge by construction (shards, resumes) for erf and a test-only one."""
import json
import re
import shutil
from dataclasses import dataclass

import h5py
import numpy as np
import pytest
from omegaconf import open_dict

from pipeline.merge import merge
from pipeline.runner import run
from pipeline.store import Column, open_run
from pipeline.summaries import add, merge_top_k, top_k
from pipeline.contracts import Family, Kind, Output
from pipeline.techniques import REGISTRY, Technique, register
from pipeline.techniques.base import ACTS
from tests.conftest import tiny_overrides

BINS = np.linspace(0.0, 8.0, 9)


class TopScores(Technique):
    """Test-only: per input and layer the largest activation; its run summary keeps the `k` inputs
    with the largest ones (ids and scores, ties by id), a histogram of all of them and a count."""

    outputs = {"score": Output(Kind.DATA, "[N]")}
    summary_outputs = {"top_ids": Output(Kind.DATA, "[top]"), "top_scores": Output(Kind.DATA, "[top]"),
                       "hist": Output(Kind.DATA, "[8]"), "count": Output(Kind.DATA, "[]")}
    family = Family.ACTIVATIONS
    needs = frozenset({ACTS})
    has_summary = True

    @dataclass
    class Options:
        k: int = 3

    def _attribute(self, p):
        return {(layer, "score"): a.flatten(1).amax(1) for layer, a in p.activations().items()}

    def partial(self, rows, ids):
        out = {}
        for (layer, _), scores in rows.items():
            best, best_ids, _ = top_k(scores, ids, self.options.k)
            out[f"{layer}/top/score"], out[f"{layer}/top/id"] = best, best_ids
            out[f"{layer}/hist"] = np.histogram(np.asarray(scores, dtype=np.float64), bins=BINS)[0]
            out[f"{layer}/count"] = np.array(len(scores), dtype=np.int64)
        return out

    def combine(self, a, b):
        out = add({k: v for k, v in a.items() if "/top/" not in k}, {k: v for k, v in b.items() if "/top/" not in k})
        for layer in {k.split("/")[0] for k in a}:
            out.update(merge_top_k(a, b, self.options.k, prefix=f"{layer}/top/"))
        return out

    def finalize(self, stats):
        out = {}
        for layer in {k.split("/")[0] for k in stats}:
            out[layer, "top_ids"] = np.asarray(stats[f"{layer}/top/id"], dtype=object)
            out[layer, "top_scores"] = np.asarray(stats[f"{layer}/top/score"], dtype=np.float64)
            out[layer, "hist"], out[layer, "count"] = stats[f"{layer}/hist"], stats[f"{layer}/count"]
        return out


@pytest.fixture
def top_scores():
    """TopScores registered for the test only (the registry is shared by every test)."""
    register("top_scores")(TopScores)
    yield "top_scores"
    REGISTRY.pop("top_scores")


def with_technique(cfg, name, **options):
    with open_dict(cfg):
        cfg.technique = {name: options}
    return cfg


def summary_of(run_dir, technique):
    with open_run(run_dir) as r:
        return r.summary(technique), r.summary_stats(technique)


def assert_same_summary(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind == "O":
            assert x.tolist() == y.tolist(), key
        elif x.dtype.kind in "iu":
            assert np.array_equal(x, y), key
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=str(key))


# -- the read API ------------------------------------------------------------------------------------
def test_open_run_reads_rows_maps_metrics_skipped_attempts_and_pngs(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    (image_folder / "broken.png").write_bytes(b"not an image")
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,erf]", "layers=[relu1,relu2]",
                                   "evaluate.deletion=true", "evaluate.steps=4", "render.max_inputs=2"))
    out = tmp_path / "run"
    run(cfg, out)
    with open_run(out) as r, h5py.File(out / "maps.h5", "r", locking=False) as f:
        assert r.is_pipeline_run and r.rows == 7 and r.skipped_rows == 1
        assert r.ids() == [s.decode() for s in f["id"][:]]
        assert [(s.id, s.frame) for s in r.skipped()] == [("broken.png", -1)]
        assert "cannot" in r.skipped()[0].reason or "decode" in r.skipped()[0].reason
        maps = r.maps("gradcam")
        assert sorted(maps) == [("relu1", "cam"), ("relu2", "cam")]
        cam = maps["relu2", "cam"]
        assert isinstance(cam, Column) and cam.shape == f["gradcam/relu2/cam"].shape and cam.is_rows
        np.testing.assert_array_equal(cam[:], f["gradcam/relu2/cam"][:])
        np.testing.assert_array_equal(cam[2], f["gradcam/relu2/cam"][2])
        blocks = list(cam.blocks(block_bytes=cam[0].nbytes * 2))
        assert [s for s, _ in blocks] == list(range(0, 7, len(blocks[0][1])))
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), cam[:])
        assert set(r.metrics()) == {("gradcam", layer, "cam", metric) for layer in ("relu1", "relu2")
                                    for metric in ("deletion", "deletion_auc")}
        assert sorted(r.run_key["technique"]) == ["erf", "gradcam"] and r.run_key["layers"] == ["relu1", "relu2"]
        assert "technique" in r.config and r.shard == "all"
        (attempt,) = r.attempts()
        assert attempt["finished"] and attempt["done"] == 7 and attempt["skipped"] == 1
        assert "git_commit" in r.provenance() and "rows" not in r.provenance()
        drawn = [r.png_path(i, "gradcam") for i in range(r.rows)]
        assert all(p is not None and p.is_file() for p in drawn[:2]) and drawn[2:] == [None] * 5
        assert r.summaries() == ["erf"]
        summary = r.summary("erf")
        assert {k[1] for k in summary} == {"mean", "sigma", "rf_box", "rf"}
        stats, rows = r.summary_stats("erf")
        assert rows == 7 and int(stats["relu2/count"]) == 7
        np.testing.assert_allclose(summary["relu2", "mean"], f["erf/relu2/map"][:, 0].mean(0), rtol=1e-5)
        assert set(r.summary_facts("erf")) == {(layer, o) for layer in ("relu1", "relu2") for o in ("rf_box", "rf")}
        assert set(r.field_table()) and r.classes() is None and r.half_written() == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_run(tmp_path / "nowhere")


def test_the_store_is_the_only_code_that_imports_h5py():
    from pathlib import Path

    import pipeline

    root = Path(pipeline.__file__).parent
    importing = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                       if "import h5py" in p.read_text() or "from h5py" in p.read_text())
    assert importing and all(name.startswith("store/") for name in importing), importing


def test_merge_has_no_technique_specific_code():
    from pathlib import Path

    import pipeline

    root = Path(pipeline.__file__).parent
    text = (root / "merge.py").read_text() + (root / "merge_checks.py").read_text()
    named = [name for name in REGISTRY if re.search(rf"\b{name}\b", text)]
    assert named == [], f"pipeline.merge names techniques: {named}"


# -- float16 storage -------------------------------------------------------------------------------
def test_float16_storage_halves_the_maps_reads_back_float32_and_is_refused_on_resume_if_changed(
        make_cfg, image_folder, tiny_checkpoint, tmp_path):
    base = tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,activations,saliency]",
                          "layers=[relu1,relu2]", "render.png=false")
    run(make_cfg(*base), tmp_path / "f32")
    run(make_cfg(*base, "store.dtype=float16"), tmp_path / "f16")
    with h5py.File(tmp_path / "f32" / "maps.h5", "r", locking=False) as a, h5py.File(tmp_path / "f16" / "maps.h5", "r", locking=False) as b:
        assert json.loads(b.attrs["run_key"])["store"] == {"dtype": "float16"}
        for name in ("gradcam/relu2/cam", "activations/relu1/maps", "saliency/input/grad"):
            assert a[name].dtype == np.float32 and b[name].dtype == np.float16, name
            assert b[name].id.get_storage_size() < 0.6 * a[name].id.get_storage_size(), name
        assert b["activations/relu1/topk"].dtype == a["activations/relu1/topk"].dtype  # integers stay
        assert b["score"].dtype == np.float32 and b["logit"].dtype == np.float32  # row metadata stays
    with open_run(tmp_path / "f32") as a, open_run(tmp_path / "f16") as b:
        for technique in ("gradcam", "activations", "saliency"):
            for key, col in b.maps(technique).items():
                if col.stored_dtype != "float16":
                    continue
                got, ref = col[:], a.maps(technique)[key][:]
                assert got.dtype == np.float32 and col.dtype == np.float32
                np.testing.assert_allclose(got, ref, rtol=2 ** -10, atol=2 ** -14 * max(1.0, np.abs(ref).max()))
    maps_h5 = (tmp_path / "f16" / "maps.h5").read_bytes()
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"store\.dtype: float16 -> float32"):
        run(make_cfg(*base), tmp_path / "f16")
    assert (tmp_path / "f16" / "maps.h5").read_bytes() == maps_h5
    with pytest.raises(ConfigError, match="store.dtype='float64'"):
        run(make_cfg(*base, "store.dtype=float64"), tmp_path / "f64")


def test_a_run_key_from_before_store_options_resumes_as_float32():
    from pipeline.store import key_differences

    old = {"model": {"kind": "x"}}
    assert key_differences(old, {**old, "store": {"dtype": "float32"}}) == []
    assert key_differences(old, {**old, "store": {"dtype": "float16"}}) == ['store: (not set) -> {"dtype": "float16"}']
    # issue 14's evaluate keys: their defaults (metrics off) resume a run made before them
    legacy = {"evaluate": {"deletion": False}}
    new = {"evaluate": {"deletion": False, "pointing": False, "pointing_tolerance": 15, "road": False,
                        "road_percentages": list(range(10, 100, 10)), "confidence": False, "sparseness": False}}
    assert key_differences(legacy, new) == []
    assert key_differences(legacy, {"evaluate": {**new["evaluate"], "road_percentages": [50]}}) == \
        ["evaluate.road_percentages: (not set) -> [50]"]
    # issue 15's layout: auto (what every run before it did on its CNN layers) resumes them
    assert key_differences(old, {**old, "layout": "auto"}) == []
    assert key_differences(old, {**old, "layout": "tokens"}) == ["layout: (not set) -> tokens"]


# -- summaries: combine / finalize ----------------------------------------------------------------
def test_erf_statistics_combine_to_the_statistics_of_all_rows():
    erf = REGISTRY["erf"]()
    rng = np.random.default_rng(0)
    rows = rng.random((10, 1, 6, 7)).astype(np.float32)
    ids = [f"in{i}" for i in range(10)]
    whole = erf.partial({("l", "map"): rows}, ids)
    parts = [erf.partial({("l", "map"): rows[s]}, ids[s]) for s in (slice(0, 3), slice(3, 4), slice(4, 10))]
    combined = erf.combine(erf.combine(parts[0], parts[1]), parts[2])
    assert int(combined["l/count"]) == 10
    np.testing.assert_allclose(combined["l/sum"], whole["l/sum"], rtol=1e-12)
    assert erf.combine(parts[2], parts[0])["l/count"] == erf.combine(parts[0], parts[2])["l/count"]
    final = erf.finalize(combined)
    np.testing.assert_allclose(final["l", "mean"], rows[:, 0].mean(0), rtol=1e-6)
    assert final["l", "sigma"].shape == (2,)
    with pytest.raises(ValueError, match="different keys"):
        add({"a": 1}, {"b": 1})


def test_running_top_k_is_independent_of_how_rows_are_split():
    t = TopScores(k=3)
    scores = np.array([1.0, 5.0, 3.0, 5.0, 0.5, 4.0, 2.0])
    ids = [f"x{i}" for i in range(7)]
    rows = {("l", "score"): scores}
    whole = t.finalize(t.partial(rows, ids))
    assert whole["l", "top_ids"].tolist() == ["x1", "x3", "x5"] and whole["l", "top_scores"].tolist() == [5, 5, 4]
    for cut in range(1, 7):
        a = t.partial({("l", "score"): scores[:cut]}, ids[:cut])
        b = t.partial({("l", "score"): scores[cut:]}, ids[cut:])
        for stats in (t.combine(a, b), t.combine(b, a)):
            assert_same_summary(t.finalize(stats), whole)
    assert whole["l", "count"] == 7 and whole["l", "hist"].sum() == 7


@pytest.mark.parametrize("largest", [True, False])
def test_select_merging_only_the_rows_that_change_equals_one_keep_over_every_row(largest):
    """keep/select per row of [C, R] with ties, NaN and whole rows that never change after the
    first batch: any split into batches, combined in any order, gives keep over all rows."""
    from pipeline.summaries import keep, select

    rng = np.random.default_rng(1)
    C, R, k = 40, 60, 5
    scores = rng.integers(0, 6, (C, R)).astype(np.float64)  # many ties
    scores[::7] = 0.0  # a dead channel: every score tied
    scores[3, rng.integers(0, R, 10)] = np.nan
    scores[5, :] = np.linspace(10, 0, R)  # the first batch holds the whole top-k
    ids = np.array([[f"in{(j * 37) % R:03d}" for j in range(R)]] * C, dtype=object)
    argmax = rng.integers(0, 9, (C, R, 2))
    whole = keep(scores, ids, k, largest, {"argmax": argmax})
    for seed in range(6):
        cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, R), 4, replace=False))
        parts = [{f"p/{n}": v for n, v in keep(scores[:, a:b], ids[:, a:b], k, largest, {"argmax": argmax[:, a:b]}).items()}
                 for a, b in zip([0, *cuts], [*cuts, R])]
        order = np.random.default_rng(seed + 10).permutation(len(parts)) if seed % 2 else range(len(parts))
        state = None
        for i in order:
            if state is None:
                state = parts[i]
                continue
            pair = (state, parts[i]) if seed % 3 else (parts[i], state)
            state = {f"p/{n}": v for n, v in select(*pair, "p/", k, largest).items()}
        np.testing.assert_array_equal(state["p/score"], whole["score"])
        assert state["p/id"].tolist() == whole["id"].tolist()
        np.testing.assert_array_equal(state["p/argmax"], whole["argmax"])


# -- merge(shards) == unsharded run, for erf and a test-only summary --------------------------------
@pytest.fixture
def sharded(make_cfg, image_folder, tiny_checkpoint, tmp_path, top_scores):
    """An unsharded run and its 3 shards of TopScores + erf (7 inputs, batch 3)."""

    def cfg(*extra):
        c = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=erf", "layers=[relu1,relu2]",
                                     "render.png=false", *extra))
        with open_dict(c):
            c.technique[top_scores] = {"k": 3}
        return c

    full = tmp_path / "full"
    run(cfg("data.shard=all"), full)
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"shard{i}")
        run(cfg(f"data.shard={i}/3"), shards[-1])
    return {"cfg": cfg, "full": full, "shards": shards}


def test_merged_summaries_equal_the_unsharded_run_without_recomputing_rows(sharded, tmp_path, monkeypatch):
    import pipeline.summaries

    def no_recompute(*args):
        raise AssertionError("the shards' stored statistics cover their rows: nothing to recompute")

    monkeypatch.setattr(pipeline.summaries, "stats_of_rows", no_recompute)
    merge(sharded["shards"], tmp_path / "merged.h5")
    for technique in ("top_scores", "erf"):
        (merged, (_, rows)), (full, _) = summary_of(tmp_path / "merged.h5", technique), summary_of(sharded["full"], technique)
        assert rows == 7
        assert_same_summary(merged, full)
    top, _ = summary_of(tmp_path / "merged.h5", "top_scores")
    with open_run(sharded["full"]) as r:
        scores = r.maps("top_scores")["relu2", "score"][:]
        ids = np.array(r.ids(), dtype=object)
    expected = [ids[i] for i in sorted(range(7), key=lambda i: (-scores[i], ids[i]))[:3]]
    assert top["relu2", "top_ids"].tolist() == expected and int(top["relu2", "count"]) == 7
    shard_tops = [summary_of(d, "top_scores")[0]["relu2", "top_ids"].tolist() for d in sharded["shards"]]
    assert all(t != expected for t in shard_tops)  # no shard alone has the answer


def test_a_shard_without_its_summary_is_recomputed_from_its_rows(sharded, tmp_path):
    """A shard whose run was killed before writing its summaries: merge recomputes its statistics
    from its rows through the technique's partial()."""
    d0, d1, d2 = sharded["shards"]
    killed = tmp_path / "killed"
    shutil.copytree(d1, killed)
    with h5py.File(killed / "maps.h5", "a") as f:
        del f["summary/top_scores"], f["summary/erf"]
    merge([d0, killed, d2], tmp_path / "merged.h5")
    for technique in ("top_scores", "erf"):
        assert_same_summary(summary_of(tmp_path / "merged.h5", technique)[0], summary_of(sharded["full"], technique)[0])


def test_a_resumed_run_summarizes_every_row_once(sharded, tmp_path):
    """A run stopped after 3 inputs (data.limit is not part of the run key) and resumed, and one
    whose summaries were lost: both end with the unsharded run's summaries."""
    out = tmp_path / "resumed"
    run(sharded["cfg"]("data.limit=3"), out)
    assert summary_of(out, "top_scores")[1][1] == 3
    run(sharded["cfg"](), out)
    with h5py.File(out / "maps.h5", "a") as f:
        del f["summary/top_scores"]
    run(sharded["cfg"](), out)  # nothing left to compute: the statistics are recomputed from the rows
    for technique in ("top_scores", "erf"):
        summary, (stats, rows) = summary_of(out, technique)
        assert rows == 7
        assert_same_summary(summary, summary_of(sharded["full"], technique)[0])


def test_a_summary_edited_in_one_shard_is_refused(sharded, tmp_path):
    from pipeline.merge import MergeError

    d0, d1, d2 = sharded["shards"]
    edited = tmp_path / "edited"
    shutil.copytree(d2, edited)
    with h5py.File(edited / "maps.h5", "a") as f:
        f["summary/top_scores/relu2/count"][...] = 99
    with pytest.raises(MergeError, match="summary/top_scores/relu2/count differs from what its statistics"):
        merge([d0, d1, edited], tmp_path / "merged.h5")


def test_merge_refuses_a_row_dataset_its_technique_does_not_declare(sharded, tmp_path):
    from pipeline.merge import MergeError

    d0, d1, d2 = sharded["shards"]
    odd = tmp_path / "odd"
    shutil.copytree(d1, odd)
    with h5py.File(odd / "maps.h5", "a") as f:
        rows = int(f.attrs["rows"])
        f.create_dataset("erf/relu2/extra", data=np.zeros((rows, 2), np.float32), maxshape=(None, 2))
    with pytest.raises(MergeError, match=r"row dataset erf/relu2/extra in .*odd.* is not an output erf declares \(map\)"):
        merge([d0, odd, d2], tmp_path / "merged.h5")


def test_the_report_says_how_each_map_is_declared():
    from pipeline import report

    cam = REGISTRY["gradcam"].outputs["cam"]
    assert report.declared("gradcam/relu2/cam") == f"heatmap {cam.shape}"
    assert report.declared("gradcam/relu2/cam.deletion") == "evaluation (deletion)"
    assert report.declared("gradcam/relu2/nothing") == "(not declared)"
    assert report.declared("id") == "" and report.declared("skipped/id") == ""
