"""DataLoader over a source's items: decoding and preprocessing run in worker processes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data.base import BadItem, Item, Skip, Source, prepare
from pipeline.models import Preprocess


@dataclass
class Batch:
    items: List[Item]  # the decoded inputs, in order
    x: Optional[torch.Tensor]  # [N, 3, S, S] model input (None when every item failed)
    display: Optional[np.ndarray]  # [N, S, S, 3] uint8, the crop the model saw
    skipped: List[Skip]  # items of this batch that could not be used


class _Items(Dataset):
    def __init__(self, source: Source, items: Sequence[Item], crop, pre: Preprocess):
        self.source, self.items, self.crop, self.pre = source, list(items), crop, pre

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            x, display = prepare(self.source.read(item), self.crop, self.pre)
            return item, x, display, None
        except BadItem as err:
            return item, None, None, str(err)
        except Exception as err:  # noqa: BLE001 - one bad input must not end the run
            return item, None, None, f"{type(err).__name__}: {err}"


def _collate(samples) -> Batch:
    good = [s for s in samples if s[3] is None]
    skipped = [Skip(it.id, it.source, it.frame, reason) for it, _, _, reason in samples if reason is not None]
    if not good:
        return Batch([], None, None, skipped)
    return Batch(
        [s[0] for s in good],
        torch.stack([s[1] for s in good]),
        np.stack([s[2] for s in good]),
        skipped,
    )


def _worker_init(_: int) -> None:
    # No cv2.setNumThreads() here: in a forked worker it deadlocks once the parent has used
    # OpenCV's thread pool (seen with VideoCapture); OpenCV copes with the fork by itself.
    torch.set_num_threads(1)


def make_loader(source: Source, items: Sequence[Item], crop, pre: Preprocess, batch_size: int,
                num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        _Items(source, items, crop, pre),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers else None,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )
