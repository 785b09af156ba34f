"""Frames of one video file (OpenCV), each frame one input with its frame index."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import cv2
import numpy as np

from pipeline.config import ConfigError
from pipeline.data.base import BadItem, Item, Skip, Source


class VideoSource(Source):
    """Frames start, start+step, ... < stop (None: to the end). Frames past the end of the video
    become one skipped record for the whole out-of-range part."""

    def __init__(self, path: str, start: int = 0, stop: Optional[int] = None, step: int = 1, limit: Optional[int] = None):
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"data.path={path!r} does not exist")
        cap = cv2.VideoCapture(str(file))
        try:
            if not cap.isOpened():
                raise ConfigError(f"data.path={path!r}: OpenCV cannot open this video")
            count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        finally:
            cap.release()
        if count <= 0:
            raise ConfigError(f"data.path={path!r}: the video reports no frames")
        self.path, self.count = str(file), count
        frames = range(start, count if stop is None else stop, step)
        if limit:
            frames = frames[:limit]
        name = file.name
        self.items = [Item(f"{name}@{f:06d}", self.path, f) for f in frames if f < count]
        past = [f for f in frames if f >= count]
        self.skipped = []
        if past:
            self.skipped.append(Skip(
                f"{name}@{past[0]:06d}", self.path, past[0],
                f"frames {past[0]}..{past[-1]} ({len(past)} frames) are past the end of the video ({count} frames)",
            ))
        # One capture per process, opened lazily: a forked DataLoader worker must not touch a
        # capture inherited from its parent (its decoder threads do not exist in the child).
        self._caps: Dict[int, list] = {}  # pid -> [capture, next frame it will decode]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_caps"] = {}
        return state

    def read(self, item: Item) -> np.ndarray:
        entry = self._caps.get(os.getpid())
        if entry is None:
            entry = self._caps[os.getpid()] = [cv2.VideoCapture(self.path), -1]
        cap, next_frame = entry
        gap = item.frame - next_frame
        if next_frame >= 0 and 0 <= gap <= 64:  # short forward hop: decode through, no seek
            for _ in range(gap):
                cap.grab()
        else:
            cap.set(cv2.CAP_PROP_POS_FRAMES, item.frame)
        ok, frame = cap.read()
        if not ok or frame is None:
            entry[1] = -1
            raise BadItem(f"cannot decode frame {item.frame}")
        entry[1] = item.frame + 1
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
