import h5py
import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import Skip
from pipeline.store import MapsFile, key_differences


def columns(start, n):
    ids = np.array([f"in{i}" for i in range(start, start + n)], dtype=object)
    return {"id": ids, "score": np.arange(start, start + n, dtype=np.float32)[:, None],
            "gradcam/layer4/cam": np.full((n, 1, 7, 7), start, np.float32)}


def test_append_reopen_and_done_ids(tmp_path):
    f = MapsFile(tmp_path / "maps.h5", {"k": 1}, {"config": "a: 1"})
    assert f.append(columns(0, 3)) == 0 and f.append(columns(3, 2)) == 3
    f.append_skipped([Skip("bad.jpg", "/x/bad.jpg", -1, "cannot decode")])
    f.close()
    f = MapsFile(tmp_path / "maps.h5", {"k": 1})
    assert f.done_ids() == {"in0", "in1", "in2", "in3", "in4", "bad.jpg"}
    f.close()
    with h5py.File(tmp_path / "maps.h5", "r") as h:
        assert h["gradcam/layer4/cam"].shape == (5, 1, 7, 7)
        assert h["gradcam/layer4/cam"].chunks[1:] == (1, 7, 7)
        assert h["gradcam/layer4/cam"].compression == "lzf"
        assert h["skipped/reason"][0].decode() == "cannot decode"
        assert h.attrs["config"] == "a: 1"


def test_uncommitted_rows_are_dropped_on_reopen(tmp_path):
    f = MapsFile(tmp_path / "maps.h5", {"k": 1})
    f.append(columns(0, 4))
    f.f["id"].resize(6, axis=0)  # a batch half-written when the process died
    f.f["score"].resize(6, axis=0)
    f.close()
    f = MapsFile(tmp_path / "maps.h5", {"k": 1})
    assert f.rows == 4 and f.f["id"].shape == (4,) and f.f["score"].shape == (4, 1)
    f.append(columns(4, 2))
    assert [s.decode() for s in f.f["id"][:]] == [f"in{i}" for i in range(6)]
    f.close()


def test_other_run_key_refuses_to_resume(tmp_path):
    MapsFile(tmp_path / "maps.h5", {"layers": ["a"]}).close()
    with pytest.raises(ConfigError, match=r'other settings.*layers: \["a"\] -> \["b"\]'):
        MapsFile(tmp_path / "maps.h5", {"layers": ["b"]})


def test_unreadable_file_gives_a_clear_error(tmp_path):
    (tmp_path / "maps.h5").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is not an HDF5 file"):
        MapsFile(tmp_path / "maps.h5", {})


def test_keys_a_run_did_not_have_match_only_when_off():
    old = {"data": {"path": "x"}, "technique": {"gradcam": {"relu": True}}}
    new = {"data": {"path": "x", "max_pixels": 100, "reduced_decode": True}, "technique": {"gradcam": {"relu": False}}}
    assert key_differences(old, new) == ["data.max_pixels: (not set) -> 100", "data.reduced_decode: (not set) -> true",
                                         "technique.gradcam.relu: true -> false"]
    new["data"].update(max_pixels=None, reduced_decode=False)  # the old behaviour: a run made before them resumes
    assert key_differences(old, new) == ["technique.gradcam.relu: true -> false"]
