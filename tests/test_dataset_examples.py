"""dataset_examples: the top inputs per channel over a run, exact against a brute-force
computation, with receptive-field patches, and equal after a resume and a 3-shard merge."""
import shutil

import cv2
import h5py
import numpy as np
import pytest
import torch

from pipeline.hooks import capture
from pipeline.merge import MergeError, merge
from pipeline.runner import plan, run
from pipeline.store import open_run
from pipeline.techniques import get_technique
from pipeline.techniques.channels import parse_channels
from pipeline.summaries import keep
from pipeline.techniques.example_stats import HIST_EDGES, histogram, quantiles
from tests.conftest import tiny_overrides
from tests.tinymodels import BrightSpot

LAYERS = "layers=[relu1,relu2]"


def examples(run_dir):
    with open_run(run_dir) as r:
        return r.summary("dataset_examples")


def assert_same_examples(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=str(key))
        else:
            assert x.tolist() == y.tolist(), key


def brute_force(cfg, layer):
    """Every input's activations at `layer`, decoded and preprocessed as the run does:
    (ids, acts [N, C, h, w], display [N, S, S, 3])."""
    from pipeline.data.loader import Loader

    p = plan(cfg)
    ids, acts, shown = [], [], []
    with Loader(p.source, p.source.items, None, p.model.preprocess, 4, 0) as loader:
        for batch in loader:
            with torch.no_grad(), capture(p.model.module, [layer]) as got:
                p.model.module(batch.x)
            ids += [it.id for it in batch.items]
            acts.append(got[layer].clone())
            shown.append(batch.display)
    return ids, torch.cat(acts).numpy(), np.concatenate(shown)


