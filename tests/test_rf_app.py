"""Receptive-field techniques through the runner: maps.h5 layout, PNG grids, the RF table, the
ERF summary over a resumed run, video frames, pipeline.layers, and errors before any work."""
import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.layers import layer_table
from pipeline.runner import plan, run
from tests.conftest import tiny_overrides
from tests.test_data import write_video

RF = "technique=[rf_forward,rf_ratio,rf_backward,erf]"


def test_run_writes_maps_grids_table_and_erf_summary(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, RF, "layers=[relu2]",
                                   "technique.rf_forward.crop=[[0,0,16,16],[8,8,4,4]]"))
    summary = run(cfg, out)
    assert summary.done == 7
    with h5py.File(out / "maps.h5") as f:
        # TinyNet: conv1 (3x3 s1 p1) -> conv2 (3x3 s2 p1): drawn layers conv1, conv2, relu2
        assert sorted(f["rf_forward"]) == ["conv1", "conv2", "relu2"]
        fwd = f["rf_forward/conv2/map"][:]
        assert fwd.shape == (7, 2, 16, 16)  # 7 inputs, 2 crops, conv2's 16 x 16 map
        assert np.allclose(fwd, fwd[:1])  # geometry only: the same for every input
        assert fwd[0, 0, 2, 2] == pytest.approx(1.0) and fwd[0, 0, 12, 12] == 0.0  # inside / far outside crop 0
        assert f["rf_ratio/conv1/map"].shape == (7, 1, 32, 32)  # default crop: the centred quarter
        assert f["rf_backward/input/map"].shape == (7, 1, 32, 32)
        assert f["rf_backward/input/map"][0].sum() == pytest.approx(1.0, abs=1e-5)  # centre unit: no padding reached
        assert f["erf/relu2/map"].shape == (7, 1, 32, 32)
        table = {name.decode(): (size, jump) for name, size, jump in
                 zip(f["receptive_fields/layer"][:], f["receptive_fields/size"][:], f["receptive_fields/jump"][:])}
        assert table["conv1"][0].tolist() == [3, 3] and table["conv2"][0].tolist() == [5, 5]
        assert table["conv2"][1].tolist() == [2, 2] and "fc" not in table  # the spatial path ended at the pool
        mean = f["summary/erf/relu2/mean"][:]
        assert np.allclose(mean, f["erf/relu2/map"][:, 0].mean(0), atol=1e-6)
        assert f["summary/erf/relu2/rf_box"][:].tolist() == [14, 14, 5, 5]  # unit (8, 8): centre 16, RF 5
    for name in ("rf_forward", "rf_ratio", "rf_backward", "erf"):
        assert len(list((out / "png" / name).glob("*.png"))) == 7
    assert (out / "png" / "erf.png").is_file()


def test_erf_summary_covers_every_row_after_a_resume(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    base = tiny_overrides(tiny_checkpoint, image_folder, "technique=erf", "layers=[conv2]", "render.png=false")
    run(make_cfg(*base, "data.limit=3"), out)
    with h5py.File(out / "maps.h5") as f:
        assert f["erf/conv2/map"].shape[0] == 3
    run(make_cfg(*base), out)  # resumes: the 4 other inputs
    with h5py.File(out / "maps.h5") as f:
        rows = f["erf/conv2/map"][:]
        assert rows.shape[0] == 7
        assert np.allclose(f["summary/erf/conv2/mean"][:], rows[:, 0].mean(0), atol=1e-6)


def test_rf_maps_on_a_video_frame(make_cfg, tiny_checkpoint, tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, 12)
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(tiny_checkpoint, tmp_path) if not o.startswith("data")]
    run(make_cfg(*overrides, "data=video", f"data.path={video}", "data.start=5", "data.stop=6",
                 "technique=rf_forward", "layers=[conv2]", "technique.rf_forward.crop=[4,4,8,8]"), out)
    with h5py.File(out / "maps.h5") as f:
        assert f["frame"][:].tolist() == [5]
        m = f["rf_forward/conv1/map"][0, 0]
        assert m[8, 8] == pytest.approx(1.0) and m[20, 20] == 0.0


@pytest.mark.parametrize("extra, message", [
    (["technique=rf_forward", "layers=[conv2]", "technique.rf_forward.crop=[30,30,8,8]"], "does not fit"),
    (["technique=rf_forward", "layers=[fc]"], "relu2|vector|spatial"),
    (["technique=rf_backward", "layers=[conv2]", "technique.rf_backward.crop=[0,0,17,1]"], "does not fit"),
    (["technique=rf_ratio", "layers=[conv2]", "technique.rf_ratio.display=pie"], "display"),
    (["technique=erf", "layers=[conv2]", "technique.erf.unit=[16,0]"], "outside"),
    (["technique=rf_forward", "layers=[conv2]", "technique.rf_forward.crop=[1,2,3]"], r"\[x, y, w, h\]"),
])
def test_bad_rf_settings_fail_before_work(make_cfg, image_folder, tiny_checkpoint, extra, message):
    with pytest.raises(ConfigError, match=message):
        plan(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra)))


def test_layer_table_prints_receptive_fields(make_cfg, tiny_checkpoint, tmp_path):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, tmp_path))
    lines = {line.split()[0]: line.split() for line in layer_table(cfg).splitlines() if not line.startswith("#")}
    assert lines["conv1"][-3:] == ["3", "1", "0"]  # rf, jump, centre
    assert lines["conv2"][-3:] == ["5", "2", "0"]
    assert lines["fc"][-3:] == ["-", "-", "-"]
