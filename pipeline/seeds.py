"""Random draws keyed by what they are for, not by when they happen.

`keyed_seed(seed, *key)` hashes the run's `seed` with a key (an input's id and a purpose such as
"smoothgrad/noise" and a sample number; a layer and a channel) into a 63-bit seed. A draw made from
`keyed_generator(seed, *key)` is therefore the same whatever the batch size, the input's position
in its batch, the shard or the resume boundaries: an input's SmoothGrad noise, its IG noise
baseline, its inversion start and its dream's jitter depend only on `seed` and its id.
"""
from __future__ import annotations

import hashlib
import json

import torch


def keyed_seed(seed: int, *key) -> int:
    digest = hashlib.sha256(json.dumps([int(seed), *map(str, key)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(seed: int, *key, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(keyed_seed(seed, *key))
