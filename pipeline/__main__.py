"""`python -m pipeline [overrides]`: the Hydra app over `pipeline.runner.run`."""
import logging
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.config import CONF_DIR, ConfigError, register_configs
from pipeline.data import resolve_shard
from pipeline.runner import run

log = logging.getLogger("pipeline")
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    try:
        if cfg.data.shard == "auto":  # in a multirun, a Slurm array index is the sweep's job number
            cfg.data.shard = resolve_shard("auto", multirun=hc.mode == RunMode.MULTIRUN)
        command = None
        if hc.mode == RunMode.MULTIRUN:  # this job alone, as a command (its process runs the launcher's)
            command = " ".join(shlex.quote(a) for a in ["python", "-m", "pipeline", *hc.overrides.task,
                                                          f"hydra.run.dir={hc.runtime.output_dir}"])
        summary = run(cfg, hc.runtime.output_dir, command)
    except ConfigError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary.line())


if __name__ == "__main__":
    main()
