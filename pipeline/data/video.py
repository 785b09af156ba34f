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
    """Frames mode: frames start, start+step, ... < stop (None: to the end), each one input.
    Clips mode (clip_len set): clips of clip_len frames frame_stride apart, starting at start,
    start+clip_stride, ... while the clip's last frame is < stop; each clip one input [T, H, W, 3].
    Frames or clips past the end of the video become one skipped record for the whole
    out-of-range part."""

    def __init__(self, path: str, start: int = 0, stop: Optional[int] = None, step: int = 1, limit: Optional[int] = None,
                 clip_len: Optional[int] = None, frame_stride: int = 1, clip_stride: int = 16):
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
        self.clip_len, self.frame_stride = clip_len, frame_stride
        name, end = file.name, count if stop is None else stop
        if clip_len is None:
            starts, span, what = range(start, end, step), 0, "frames"
        else:
            span, what = (clip_len - 1) * frame_stride, "clips starting at frames"
            starts = range(start, max(start, end - span), clip_stride)
        if limit:
            starts = starts[:limit]
        self.items = [Item(self._id(name, f), self.path, f) for f in starts if f + span < count]
        past = [f for f in starts if f + span >= count]
        self.skipped = []
        if past:
            self.skipped.append(Skip(
                self._id(name, past[0]), self.path, past[0],
                f"{what} {past[0]}..{past[-1]} ({len(past)}) run past the end of the video ({count} frames)",
            ))
        # One capture per process, opened lazily: a forked DataLoader worker must not touch a
        # capture inherited from its parent (its decoder threads do not exist in the child).
        self._caps: Dict[int, list] = {}  # pid -> [capture, next frame it will decode]

    def _id(self, name: str, first: int) -> str:
        if self.clip_len is None:
            return f"{name}@{first:06d}"
        return f"{name}@{first:06d}+{self.clip_len}x{self.frame_stride}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_caps"] = {}
        return state

    def read(self, item: Item) -> np.ndarray:
        """One frame [H, W, 3], or in clips mode the clip's frames [T, H, W, 3]."""
        if self.clip_len is None:
            return self._frame(item.frame)
        return np.stack([self._frame(item.frame + j * self.frame_stride) for j in range(self.clip_len)])

    def _frame(self, index: int) -> np.ndarray:
        entry = self._caps.get(os.getpid())
        if entry is None:
            entry = self._caps[os.getpid()] = [cv2.VideoCapture(self.path), -1]
        cap, next_frame = entry
        gap = index - next_frame
        if next_frame >= 0 and 0 <= gap <= 64:  # short forward hop: decode through, no seek
            for _ in range(gap):
                cap.grab()
        else:
            cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
        if not ok or frame is None:
            entry[1] = -1
            raise BadItem(f"cannot decode frame {index}")
        entry[1] = index + 1
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
