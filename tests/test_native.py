"""pipeline.native: C kernels built on first use, cached per source / compiler / CPU, atomically
written, and a fallback to the torch code where no build is possible (ROAD's imputation)."""
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from pipeline import native
from pipeline.metrics import road
from pipeline.runner import run
from tests.conftest import REPO, tiny_overrides
from tests.test_metrics import smooth_image


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty build cache, and what native.load remembered forgotten before and after."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PIPELINE_NATIVE", raising=False)
    native.forget()
    yield tmp_path / "cache" / "native"
    native.forget()


def planes(h=33, w=30):
    return smooth_image(2, h, w), torch.rand(2, h, w, generator=torch.Generator().manual_seed(1)) < 0.4


def test_a_build_is_cached_and_reused(fresh_cache):
    assert road.kernel() is not None
    (built,) = fresh_cache.glob("road_kernel-*.so")
    stamp = built.stat().st_mtime_ns
    native.forget()
    assert road.kernel() is not None
    assert [p.name for p in fresh_cache.iterdir()] == [built.name]  # not rebuilt, nothing left over
    assert built.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("setting", [{"CC": "/nonexistent/cc"}, {"CC": "false"}, {"PIPELINE_NATIVE": "0"}],
                         ids=["no compiler", "failing compiler", "switched off"])
def test_without_a_build_the_torch_solver_is_used(fresh_cache, monkeypatch, caplog, setting):
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    x, removed = planes()
    with caplog.at_level("INFO", logger="pipeline.native"):
        auto = road.impute(x, removed)
    assert road.kernel() is None
    assert "road_kernel.c" in caplog.text
    assert torch.equal(auto, road.impute(x, removed, solver="torch"))
    with pytest.raises(RuntimeError, match="C solver is not available"):
        road.impute(x, removed, solver="c")
    assert not fresh_cache.exists() or not list(fresh_cache.iterdir())  # no half-written file left


def test_an_unwritable_cache_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    native.forget()
    try:
        x, removed = planes()
        assert torch.equal(road.impute(x, removed), road.impute(x, removed, solver="torch"))
        assert "could not build road_kernel.c" in caplog.text and "NotADirectoryError" in caplog.text
    finally:
        native.forget()


def test_a_damaged_cached_build_is_built_again(fresh_cache, caplog):
    target = native.target_path(road.KERNEL, native.compiler())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\x7fELF cut short by a full disk")
    assert road.kernel() is not None
    assert "building it again" in caplog.text
    assert [p.name for p in fresh_cache.iterdir()] == [target.name]


@pytest.mark.parametrize("size", [(33, 30), (1, 7), (2, 3), (15, 16), (17, 33), (64, 31)])
def test_the_c_and_torch_solvers_agree(size):
    """On sides of every kind the multigrid meets: one level only, odd sides padded, many levels."""
    x, removed = planes(*size)
    c, t = road.impute(x, removed, solver="c"), road.impute(x, removed, solver="torch")
    torch.testing.assert_close(c, t, atol=2e-5, rtol=0)
    assert torch.equal(c[~removed[:, None].expand_as(x)], x[~removed[:, None].expand_as(x)])
    with pytest.raises(ValueError, match="known: auto, c, torch"):
        road.impute(x, removed, solver="fortran")


def test_jobs_building_at_once_share_one_build(tmp_path):
    """Four processes start with the same empty cache (a multirun's first jobs): each gets a working
    library, the cache holds one file and no temporary one."""
    script = textwrap.dedent("""
        import sys, torch
        from pipeline.metrics import road
        assert road.kernel() is not None
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, 20, 20, generator=g)
        torch.save(road.impute(x, torch.rand(1, 20, 20, generator=g) < 0.5, solver="c"), sys.argv[1])
    """)
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("PIPELINE_NATIVE", None)
    jobs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"{i}.pt")], env=env) for i in range(4)]
    assert [job.wait(timeout=300) for job in jobs] == [0] * 4
    outs = [torch.load(tmp_path / f"{i}.pt") for i in range(4)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert [p.suffix for p in (tmp_path / "cache" / "native").iterdir()] == [".so"]


def test_a_run_without_a_compiler_writes_the_same_road_values(fresh_cache, monkeypatch, caplog, make_cfg,
                                                              image_folder, tiny_checkpoint, tmp_path):
    """ROAD in a run: the C solver, or the torch one where no compiler is found (announced before
    the per-input loop), to float32 rounding."""
    extra = ("technique=gradcam", "layers=[relu2]", "evaluate.road=true", "evaluate.road_percentages=[25,75]",
             "render.png=false")
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra)), tmp_path / "c")
    assert list(fresh_cache.glob("*.so"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    native.forget()
    with caplog.at_level("INFO"):
        run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *extra)), tmp_path / "torch")
    messages = [r.getMessage() for r in caplog.records]
    fallback = next(i for i, m in enumerate(messages) if "no C compiler found" in m)
    assert fallback == next(i for i, m in enumerate(messages) if m.startswith("model ")) + 1  # before any input
    with h5py.File(tmp_path / "c" / "maps.h5", "r") as a, h5py.File(tmp_path / "torch" / "maps.h5", "r") as b:
        for col in ("road_morf", "road_lerf"):
            np.testing.assert_allclose(a[f"gradcam/relu2/cam.{col}"][:7], b[f"gradcam/relu2/cam.{col}"][:7], atol=1e-4)
