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


def test_room_reserved_and_not_written_is_freed_at_close(tmp_path):
    """A summary reserves twice its raw size; lzf may store a fraction of it. The blocks allocated
    past the end of the file must not stay on disk after the run (du, quotas)."""
    import os

    path = tmp_path / "maps.h5"
    f = MapsFile(path, {"k": 1})
    f.write_group("summary", {"patches": np.zeros((64, 3, 64, 64), np.uint8)})  # compresses to almost nothing
    f.reserve(64 << 20)
    assert os.stat(path).st_blocks * 512 > 64 << 20  # the room is allocated while the file is open
    f.close()
    st = os.stat(path)
    assert st.st_blocks * 512 < st.st_size + (1 << 20)
    with h5py.File(path, "r") as h:
        assert h["summary/patches"].shape == (64, 3, 64, 64)


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


def test_a_chunk_torn_by_a_kill_mid_write_is_computed_again(tmp_path, caplog):
    """The process killed while HDF5 rewrote the chunk that holds the last committed rows: that
    chunk no longer decodes. On reopening the rows go back to the chunk's start (with a warning),
    so the resume computes them again; the rows before it are intact, nothing is counted twice."""
    path = tmp_path / "maps.h5"
    f = MapsFile(path, {"k": 1})
    for start in range(0, 39, 3):  # maps of 16 KiB: 4 rows per chunk, so the last one is partly filled
        f.append({**columns(start, 3), "erf/x/map": np.full((3, 1, 64, 64), start, np.float32)})
    chunk = f.f["erf/x/map"].chunks[0]
    assert chunk == 4 and 39 % chunk
    torn = (39 - 1) // chunk * chunk  # 36: rows 36..38 share the chunk the next batch was rewriting
    info = f.f["erf/x/map"].id.get_chunk_info_by_coord((torn, 0, 0, 0))
    f.close()
    with open(path, "r+b") as raw:  # what a torn rewrite leaves: garbage in the chunk's bytes
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    f = MapsFile(path, {"k": 1})
    assert f.rows == torn == 36 and "rows 36..38 were in a damaged chunk" in caplog.text
    assert sorted(f.done_ids()) == sorted(f"in{i}" for i in range(torn))
    assert f.f["erf/x/map"][:, 0, 0, 0].tolist() == [float(i // 3 * 3) for i in range(36)]  # intact before it
    f.append({**columns(36, 3), "erf/x/map": np.full((3, 1, 64, 64), 36, np.float32)})  # the resume writes them
    assert f.f["score"][:, 0].tolist() == list(range(39)) and f.f["erf/x/map"].shape[0] == 39
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