def test_top_k_and_argmax_equal_a_brute_force_computation(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=dataset_examples", LAYERS,
                                   "technique.dataset_examples.top=3", "technique.dataset_examples.bottom=2",
                                   "technique.dataset_examples.channels=2-6", "render.png=false"))
    run(cfg, tmp_path / "run")
    got = examples(tmp_path / "run")
    ids, acts, _ = brute_force(cfg, "relu2")
    acts = acts[:, 2:7]  # [N, 5, h, w]
    flat = acts.reshape(len(ids), 5, -1)
    score, best = flat.max(2), flat.argmax(2)
    assert got["relu2", "channels"].tolist() == [2, 3, 4, 5, 6] and int(got["relu2", "count"]) == 7
    for c in range(5):
        order = sorted(range(len(ids)), key=lambda i: (-score[i, c], ids[i]))
        assert got["relu2", "top_ids"][c].tolist() == [ids[i] for i in order[:3]]
        np.testing.assert_allclose(got["relu2", "top_scores"][c], score[order[:3], c], rtol=1e-6)
        w = acts.shape[3]
        assert got["relu2", "top_argmax"][c].tolist() == [[best[i, c] // w, best[i, c] % w] for i in order[:3]]
        low = sorted(range(len(ids)), key=lambda i: (score[i, c], ids[i]))[:2]
        assert got["relu2", "bottom_ids"][c].tolist() == [ids[i] for i in low]
    assert got["relu2", "hist"].sum(1).tolist() == [7] * 5
    assert got["relu2", "top_patches"].shape == (5, 3, 3, 64, 64) and got["relu2", "bottom_patches"].shape == (5, 2, 3, 64, 64)
    with open_run(tmp_path / "run") as r:  # per input only the scores and argmax are stored
        assert sorted(r.maps("dataset_examples")) == [(layer, o) for layer in ("relu1", "relu2") for o in ("argmax", "score")]
        assert r.maps("dataset_examples")["relu2", "score"].shape == (7, 5)


def bright_squares(folder, n=8, size=64, side=10, seed=0):
    """Dark noise images, each with one bright side x side square at a random place; returns
    {file name: (x, y) of the square's centre}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    centres = {}
    for i in range(n):
        img = rng.integers(0, 50, size=(size, size, 3), dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        img[y:y + side, x:x + side] = 255
        cv2.imwrite(str(folder / f"sq{i:02d}.png"), img)
        centres[f"sq{i:02d}.png"] = (x + side / 2 - 0.5, y + side / 2 - 0.5)
    return centres


@pytest.mark.parametrize("patch", ["rf", "erf"])
def test_a_channel_that_fires_on_a_bright_square_has_the_square_in_every_top_patch(make_cfg, tmp_path, patch):
    centres = bright_squares(tmp_path / "images")
    checkpoint = tmp_path / "bright.pt"
    torch.save(BrightSpot().state_dict(), checkpoint)
    cfg = make_cfg("model=checkpoint", f"model.path={checkpoint}", "model.arch=tests.tinymodels:BrightSpot",
                   "model.num_classes=10", "model.input_size=64", "model.resize=64", "data=folder",
                   f"data.path={tmp_path / 'images'}", "num_workers=0", "batch_size=3", "render.png=false",
                   "technique=dataset_examples", "layers=[conv2]", "technique.dataset_examples.channels=[0]",
                   "technique.dataset_examples.top=5", f"technique.dataset_examples.patch={patch}",
                   "technique.dataset_examples.patch_size=32")
    run(cfg, tmp_path / "run")
    got = examples(tmp_path / "run")
    assert got["conv2", "field"].tolist() == [[0.0, 4.0, 9.0], [0.0, 4.0, 9.0]]  # (start, jump, size) per axis
    for j, item in enumerate(got["conv2", "top_ids"][0]):
        cx, cy = centres[item]
        x, y, w, h = got["conv2", "top_box"][0, j]
        assert x <= cx <= x + w - 1 and y <= cy <= y + h - 1, (item, (cx, cy), (x, y, w, h))
        patch_img = got["conv2", "top_patches"][0, j]  # [3, 32, 32], the unit at the centre
        assert patch_img[:, 12:20, 12:20].mean() > 200, item  # the square is bright, the noise dark
        if patch == "rf":
            assert (w, h) == (9, 9) or x == 0 or y == 0 or x + w == 64 or y + h == 64


@pytest.fixture
def shard_runs(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    def cfg(*extra):
        return make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=dataset_examples", LAYERS,
                                        "technique.dataset_examples.top=3", "technique.dataset_examples.bottom=1",
                                        "render.png=false", *extra))

    full = tmp_path / "full"
    run(cfg("data.shard=all"), full)
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    for i, d in enumerate(shards):
        run(cfg(f"data.shard={i}/3"), d)
    return {"cfg": cfg, "full": full, "shards": shards}


def test_a_3_shard_merge_and_a_resume_equal_the_clean_run(shard_runs, tmp_path):
    merge(shard_runs["shards"], tmp_path / "merged.h5")
    assert_same_examples(examples(tmp_path / "merged.h5"), examples(shard_runs["full"]))
    resumed = tmp_path / "resumed"
    run(shard_runs["cfg"]("data.limit=2"), resumed)
    run(shard_runs["cfg"](), resumed)
    assert_same_examples(examples(resumed), examples(shard_runs["full"]))
    with h5py.File(resumed / "maps.h5", "a") as f:  # killed before its summary was written
        del f["summary/dataset_examples"]
    run(shard_runs["cfg"](), resumed)
    assert_same_examples(examples(resumed), examples(shard_runs["full"]))


def test_a_merge_needs_the_patches_of_every_kept_example(shard_runs, tmp_path):
    d0, d1, d2 = shard_runs["shards"]
    killed = tmp_path / "killed"
    shutil.copytree(d1, killed)
    with h5py.File(killed / "maps.h5", "a") as f:
        del f["summary/dataset_examples"]
    with pytest.raises(MergeError, match="no patch in any shard's summary .*resume the shard"):
        merge([d0, killed, d2], tmp_path / "merged.h5")


def test_the_running_state_stays_k_per_channel_and_combines_in_any_order():
    t = get_technique("dataset_examples")(top=4, bottom=2)
    rng = np.random.default_rng(1)
    rows = {("l", "score"): rng.normal(size=(1000, 6)).astype(np.float32),
            ("l", "argmax"): rng.integers(0, 7, size=(1000, 6, 2))}
    ids = [f"in{i:04d}" for i in range(1000)]
    whole = t.finalize(t.partial(rows, ids))
    parts = [t.partial({k: v[s:s + 100] for k, v in rows.items()}, ids[s:s + 100]) for s in range(0, 1000, 100)]
    state = parts[0]
    for part in parts[1:]:
        state = t.combine(part, state)
        assert state["l/top/score"].shape == (6, 4) and state["l/bottom/id"].shape == (6, 2)
    assert_same_examples(t.finalize(state), whole)
    np.testing.assert_allclose(whole["l", "top_scores"], -np.sort(-rows["l", "score"].T, 1)[:, :4], rtol=1e-6)
    assert whole["l", "hist"].sum() == 6000 and whole["l", "hist_edges"].tolist() == HIST_EDGES.tolist()


def test_ties_are_broken_by_id_and_quantiles_come_from_the_histogram():
    kept = keep(np.array([[1.0, 2.0, 2.0, 2.0]]), np.array([["d", "c", "b", "a"]], dtype=object), 2)
    assert kept["id"].tolist() == [["a", "b"]]
    values = np.random.default_rng(0).uniform(1.0, 9.0, size=(1, 5000))
    q = quantiles(histogram(values))[0]
    exact = np.quantile(values[0], [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    for got, want in zip(q, exact):
        b = np.searchsorted(HIST_EDGES, want) - 1
        assert HIST_EDGES[b] - 1e-9 <= got <= HIST_EDGES[b + 1] + 1e-9  # within the bin of the exact value


def test_channel_choices_are_checked_before_work():
    assert parse_channels("all", 4, "x") == [0, 1, 2, 3] and parse_channels("1-2", 4, "x") == [1, 2]
    assert parse_channels([3, 1, 1], 4, "x") == [1, 3] and parse_channels("0-1,3", 4, "x") == [0, 1, 3]
    for bad in ("2-9", "5-1", "few", [7]):
        with pytest.raises(ValueError, match=r"layer 'relu2' \(4 channels\): channels="):
            parse_channels(bad, 4, "relu2")
    with pytest.raises(ValueError, match="score="):
        get_technique("dataset_examples")(score="median")


def test_video_frames_are_sought_again_for_their_patches(make_cfg, tiny_checkpoint, tmp_path):
    """On a frame range, the kept examples are frames (`<video>@<frame>`), and their patches are cut
    from those frames, sought again at the end: frame i's green level is 10 i."""
    from tests.test_data import write_video

    video = tmp_path / "clip.mp4"
    write_video(video, 12, size=(32, 32))
    cfg = make_cfg("model=checkpoint", f"model.path={tiny_checkpoint}", "model.arch=tests.tinymodels:TinyNet",
                   "model.num_classes=10", "model.input_size=32", "model.resize=32", "data=video",
                   f"data.path={video}", "data.start=2", "data.stop=11", "data.step=2", "num_workers=0",
                   "batch_size=3", "render.png=false", "technique=dataset_examples", "layers=[relu2]",
                   "technique.dataset_examples.top=2", "technique.dataset_examples.patch=full",
                   "technique.dataset_examples.patch_size=16")
    run(cfg, tmp_path / "run")
    got = examples(tmp_path / "run")
    ids = got["relu2", "top_ids"]
    assert all(i.startswith("clip.mp4@") for i in ids.ravel())
    for c in range(ids.shape[0]):
        for j, item in enumerate(ids[c]):
            frame = int(item.rsplit("@", 1)[1])
            assert frame in (2, 4, 6, 8, 10) and got["relu2", "top_frames"][c, j] == frame
            green = got["relu2", "top_patches"][c, j, 1].astype(float).mean()
            assert abs(green - 10 * frame) < 6, (item, green)


def test_sigkilled_mid_run_and_resumed_equals_the_clean_run(make_cfg, tmp_path):
    """The main process SIGKILLed after 6 committed rows (its running top-k lost with it): the
    resumed run's summary equals a clean run's exactly."""
    import os
    import signal

    from tests.test_faults import LAYERS as GATED_LAYERS
    from tests.test_faults import TECHNIQUES, app, gated, held_at

    folder, overrides = gated(tmp_path, 16)
    overrides = [o for o in overrides if o not in (TECHNIQUES, GATED_LAYERS)] + [
        "technique=dataset_examples", "layers=[relu1,relu2]", "technique.dataset_examples.top=3",
        "technique.dataset_examples.bottom=1", "render.png=false"]
    run_dir = tmp_path / "run"
    with held_at(overrides, run_dir, 6) as (proc, _, _):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    with open_run(run_dir) as r:
        assert 6 <= r.rows < 16 and r.summaries() == []
    assert app(overrides, run_dir).returncode == 0
    reference = tmp_path / "reference"
    assert app(overrides, reference).returncode == 0
    assert_same_examples(examples(run_dir), examples(reference))
    with open_run(run_dir) as r:
        assert r.rows == 16 and sorted(r.ids()) == sorted(p.name for p in folder.iterdir())
