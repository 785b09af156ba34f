"""`data.shard`: split one run's inputs deterministically over n jobs (`i/n`, 0 <= i < n).

"auto" (the default) takes the shard from a Slurm job array (SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT, counted from SLURM_ARRAY_TASK_MIN) when those are set, except inside a
Hydra multirun, where the array index is the sweep's job number; "all" never shards.
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Sequence, Tuple, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")
_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(value: str) -> Optional[Tuple[int, int]]:
    """"i/n" -> (i, n); "all" -> None. "auto" must be resolved first (`resolve_shard`)."""
    if value == "all":
        return None
    m = _SHARD.match(str(value).strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"data.shard={value!r}: expected i/n with 0 <= i < n (e.g. 0/4), auto or all")
    return int(m.group(1)), int(m.group(2))


def resolve_shard(value: str, env: Mapping[str, str] = os.environ, multirun: bool = False) -> str:
    """"auto" -> "i/n" from a Slurm job array, else "all"; other values are returned checked."""
    if value != "auto":
        parse_shard(value)
        return value
    task, count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if multirun or task is None or count is None:
        return "all"
    index = int(task) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    shard = f"{index}/{int(count)}"
    parse_shard(shard)
    return shard


def block(items: Sequence[T], index: int, count: int) -> list:
    """The index-th of `count` contiguous, near-equal blocks of `items` (every item in exactly one)."""
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])
