"""What the command line adds around `run()`: checks of the group overrides before Hydra composes
(a typo inside a list names the known options), the run dir checked before Hydra creates it, the
app's own `--help`, each message printed once (and kept in the run's log file), and Hydra's
`.hydra/` record written once a run is accepted."""
from __future__ import annotations

import difflib
import logging
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline.config import CONF_DIR
from pipeline.io.space import write_atomic

log = logging.getLogger("pipeline")
GROUPS = ("model", "data", "technique")  # the app's config groups (conf/<group>/<option>.yaml)


def say(message: str, level: int = logging.INFO, stream=None) -> None:
    """Print `message` once on `stream` (stdout by default), and write it to the run's log file
    (Hydra's `<run dir>/__main__.log`) without a second copy on the console."""
    print(message, file=stream or sys.stdout, flush=True)
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def group_options(conf_dir: Path = CONF_DIR) -> Dict[str, List[str]]:
    """{group: its options}, from the YAML files in conf/<group>/."""
    return {g: sorted(p.stem for p in (conf_dir / g).glob("*.yaml")) for g in GROUPS}


# -- group overrides, before Hydra composes ----------------------------------------------------------
def _names(value) -> Iterable[str]:
    """Option names in an override's value: a name, a list of names, a sweep of either."""
    from hydra.core.override_parser.types import ChoiceSweep

    if isinstance(value, ChoiceSweep):
        for element in value.list:
            yield from _names(element)
    elif isinstance(value, (list, tuple)):
        for element in value:
            yield from _names(element)
    elif isinstance(value, str):
        yield value


def group_override_errors(args: Sequence[str], options: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """One message per unknown option in the command line's group overrides (`technique=[a,b]`,
    `model=x`, sweeps `technique=a,b`), naming the closest known options and all of them. Hydra
    itself names the known options for a single unknown name but not inside a list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    options = options or group_options()
    parser, errors = OverridesParser.create(), []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - Hydra reports malformed overrides itself
            continue
        group = override.key_or_group
        if group not in options or override.package is not None or override.is_delete():
            continue
        for name in _names(override.value()):
            if name not in options[group]:
                close = difflib.get_close_matches(name, options[group], n=3, cutoff=0.5)
                errors.append(f"{arg}: {name!r} is not a {group}" + (f"; closest: {', '.join(close)}" if close else "")
                              + f"; known: {', '.join(options[group])}")
    return errors


# -- the run dir, before Hydra creates it -------------------------------------------------------------
def unwritable(folder: Path) -> Optional[str]:
    """Why `folder` cannot be made and written (a file on the way, a read-only filesystem, no
    permission), or None; nothing is created."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            return f"{existing} is a broken symlink"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"{existing} is not writable ({err.strerror})"
    return None


class RunDirCheck(Callback):
    """Hydra callback (conf/config.yaml): an output dir that cannot be created is one `error:`
    line and exit code 2, before Hydra's own mkdir would end in a traceback."""

    def _check(self, folder, key: str) -> None:
        problem = unwritable(Path(str(folder)))
        if problem:
            print(f"error: {key}={folder} cannot be created: {problem}; choose another {key}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


# -- help ------------------------------------------------------------------------------------------
def help_groups() -> str:
    """The `== Config groups ==` part of `--help`: each group with its options."""
    return "\n".join(f"{group}: {', '.join(names)}" for group, names in group_options().items())


def register_help_resolver() -> None:
    OmegaConf.register_new_resolver("pipeline_help_groups", help_groups, replace=True)


# -- the .hydra record ------------------------------------------------------------------------------
def write_hydra_record(run_dir: str, cfg: DictConfig) -> None:
    """Hydra's `.hydra/{config,hydra,overrides}.yaml`, written by the app (conf/config.yaml sets
    `hydra.output_subdir: null`) only once the run is accepted, so a refused resume leaves the
    record of the run that made maps.h5."""
    hc = HydraConfig.get()
    folder = Path(run_dir) / ".hydra"
    for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hc})),
                       ("overrides.yaml", hc.overrides.task)):
        write_atomic(folder / name, OmegaConf.to_yaml(node).encode())
