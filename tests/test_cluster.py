"""Sweeps through hydra-submitit-launcher (submitit_local: every job its own process), the launcher
configs, sharding defaults from a Slurm job array, and a preempted job requeued by submitit that
resumes in the same run dir."""
import json
import os
import signal
import subprocess

import h5py
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import block, resolve_shard
from tests.conftest import PYTHON, Gate, subprocess_env, tiny_overrides, write_images
from tests.tinymodels import GateNet


def read_attrs(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("rows", 0)), json.loads(f.attrs.get("attempts", "[]"))
    except (OSError, KeyError, ValueError):
        return 0, []


def ids(path):
    with h5py.File(path, "r") as f:
        return [s.decode() for s in f["id"][: f.attrs["rows"]]]


def test_launcher_configs_keep_every_key_overridable(make_cfg):
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.gpus_per_node=2", "hydra.launcher.cpus_per_task=16",
                                 "hydra.launcher.mem_gb=64", "hydra.launcher.timeout_min=600",
                                 "hydra.launcher.array_parallelism=4"])
        slurm = cfg.hydra.launcher
        assert slurm._target_.endswith("SlurmLauncher")
        assert (slurm.partition, slurm.gpus_per_node, slurm.cpus_per_task, slurm.mem_gb, slurm.timeout_min,
                slurm.array_parallelism) == ("gpu", 2, 16, 64, 600, 4)
        assert slurm.max_num_timeout == 3  # ours: a timed-out job is requeued and resumes
        local = compose(config_name="config", return_hydra_config=True,
                        overrides=["hydra/launcher=submitit_local"]).hydra.launcher
        assert local._target_.endswith("LocalLauncher") and local.timeout_min == 240


def test_shard_defaults_to_a_slurm_array_outside_multiruns():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}
    assert resolve_shard("auto", env) == "2/4"
    assert resolve_shard("auto", env, multirun=True) == "all"  # there the index is the sweep's job number
    assert resolve_shard("auto", {}) == "all" and resolve_shard("1/3", env) == "1/3"
    for bad in ("3/3", "a/b", "1/0", "-1/2"):
        with pytest.raises(ConfigError, match="data.shard"):
            resolve_shard(bad)
    items = list(range(10))
    parts = [block(items, i, 3) for i in range(3)]
    assert sum(parts, []) == items and [len(p) for p in parts] == [3, 3, 4]


def test_submitit_local_sweep_runs_each_job_in_its_own_process(image_folder, tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [PYTHON, "-m", "pipeline", "-m", "hydra/launcher=submitit_local",
           *tiny_overrides(tiny_checkpoint, image_folder), "technique=gradcam,activations", "layers=[conv1],[conv2]",
           f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted(str(p.relative_to(image_folder)) for p in image_folder.rglob("*.png"))
    pids = set()
    jobs = {}
    for job in range(4):
        path = sweep / str(job) / "maps.h5"
        assert sorted(ids(path)) == expected
        with h5py.File(path, "r") as f:
            key = json.loads(f.attrs["run_key"])
            jobs[job] = (list(key["technique"]), key["layers"])
            (attempt,) = json.loads(f.attrs["attempts"])
            assert attempt["finished"] and attempt["done"] == len(expected)
            pids.add(attempt["pid"])
    assert jobs == {0: (["gradcam"], ["conv1"]), 1: (["gradcam"], ["conv2"]),
                    2: (["activations"], ["conv1"]), 3: (["activations"], ["conv2"])}
    assert len(pids) == 4 and os.getpid() not in pids  # four separate job processes
    assert (sweep / ".submitit").is_dir()


def test_preempted_job_is_requeued_and_resumes_in_its_run_dir(tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 30, size=(32, 32))
    torch.manual_seed(0)
    torch.save(GateNet().state_dict(), tmp_path / "gate.pt")
    sweep, gate = tmp_path / "sweep", Gate(tmp_path / "gate")
    cmd = [PYTHON, "-m", "pipeline", "-m", "hydra/launcher=submitit_local", "model=checkpoint",
           f"model.path={tmp_path / 'gate.pt'}", "model.arch=tests.tinymodels:GateNet", "model.num_classes=10",
           "model.input_size=32", "model.resize=32", "data=folder", f"data.path={folder}", "batch_size=2",
           "num_workers=0", "technique=gradcam", "layers=[conv2]", "render.max_inputs=2", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=gate.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    maps = sweep / "0" / "maps.h5"
    try:
        gate.until_rows(maps, 6, proc)  # the job then waits at its next forward: it cannot end first
        rows, attempts = read_attrs(maps)
        assert rows < 30
        # what Slurm does before preempting or at the time limit: submitit's signal to the job's process
        os.kill(attempts[-1]["pid"], signal.SIGUSR2)
        gate.open()  # the requeued job runs through
        _, stderr = proc.communicate(timeout=Gate.HANG)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-3000:]
    _, attempts = read_attrs(maps)
    assert len(attempts) == 2  # the preempted attempt and the requeued one, in the same run dir
    first, second = attempts
    assert not first["finished"] and first["interrupted"] and 6 <= first["rows"] < 30
    assert second["finished"] and second["done"] == 30 - first["rows"] and second["pid"] != first["pid"]
    assert sorted(ids(maps)) == sorted(p.name for p in folder.iterdir())  # none lost, none twice
    log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued" in log or "requeu" in log.lower()


def test_maps_h5_records_provenance(image_folder, tiny_checkpoint, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_checkpoint, image_folder), "technique=gradcam", "layers=[conv2]", "seed=11",
                 f"hydra.run.dir={run_dir}"]
    result = subprocess.run([PYTHON, "-m", "pipeline", *overrides], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True)
    with h5py.File(run_dir / "maps.h5", "r") as f:
        attrs = dict(f.attrs)
    assert attrs["git_commit"] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    assert attrs["git_dirty"] in (True, False)
    versions = json.loads(attrs["versions"])
    assert torch.__version__.startswith(versions["torch"]) and versions["h5py"] == h5py.__version__
    assert attrs["device"].startswith("cpu") and attrs["seed"] == 11 and attrs["shard"] == "all"
    assert attrs["command"].startswith("python -m pipeline ") and "seed=11" in attrs["command"]
    (attempt,) = json.loads(attrs["attempts"])
    assert attempt["finished"] and attempt["command"] == attrs["command"] and attempt["done"] == 7
