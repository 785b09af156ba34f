"""Still images: a folder (recursive) or the bundled sample photos."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import cv2
import numpy as np

from pipeline.config import ConfigError
from pipeline.data.base import BadItem, Item, Source

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"


class FolderSource(Source):
    """Every file below `root` with one of `extensions`, sorted by relative path (stable ids)."""

    def __init__(self, root: str | Path, extensions: Iterable[str], limit: Optional[int] = None):
        root = Path(root).expanduser()
        if not root.exists():
            raise ConfigError(f"data.path={str(root)!r} does not exist")
        if not root.is_dir():
            raise ConfigError(f"data.path={str(root)!r} is not a folder")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        if not files:
            raise ConfigError(f"data.path={str(root)!r} holds no images with extensions {sorted(exts)}")
        files = files[:limit] if limit else files
        self.items = [Item(p.relative_to(root).as_posix(), str(p)) for p in files]
        self.skipped = []

    def read(self, item: Item) -> np.ndarray:
        try:
            data = np.fromfile(item.source, dtype=np.uint8)
        except OSError as err:
            raise BadItem(f"cannot read file: {err.strerror or err}") from None
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
        if image is None:
            raise BadItem("cannot decode image (corrupt or unsupported format)")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class SamplesSource(FolderSource):
    """The public-domain / CC0 photos bundled in pipeline/samples (see LICENSES.md there)."""

    def __init__(self, limit: Optional[int] = None):
        super().__init__(SAMPLES_DIR, [".jpg"], limit)
