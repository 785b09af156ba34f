"""Still images: a folder (recursive, through symlinked folders) or the bundled sample photos."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO, Dict, Iterable, List, Optional, Set, Tuple

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import ConfigError
from pipeline.data.base import BadItem, Item, Skip, Source, register_source, required_path

log = logging.getLogger("pipeline")

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
MAX_PIXELS = 100_000_000  # data.max_pixels' default
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_JPEG = ("JPEG", "MPO")  # Pillow's names for JPEG files (MPO: multi-picture JPEG, first picture)


def decode_options(cfg) -> dict:
    """max_pixels and reduced_decode of a `data` config (.get: configs recorded in maps.h5 before
    these keys existed, from which merge rebuilds sources)."""
    return dict(max_pixels=cfg.get("max_pixels", MAX_PIXELS), reduced_decode=cfg.get("reduced_decode", True))


@register_source("folder")
class FolderSource(Source):
    """Every file below `root` with one of `extensions`, sorted by relative path (stable ids).

    Symlinked sub-folders are followed, each folder listed once (see `_walk`); an image-named
    symlink that leads nowhere is a skipped record. `max_pixels` (None: no limit): images whose
    header gives more pixels are skipped before decoding. `reduced_decode`: a JPEG read with a
    `min_side` is decoded at 1/2, 1/4 or 1/8 size when that leaves its shorter side >= 2 x min_side.
    """

    def __init__(self, root: str | Path, extensions: Iterable[str], limit: Optional[int] = None,
                 max_pixels: Optional[int] = MAX_PIXELS, reduced_decode: bool = True):
        root = Path(root).expanduser()
        if not root.exists():
            raise ConfigError(f"data.path={str(root)!r} does not exist")
        if not root.is_dir():
            raise ConfigError(f"data.path={str(root)!r} is not a folder")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        files, dangling = _walk(root, exts)
        if not files:
            also = ""
            if dangling:
                also = f" ({len(dangling)} dangling symlink(s), e.g. {dangling[0].id}: {dangling[0].reason})"
            raise ConfigError(f"data.path={str(root)!r} holds no images with extensions {sorted(exts)}{also}")
        if limit and len(files) > limit:
            # data.limit counts inputs; the listing is cut right after the last input kept.
            files = files[:limit]
            dangling = [s for s in dangling if s.id < files[-1][0]]
        self.items = [Item(rel, path) for rel, path in files]
        self.skipped: List[Skip] = dangling
        self.max_pixels, self.reduced_decode = max_pixels, reduced_decode

    @classmethod
    def from_config(cls, cfg) -> "FolderSource":
        """data.path, data.extensions, data.limit and the decode options."""
        return cls(required_path(cfg), cfg.extensions, cfg.limit, **decode_options(cfg))

    def read(self, item: Item, min_side: Optional[int] = None) -> np.ndarray:
        try:
            with open(item.source, "rb") as fp:
                header = image_header(fp)
                if header is not None:
                    self._check_budget(*header[:2])
                fp.seek(0)
                data = np.frombuffer(fp.read(), dtype=np.uint8)
        except OSError as err:
            raise BadItem(f"cannot read file: {err.strerror or err}") from None
        flags = cv2.IMREAD_COLOR
        if header is not None and header[2] in _JPEG and min_side and self.reduced_decode:
            flags = _REDUCED.get(reduction(header[0], header[1], min_side), cv2.IMREAD_COLOR)
        # header None: Pillow cannot read this header (e.g. a Radiance .hdr), but OpenCV may
        # decode the file; it does so under its own cap (CV_IO_MAX_IMAGE_PIXELS, 2^30 by default)
        # and the budget is checked on the decoded size below.
        try:
            image = cv2.imdecode(data, flags) if data.size else None
        except cv2.error as err:  # a decoder that throws on a corrupt file instead of returning None
            raise BadItem(f"cannot decode image ({str(err).strip().splitlines()[-1][:160]})") from None
        if image is None:
            raise BadItem("cannot decode image (corrupt or unsupported format)")
        if header is None:
            self._check_budget(image.shape[1], image.shape[0])
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def image_size(self, item: Item) -> Tuple[int, int]:
        """(W, H) from the file's header, no pixel decoded (a format Pillow cannot parse: decoded).
        A reduced JPEG decode (data.reduced_decode) does not move the boxes: the image is then
        resized to the same shorter side, so only the decoded size differs (up to a pixel's rounding)."""
        try:
            with open(item.source, "rb") as fp:
                header = image_header(fp)
        except OSError as err:
            raise BadItem(f"cannot read file: {err.strerror or err}") from None
        return header[:2] if header is not None else super().image_size(item)

    def _check_budget(self, width: int, height: int) -> None:
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise BadItem(f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), above "
                          f"data.max_pixels={self.max_pixels}; raise data.max_pixels to use it")


@register_source("samples")
class SamplesSource(FolderSource):
    """The public-domain / CC0 photos bundled in pipeline/samples (see LICENSES.md there)."""

    def __init__(self, limit: Optional[int] = None, max_pixels: Optional[int] = MAX_PIXELS,
                 reduced_decode: bool = True):
        super().__init__(SAMPLES_DIR, [".jpg"], limit, max_pixels, reduced_decode)

    @classmethod
    def from_config(cls, cfg) -> "SamplesSource":
        """data.limit and the decode options (data.path is not used)."""
        return cls(cfg.limit, **decode_options(cfg))


def reduction(width: int, height: int, min_side: int) -> int:
    """The largest of 8, 4, 2 that keeps the shorter side >= 2 x min_side once divided, else 1."""
    shorter = min(width, height)
    for factor in (8, 4, 2):
        if shorter // factor >= 2 * min_side:
            return factor
    return 1


def image_header(fp: BinaryIO) -> Optional[Tuple[int, int, str]]:
    """(width, height, Pillow's format name) from an image file's header, no pixel decoded;
    None when Pillow does not know the format or cannot parse the header.

    This walks Pillow's format registry (Image.ID / Image.OPEN) as Image.open does, but without
    Image.open's own decompression-bomb check (Image.MAX_IMAGE_PIXELS, which raises above about
    179 megapixels): the pixel budget is data.max_pixels alone, and Pillow's global settings are
    left untouched.
    """
    prefix = fp.read(16)
    tried: Set[str] = set()
    for load in (Image.preinit, Image.init):  # common formats first, then every plugin
        load()
        for name in list(Image.ID):
            if name in tried:
                continue
            tried.add(name)
            if name not in Image.OPEN:
                continue
            factory, accept = Image.OPEN[name]
            try:
                accepted = True if accept is None else accept(prefix)
                if not accepted or isinstance(accepted, str):  # a str: a warning, meaning no
                    continue
                fp.seek(0)
                im = factory(fp, "")
                width, height = im.size
            except Exception:  # noqa: BLE001 - any failure to parse a header means "unknown"
                continue
            if width > 0 and height > 0:
                return int(width), int(height), str(im.format or name)
    return None


def _walk(root: Path, exts: Set[str]) -> Tuple[List[Tuple[str, str]], List[Skip]]:
    """(images, dangling): (id, path) of every file below root with one of `exts`, sorted by id,
    and a Skip record for each such name that is a symlink leading nowhere.

    Symlinked folders are followed. Every folder (by st_dev, st_ino) is listed once, under the
    first path that reaches it: first the real folders below root, then the folders one symlink
    away, then two, ... (each round by id), so a folder's real path wins over a link to it. A
    link to a folder already listed (a loop back to an ancestor, or a second way into the same
    folder) is not followed, with a warning.
    """
    images: List[Tuple[str, str]] = []
    dangling: List[Skip] = []
    listed: Dict[Tuple[int, int], str] = {}
    level: List[Tuple[str, str]] = [("", str(root))]
    while level:
        links: List[Tuple[str, str]] = []
        for rel, path in level:
            try:
                st = os.stat(path)
            except OSError as err:
                log.warning("cannot follow symlink %s: %s", rel, err.strerror or err)
                continue
            key = (st.st_dev, st.st_ino)
            if key in listed:
                _warn_listed(rel, path, listed[key])
                continue
            listed[key] = rel
            stack = [(rel, path)]
            while stack:
                folder_rel, folder = stack.pop()
                subfolders = []
                for entry in _entries(folder, folder_rel):
                    name = f"{folder_rel}/{entry.name}" if folder_rel else entry.name
                    is_image = os.path.splitext(entry.name)[1].lower() in exts
                    try:
                        if entry.is_symlink():
                            try:
                                target = os.stat(entry.path)
                            except OSError as err:
                                _dangling(name, entry.path, err, is_image, dangling)
                                continue
                            if stat.S_ISDIR(target.st_mode):
                                links.append((name, entry.path))
                            elif stat.S_ISREG(target.st_mode) and is_image:
                                images.append((name, entry.path))
                        elif entry.is_dir(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            key = (st.st_dev, st.st_ino)
                            if key in listed:
                                _warn_listed(name, entry.path, listed[key])
                            else:
                                listed[key] = name
                                subfolders.append((name, entry.path))
                        elif is_image and entry.is_file(follow_symlinks=False):
                            images.append((name, entry.path))
                    except OSError as err:
                        log.warning("cannot inspect %s: %s", name, err.strerror or err)
                stack.extend(reversed(subfolders))
        level = sorted(links)
    images.sort()
    dangling.sort(key=lambda s: s.id)
    return images, dangling


def _entries(folder: str, rel: str) -> List[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        log.warning("cannot list folder %s: %s", rel or folder, err.strerror or err)
        return []


def _dangling(name: str, path: str, err: OSError, is_image: bool, dangling: List[Skip]) -> None:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    if isinstance(err, FileNotFoundError):
        reason = f"dangling symlink -> {target}"
    else:
        reason = f"cannot follow symlink -> {target}: {err.strerror or err}"
    if is_image:
        dangling.append(Skip(name, path, -1, reason))
    else:
        log.warning("%s: %s; not followed", name, reason)


def _warn_listed(name: str, path: str, listed_as: str) -> None:
    """A folder reached a second time: a loop when it is listed as one of the folders that lead
    to `name` (each folder is walked under its listed id only), else a second way in."""
    target = os.path.realpath(path)
    if listed_as == "" or name.startswith(listed_as + "/"):
        log.warning("symlink loop: %s -> %s leads back to %s; not followed", name, target,
                    listed_as or "data.path itself")
    else:
        log.warning("%s -> %s is a folder already listed as %s; not followed (each image is listed once)",
                    name, target, listed_as)
