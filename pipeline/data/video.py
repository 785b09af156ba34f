"""Frames of one video file (OpenCV), each frame one input with its frame index."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

from pipeline.errors import ConfigError
from pipeline.data.base import BadItem, Item, Skip, Source, register_source, required_path


@register_source("video")
class VideoSource(Source):
    """Frames mode: frames start, start+step, ... < stop (None: to the end), each one input.
    Clips mode (clip_len set): clips of clip_len frames frame_stride apart, starting at start,
    start+clip_stride, ... while the clip's last frame is < stop; each clip one input [T, H, W, 3].
    Frames or clips past the end of the video become one skipped record for the whole
    out-of-range part; a range with no input at all (data.start past the end, a clip longer
    than the video or than the range) is a ConfigError. Building the list costs what the video
    holds, whatever `stop` is."""

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
            self.frame_size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        finally:
            cap.release()
        if count <= 0:
            raise ConfigError(f"data.path={path!r}: the video reports no frames")
        self.path, self.count = str(file), count
        self.clip_len, self.frame_stride = clip_len, frame_stride
        name = file.name
        if isinstance(stop, float) and stop.is_integer():  # 1e8 through an untyped config
            stop = int(stop)
        end = count if stop is None else stop
        if clip_len is None:
            span, what = 0, "frames"
            starts = range(start, end, step)
        else:
            span, what = (clip_len - 1) * frame_stride, "clips starting at frames"
            starts = range(start, max(start, end - span), clip_stride)
        if not starts:
            raise ConfigError(self._empty(name, start, stop))
        if limit:
            starts = starts[:limit]
        # Ranges and arithmetic only: the in-range part is a prefix of `starts`, found without
        # listing the rest, so a huge data.stop costs no more than the frames the video has.
        fits = len(range(starts.start, min(starts.stop, count - span), starts.step))
        inside, past = starts[:fits], starts[fits:]
        self.items = [Item(self._id(name, f), self.path, f) for f in inside]
        self.skipped = []
        if past:
            n_past = (past.stop - past.start + past.step - 1) // past.step  # len() overflows past 2**63
            self.skipped.append(Skip(
                self._id(name, past[0]), self.path, past[0],
                f"{what} {past[0]}..{past[-1]} ({n_past}) run past the end of the video ({count} frames)",
            ))
        # One capture per process, opened lazily: a forked DataLoader worker must not touch a
        # capture inherited from its parent (its decoder threads do not exist in the child).
        self._caps: Dict[int, list] = {}  # pid -> [capture, next frame it will decode]

    @classmethod
    def from_config(cls, cfg) -> "VideoSource":
        """data.path, the frame range (start, stop, step), data.limit and the clip keys."""
        return cls(required_path(cfg), cfg.start, cfg.stop, cfg.step, cfg.limit,
                   cfg.clip_len, cfg.frame_stride, cfg.clip_stride)

    def _empty(self, name: str, start: int, stop: Optional[int]) -> str:
        """Why a frame range holds no input at all (a ConfigError, before any work)."""
        count = self.count
        if self.clip_len is None:
            if stop is None:
                return f"data.start={start} is past the end of {name} ({count} frames)"
            return f"data.start={start} .. data.stop={stop} holds no frames"
        frames = (self.clip_len - 1) * self.frame_stride + 1
        clip = f"data.clip_len={self.clip_len} x data.frame_stride={self.frame_stride} spans {frames} frames"
        if frames > count:
            return f"{clip} but {name} has {count}"
        if stop is None:
            return (f"data.start={start} leaves no room for a clip in {name} ({count} frames): "
                    f"{clip}, so the last clip starts at frame {count - frames}")
        return f"data.start={start} .. data.stop={stop} is shorter than one clip ({clip})"

    def _id(self, name: str, first: int) -> str:
        if self.clip_len is None:
            return f"{name}@{first:06d}"
        return f"{name}@{first:06d}+{self.clip_len}x{self.frame_stride}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_caps"] = {}
        return state

    def read(self, item: Item, min_side: Optional[int] = None) -> np.ndarray:
        """One frame [H, W, 3], or in clips mode the clip's frames [T, H, W, 3] (full size:
        `min_side` is not used, video frames are decoded whole)."""
        if self.clip_len is None:
            return self._frame(item.frame)
        return np.stack([self._frame(item.frame + j * self.frame_stride) for j in range(self.clip_len)])

    def image_size(self, item: Item) -> Tuple[int, int]:
        """(W, H): the video's frame size as OpenCV reported it when the source was built (a
        video reporting none: the item decoded)."""
        return self.frame_size if min(self.frame_size) > 0 else super().image_size(item)

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
