"""hydra-submitit-launcher configs with this pipeline's defaults, under the plugin's own names.

`hydra/launcher=submitit_slurm` and `hydra/launcher=submitit_local` select them; every key stays
overridable (`hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=2 ...`). A job that Slurm
preempts or times out gets submitit's signal, is checkpointed (the plugin resubmits the same job)
and requeued; the requeued job runs in the same run dir, where the runner resumes from maps.h5.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore


def register_launchers() -> None:
    """Replace the plugin's submitit_slurm / submitit_local nodes with ours (same schema, other
    defaults). Hydra's plugin scan (which stores the plugin's nodes) runs once per process, so it
    is made to run first, and ours are stored over them."""
    from hydra.core.plugins import Plugins

    Plugins.instance()  # the scan: imports hydra_plugins.* (and stores their config nodes) once
    try:
        from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
    except ImportError:  # the launcher plugin is a dependency; without it the basic launcher still works
        return

    @dataclass
    class PipelineSlurm(SlurmQueueConf):
        partition: Optional[str] = None  # the cluster's default partition
        gpus_per_node: Optional[int] = 1
        cpus_per_task: Optional[int] = 8  # DataLoader decode workers + the main process
        mem_gb: Optional[int] = 32
        timeout_min: int = 240
        array_parallelism: int = 16  # most jobs of one sweep running at once
        max_num_timeout: int = 3  # requeues after a timeout; each resumes from maps.h5
        signal_delay_s: int = 120  # the USR2 warning before the time limit

    @dataclass
    class PipelineLocal(LocalQueueConf):
        timeout_min: int = 240
        gpus_per_node: Optional[int] = 0

    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_slurm", node=PipelineSlurm, provider="pipeline")
    cs.store(group="hydra/launcher", name="submitit_local", node=PipelineLocal, provider="pipeline")
