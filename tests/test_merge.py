"""pipeline.merge: shards of one run (data.shard=i/n) merged into one maps.h5 equal to an unsharded
run's, and every refusal (missing / repeated shard, other config, not a run dir, tampered data)."""
import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR
from pipeline.store import MapsFile, decode_strings
from pipeline.merge import MergeError, key_differences, main, merge
from pipeline.runner import run
from tests.conftest import PYTHON, read_h5, subprocess_env, tiny_overrides, write_images
from tests.tinymodels import tiny_net

BASE = ("layers=[relu1,relu2]", "technique=[gradcam,activations,erf]", "render.png=false")
SHARD_IDS = [  # the folder sorted: corrupt.png, img000..img004, sub/deep000, sub/deep001 -> blocks 2, 3, 3
    ["corrupt.png", "img000.png"],
    ["img001.png", "img002.png", "img003.png"],
    ["img004.png", "sub/deep000.png", "sub/deep001.png"],
]


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One unsharded run and its three shards (plus shard 2/3 under another target), 8 inputs of
    which one (corrupt.png, in shard 0) is a skipped record."""
    root = tmp_path_factory.mktemp("merge")
    folder = root / "images"
    write_images(folder, 5)
    write_images(folder / "sub", 2, prefix="deep")
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    checkpoint = root / "tiny.pt"
    torch.save(tiny_net().state_dict(), checkpoint)
    base = tiny_overrides(checkpoint, folder, *BASE)
    out = {"root": root, "folder": folder, "checkpoint": checkpoint}
    out["full"] = root / "full"
    run(cfg(*base, "data.shard=all"), out["full"])
    out["shards"] = []
    for i in range(3):
        d = root / f"shard{i}"
        run(cfg(*base, f"data.shard={i}/3"), d)
        out["shards"].append(d)
    out["other_target"] = root / "other_target"
    run(cfg(*base, "data.shard=2/3", "target=1"), out["other_target"])
    return out


def test_merged_shards_equal_an_unsharded_run(runs, tmp_path):
    out = tmp_path / "merged.h5"
    report = merge(runs["shards"], out)
    assert (report.rows, report.skipped_rows, report.completeness_checked) == (7, 1, True)
    assert [label for _, label in report.shards] == ["0/3", "1/3", "2/3"] and not report.warnings
    merged, attrs = read_h5(out)
    full, full_attrs = read_h5(runs["full"] / "maps.h5")
    assert sorted(merged) == sorted(full)

    ids = decode_strings(merged["id"])
    skipped = decode_strings(merged["skipped/id"])
    assert sorted(ids + skipped) == sorted(i for block in SHARD_IDS for i in block)  # each once
    assert len(set(ids + skipped)) == 8 and skipped == ["corrupt.png"]
    assert ids == [i for block in SHARD_IDS for i in block if i != "corrupt.png"]  # shard order
    order = [decode_strings(full["id"]).index(i) for i in ids]
    for name, value in full.items():
        got = merged[name]
        if name.startswith("skipped/") or name.startswith("receptive_fields/") or name.startswith("summary/"):
            ref = value  # one skipped record; non-row and summary data are not aligned by id
        else:
            ref = value[order]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        if got.dtype.kind in "OS":  # strings (fixed-length bytes since the run store)
            assert decode_strings(got) == decode_strings(ref), name
        elif got.dtype.kind in "iub":
            assert np.array_equal(got, ref), name
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=name)
    # the ERF summary is recomputed over all merged rows, not copied from shard 0
    np.testing.assert_allclose(merged["summary/erf/relu2/mean"], merged["erf/relu2/map"][:, 0].mean(0), atol=1e-6)
    with h5py.File(runs["shards"][0] / "maps.h5", "r") as f:
        assert not np.allclose(f["summary/erf/relu2/mean"][:], merged["summary/erf/relu2/mean"], atol=1e-6)

    # layout and attributes as MapsFile writes them, under the unsharded run_key
    with h5py.File(out, "r") as f, h5py.File(runs["full"] / "maps.h5", "r") as g:
        for name in ("gradcam/relu2/cam", "activations/relu1/topk", "id", "skipped/reason"):
            assert (f[name].chunks, f[name].compression, f[name].shuffle, f[name].maxshape) == \
                   (g[name].chunks, g[name].compression, g[name].shuffle, g[name].maxshape), name
    assert attrs["run_key"] == full_attrs["run_key"] and json.loads(attrs["run_key"])["data"]["shard"] == "all"
    assert (attrs["rows"], attrs["skipped_rows"], attrs["shard"]) == (7, 1, "all")
    assert "shard: all" in attrs["config"] and "shard: 0/3" not in attrs["config"]
    assert [m["shard"] for m in json.loads(attrs["merged_from"])] == ["0/3", "1/3", "2/3"]
    assert json.loads(attrs["merged_from"])[1]["dir"] == str(runs["shards"][1].resolve())
    assert len(json.loads(attrs["attempts"])) == 3
    assert attrs["layers"] == full_attrs["layers"] and attrs["git_commit"] == full_attrs["git_commit"]
    maps_file = MapsFile(out, json.loads(full_attrs["run_key"]))  # a resume would accept it
    assert maps_file.rows == 7 and len(maps_file.done_ids()) == 8
    maps_file.close()

    # input order does not matter; an existing output is refused unless overwritten
    with pytest.raises(MergeError, match="exists"):
        merge(runs["shards"], out)
    again = merge(list(reversed(runs["shards"])), out, overwrite=True)
    assert [label for _, label in again.shards] == ["0/3", "1/3", "2/3"]
    assert decode_strings(read_h5(out)[0]["id"]) == ids


def test_a_missing_shard_is_named_with_its_inputs(runs, tmp_path):
    out = tmp_path / "merged.h5"
    with pytest.raises(MergeError) as err:
        merge(runs["shards"][:2], out)
    message = str(err.value)
    assert "2/3 missing" in message
    assert "3 input(s)" in message and all(i in message for i in SHARD_IDS[2])
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_repeated_shard_names_the_duplicated_ids(runs, tmp_path):
    d0, d1, d2 = runs["shards"]
    with pytest.raises(MergeError) as err:
        merge([d0, d0, d1, d2], tmp_path / "merged.h5")
    message = str(err.value)
    assert "given 2 times" in message and "shard 0/3" in message
    assert "corrupt.png" in message and "img000.png" in message  # the skipped record counts too
    assert "img001.png" not in message

    rerun = tmp_path / "shard1_again"  # the same shard run twice, in two dirs
    shutil.copytree(d1, rerun)
    with pytest.raises(MergeError) as err:
        merge([d0, d1, d2, rerun], tmp_path / "merged.h5")
    message = str(err.value)
    assert "shard 1/3 is given 2 times" in message and str(rerun) in message
    assert all(f"{i} (in {d1} [1/3], {rerun} [1/3])" in message for i in SHARD_IDS[1])
    assert not (tmp_path / "merged.h5").exists()


def test_shards_of_another_config_are_refused_naming_the_key(runs, tmp_path):
    d0, d1, _ = runs["shards"]
    with pytest.raises(MergeError, match=r"target \('pred' != '1'\)") as err:
        merge([d0, d1, runs["other_target"]], tmp_path / "merged.h5")
    assert str(runs["other_target"]) in str(err.value) and "layers" not in str(err.value)
    with pytest.raises(MergeError, match="different numbers of parts"):  # "all" is 0/1
        merge([runs["full"], d1], tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()
    assert key_differences({"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": [1]}, "d": 0}) == \
        ["a.b (1 != 2)", "d (absent != 0)"]


def test_a_dir_that_is_not_a_run_is_refused(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergeError, match=f"{empty} is not a run dir: it has no maps.h5"):
        merge([*runs["shards"], empty], tmp_path / "merged.h5")
    with pytest.raises(MergeError, match="does not exist"):
        merge([tmp_path / "nope"], tmp_path / "merged.h5")
    (empty / "maps.h5").write_bytes(b"not hdf5")
    with pytest.raises(MergeError, match="cannot be opened"):
        merge([empty], tmp_path / "merged.h5")
    assert not (tmp_path / "merged.h5").exists()


def _remove(f, name):
    del f[name]


def _change(f, name):
    data = f[name][()]
    data.flat[0] += 1
    f[name][...] = data


def _add(f, name):
    f.create_dataset(name, data=np.zeros(3))


@pytest.mark.parametrize("edit, name, message", [
    (_change, "receptive_fields/size", "dataset receptive_fields/size differs"),
    (_remove, "receptive_fields/size", "dataset receptive_fields/size is missing"),
    (_remove, "gradcam/relu2/cam", "row dataset gradcam/relu2/cam is missing"),
    (_add, "summary/foo/relu2/x", "summary/foo"),
    (_change, "summary/erf/relu2/rf_box", "summary/erf/relu2/rf_box differs"),
])
def test_shards_whose_data_disagree_are_refused(runs, tmp_path, edit, name, message):
    d0, d1, d2 = runs["shards"]
    tampered = tmp_path / "shard1"
    shutil.copytree(d1, tampered)
    with h5py.File(tampered / "maps.h5", "a") as f:
        edit(f, name)
    with pytest.raises(MergeError, match=message) as err:
        merge([d0, tampered, d2], tmp_path / "merged.h5")
    assert str(tampered) in str(err.value)
    assert not (tmp_path / "merged.h5").exists()


def test_shards_without_rows_and_a_source_that_is_gone(runs, tmp_path):
    """limit=2 over 3 shards: shard 0 is empty, shard 1 holds only the skipped corrupt.png, shard 2
    one row; then the data folder is removed: the merge works, completeness unchecked, warned."""
    folder = tmp_path / "images"
    shutil.copytree(runs["folder"], folder)
    base = tiny_overrides(runs["checkpoint"], folder, *BASE, "data.limit=2")
    dirs = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(dirs):
        run(cfg(*base, f"data.shard={i}/3"), d)
    report = merge(dirs, tmp_path / "a.h5")
    assert (report.rows, report.skipped_rows, report.completeness_checked) == (1, 1, True)
    merged, _ = read_h5(tmp_path / "a.h5")
    assert decode_strings(merged["id"]) == ["img000.png"] and decode_strings(merged["skipped/id"]) == ["corrupt.png"]
    np.testing.assert_allclose(merged["summary/erf/relu1/mean"], merged["erf/relu1/map"][0, 0], atol=1e-6)

    shutil.rmtree(folder)
    seen = []
    report = merge(dirs, tmp_path / "b.h5", warn=seen.append)
    assert not report.completeness_checked and report.rows == 1
    assert len(seen) == 1 and "does not exist" in seen[0] and "not checked" in seen[0]
    with pytest.raises(MergeError, match="1/3 missing") as err:  # without the source: no missing ids
        merge([dirs[0], dirs[2]], tmp_path / "c.h5")
    assert "input(s) of the full input list" not in str(err.value)


def merge_cli(*args, cwd):
    return subprocess.run([PYTHON, "-m", "pipeline.merge", *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_exit_codes_and_messages(runs, tmp_path):
    d0, d1, d2 = runs["shards"]
    failed = merge_cli(d0, d1, "--out", "merged.h5", cwd=tmp_path)
    assert failed.returncode == 2, failed.stderr
    assert failed.stderr.startswith("error: cannot merge") and "2/3 missing" in failed.stderr
    assert "sub/deep001.png" in failed.stderr and failed.stdout == ""
    assert list(tmp_path.iterdir()) == []

    done = merge_cli(d0, d1, d2, "--out", "merged.h5", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "merged 3 shard(s) (7 rows, 1 skipped) -> merged.h5" in done.stdout
    assert (tmp_path / "merged.h5").is_file() and [p.name for p in tmp_path.iterdir()] == ["merged.h5"]
    assert main([str(d0), str(d1), str(d2), "--out", str(tmp_path / "merged.h5")]) == 2  # exists
    assert main([str(d0), str(d1), str(d2), "--out", str(tmp_path / "merged.h5"), "--force"]) == 0
