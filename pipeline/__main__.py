"""`python -m pipeline [overrides]`: the Hydra app over `pipeline.runner.run`.

Exit codes: 0 done; 1 a run stopped by a condition the user can fix (a full disk: `error:` line);
2 a config or run dir refused before any work (`error:` line); 130 Ctrl-C and 143 SIGTERM (the
attempt is recorded as interrupted; running the same command again resumes).
"""
import logging
import shlex
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.cli import group_override_errors, register_help_resolver, say, write_hydra_record
from pipeline.config import CONF_DIR, ConfigError, register_configs
from pipeline.data import resolve_shard
from pipeline.errors import RunError
from pipeline.interrupts import Terminated
from pipeline.runner import run

register_configs()
register_help_resolver()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    try:
        if cfg.data.shard == "auto":  # in a multirun, a Slurm array index is the sweep's job number
            cfg.data.shard = resolve_shard("auto", multirun=hc.mode == RunMode.MULTIRUN)
        command = None
        if hc.mode == RunMode.MULTIRUN:  # this job alone, as a command (its process runs the launcher's)
            command = " ".join(shlex.quote(a) for a in ["python", "-m", "pipeline", *hc.overrides.task,
                                                          f"hydra.run.dir={run_dir}"])
        summary = run(cfg, run_dir, command, on_start=lambda: write_hydra_record(run_dir, cfg))
    except ConfigError as err:
        say(f"error: {err}", logging.ERROR, sys.stderr)
        sys.exit(2)
    except RunError as err:
        say(f"error: {err}", logging.ERROR, sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        signal_name = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
        say(f"interrupted by {signal_name}; the attempt is recorded in {run_dir}/maps.h5, and running the same "
            "command again resumes it", logging.WARNING, sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    say(summary.line())


if __name__ == "__main__":
    errors = group_override_errors(sys.argv[1:])
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    main()
