"""`python -m pipeline [overrides]`: the Hydra app over `pipeline.runner.run`."""
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.config import CONF_DIR, ConfigError, register_configs
from pipeline.runner import run

log = logging.getLogger("pipeline")
register_configs()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary.line())


if __name__ == "__main__":
    main()
