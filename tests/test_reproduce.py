"""python -m pipeline.reproduce: the recorded config re-run into a new dir and compared."""
import h5py

from pipeline.reproduce import compare, main
from pipeline.runner import run
from tests.conftest import tiny_overrides


def test_reproduce_agrees_then_flags_a_changed_dataset(make_cfg, image_folder, tiny_checkpoint, tmp_path, capsys):
    original = tmp_path / "run"
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,smoothgrad]", "layers=[conv2]",
                                 "technique.smoothgrad.samples=4", "seed=7")), original)
    assert main([str(original), "--out", str(tmp_path / "again"), "--trust-code"]) == 0
    out = capsys.readouterr().out
    assert "gradcam/conv2/cam" in out and "smoothgrad/input/grad" in out and "DIFFERS" not in out
    with h5py.File(original / "maps.h5", "a") as f:
        f["gradcam/conv2/cam"][2] += 0.5  # the original no longer matches what its config computes
    assert main([str(original), "--out", str(tmp_path / "third"), "--trust-code"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "DIFFERS" in line]
    assert len(lines) == 1 and lines[0].startswith("gradcam/conv2/cam") and "0.5" in lines[0]
    assert main([str(original), "--out", str(tmp_path / "third"), "--trust-code"]) == 2  # never over an existing run


def test_compare_matches_rows_by_id_and_reports_missing_datasets(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam", "layers=[conv2]", "render.png=false")
    run(make_cfg(*overrides, "batch_size=2"), a)
    run(make_cfg(*overrides, "batch_size=5", "data.limit=3"), b)  # other batches; then the rest, resumed
    run(make_cfg(*overrides, "batch_size=5"), b)
    assert all(diff <= 1e-5 for _, diff, _ in compare(a / "maps.h5", b / "maps.h5"))
    with h5py.File(b / "maps.h5", "a") as f:
        del f["gradcam/conv2/cam"]
    (row,) = [r for r in compare(a / "maps.h5", b / "maps.h5") if r[0] == "gradcam/conv2/cam"]
    assert row[1] == float("inf") and "only in the original" in row[2]


def test_reproduce_needs_a_run_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no maps.h5" in capsys.readouterr().err
