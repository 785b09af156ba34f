"""Annotations that travel with a data source (`data.annotations`): class labels and boxes per input.

Three formats, told apart by the path:

- a CSV file (`.csv`) with the header `id,class,x,y,w,h`, one row per box; x, y, w, h in the
  original image's pixels (0-based, x, y the top-left corner); a row with x, y, w, h all empty
  gives a label without a box;
- a folder of Pascal VOC XML files (`<filename>`, `<object><name>`, `<bndbox>` xmin, ymin, xmax,
  ymax). VOC coordinates are 1-based and inclusive (xmin=1 is the first pixel column), so a VOC
  box becomes x = xmin - 1, w = xmax - xmin + 1 (likewise y, h);
- a COCO JSON file (`.json`: `images` with id / file_name, `annotations` with image_id /
  category_id / bbox [x, y, w, h] (0-based), `categories` with id / name).

An annotated id (a CSV id, a VOC `<filename>`, a COCO `file_name`) names the input whose id (its
path relative to data.path, or `<video>@<frame>`) equals it, else the one input whose file name
(basename) equals it when no other input has that file name. Class names are the model's
(case-insensitive), or class indices. An input's label is the first class annotated for it in
file order (CSV rows, VOC objects, COCO annotations). Everything is checked when the run is
planned; a bad file is a ConfigError naming the file and the line or entry.
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.data.base import Item
from pipeline.errors import ConfigError

log = logging.getLogger("pipeline")

CSV_COLUMNS = ["id", "class", "x", "y", "w", "h"]
LABEL_REASON = "no label in data.annotations (target=label)"

Box = Tuple[int, float, float, float, float]  # (class index, x, y, w, h) in source pixels


@dataclass(frozen=True)
class Entry:
    """One annotated class of one input as read from the file, before ids and classes are resolved."""

    key: str  # the id or file name the file gives
    cls: str  # the class as written (a name or an integer)
    box: Optional[Tuple[float, float, float, float]]  # x, y, w, h in source pixels; None: a label only
    where: str  # "<file>, line 3" / "<file>, annotations[2]": for error messages


@dataclass
class Annotations:
    """Per input id: its boxes [(class index, x, y, w, h)] in source pixels, its label (the first
    annotated class), and the class names as the file wrote them."""

    path: str
    boxes: Dict[str, List[Box]] = field(default_factory=dict)
    labels: Dict[str, int] = field(default_factory=dict)
    names: Dict[str, List[str]] = field(default_factory=dict)  # raw class names, file order
    items: Dict[str, Item] = field(default_factory=dict)  # source items of the inputs with boxes (`bind`)

    def bind(self, items: Sequence[Item]) -> None:
        """Keep the source items of the inputs that have boxes (their image size is read per batch)."""
        self.items = {it.id: it for it in items if self.boxes.get(it.id)}

    def label(self, item_id: str) -> Optional[int]:
        """The input's class index, None when the annotations give it none."""
        return self.labels.get(item_id)

    def label_array(self, ids: Sequence[str]) -> np.ndarray:
        """int64 [N, 1]: the labels of `ids` (target=label's targets); an id without one is a KeyError."""
        return np.asarray([[self.labels[i]] for i in ids], dtype=np.int64)

    def boxes_of(self, item_id: str, class_index: Optional[int] = None) -> List[Box]:
        """The input's boxes (of one class when `class_index` is given); [] when it has none."""
        return [b for b in self.boxes.get(item_id, []) if class_index is None or b[0] == class_index]


def load_annotations(path: str | Path, source_ids: Sequence[str], class_names: Optional[Sequence[str]] = None,
                     num_classes: Optional[int] = None) -> Annotations:
    """Read `path` (CSV, VOC folder or COCO JSON), match it to `source_ids` and resolve its classes
    against the model's `class_names` / `num_classes`; -> Annotations. Raises ConfigError on a bad
    file; annotated ids matching no input are one warning."""
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigError(f"data.annotations={str(path)!r} does not exist")
    if file.is_dir():
        entries = read_voc(file)
    elif file.suffix.lower() == ".json":
        entries = read_coco(file)
    elif file.suffix.lower() == ".csv":
        entries = read_csv(file)
    else:
        raise ConfigError(f"data.annotations={str(path)!r}: expected a .csv file, a .json (COCO) file "
                          "or a folder of Pascal VOC .xml files")
    ids = match_ids([e.key for e in entries], source_ids)
    out = Annotations(str(file))
    unmatched: List[str] = []
    for entry in entries:
        item_id = ids.get(entry.key)
        if item_id is None:
            if entry.key not in unmatched:
                unmatched.append(entry.key)
            continue
        index = resolve_class(entry.cls, class_names, num_classes, entry.where)
        out.labels.setdefault(item_id, index)
        out.names.setdefault(item_id, []).append(entry.cls)
        out.boxes.setdefault(item_id, [])
        if entry.box is not None:
            out.boxes[item_id].append((index, *entry.box))
    if unmatched:
        log.warning("data.annotations: %d annotated id(s) match no input of this run, e.g. %s",
                    len(unmatched), ", ".join(repr(k) for k in unmatched[:3]))
    return out


def match_ids(keys: Sequence[str], source_ids: Sequence[str]) -> Dict[str, str]:
    """{annotated key: input id}: the id equal to the key, else the one id whose basename is the
    key's basename when that basename is unique among the inputs; unmatched keys are left out."""
    exact = set(source_ids)
    by_name: Dict[str, List[str]] = {}
    for item_id in source_ids:
        by_name.setdefault(os.path.basename(item_id), []).append(item_id)
    out = {}
    for key in keys:
        if key in exact:
            out[key] = key
        else:
            found = by_name.get(os.path.basename(key), [])
            if len(found) == 1:
                out[key] = found[0]
    return out


def resolve_class(text: str, class_names: Optional[Sequence[str]], num_classes: Optional[int], where: str) -> int:
    """A class name (case-insensitive exact match on `class_names`) or an integer index -> index;
    ConfigError naming `where` and the closest names otherwise."""
    text = str(text).strip()
    count = num_classes if num_classes is not None else (len(class_names) if class_names else None)
    if text.lstrip("+-").isdigit():
        value = int(text)
        if value < 0 or (count is not None and value >= count):
            span = f"0..{count - 1}" if count is not None else "0 or more"
            raise ConfigError(f"{where}: class {value} is not a class index of this model ({span})")
        return value
    if not class_names:
        raise ConfigError(f"{where}: class {text!r} is a name, but this model has no class names; "
                          "give class indices instead")
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    raise ConfigError(f"{where}: class {text!r} is not a class name of this model; "
                      f"closest: {close_names(text, class_names) or 'none'}")


def close_names(text: str, class_names: Sequence[str]) -> str:
    """Up to five class names close to `text` (difflib, then substrings), quoted and comma-joined."""
    lowered = [name.lower() for name in class_names]
    close = difflib.get_close_matches(text.lower(), lowered, n=5, cutoff=0.5)
    close += [n for n in lowered if text.lower() in n and n not in close][: 5 - len(close)]
    return ", ".join(repr(class_names[lowered.index(c)]) for c in close)


def _number(text, where: str, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {what}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {what}={text!r} is not a finite number")
    return value


def _box(values: Sequence, where: str) -> Tuple[float, float, float, float]:
    """(x, y, w, h) as floats; negative w or h is a ConfigError."""
    x, y, w, h = (_number(v, where, n) for v, n in zip(values, "xywh"))
    if w < 0 or h < 0:
        raise ConfigError(f"{where}: a box needs w, h >= 0, got w={w:g}, h={h:g}")
    return x, y, w, h


def read_csv(file: Path) -> List[Entry]:
    """Rows of a CSV `id,class,x,y,w,h` file; x, y, w, h all empty: a label without a box."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as fp:
            rows = list(csv.reader(fp))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"data.annotations={str(file)!r} cannot be read: {err}") from None
    if not rows or [c.strip().lower() for c in rows[0]] != CSV_COLUMNS:
        found = ",".join(rows[0]) if rows else "(empty file)"
        raise ConfigError(f"{file}, line 1: expected the header {','.join(CSV_COLUMNS)}, found {found!r}")
    entries = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue  # a blank line
        where = f"{file}, line {line}"
        if len(row) != len(CSV_COLUMNS):
            raise ConfigError(f"{where}: expected {len(CSV_COLUMNS)} columns ({','.join(CSV_COLUMNS)}), "
                              f"found {len(row)}")
        key, cls, *coords = (c.strip() for c in row)
        if not key or not cls:
            raise ConfigError(f"{where}: id and class must not be empty")
        if all(c == "" for c in coords):
            entries.append(Entry(key, cls, None, where))
        else:
            entries.append(Entry(key, cls, _box(coords, where), where))
    return entries


def _text(node: ET.Element, path: str, where: str) -> str:
    found = node.find(path)
    if found is None or not (found.text or "").strip():
        raise ConfigError(f"{where}: <{path}> is missing")
    return found.text.strip()


def read_voc(folder: Path) -> List[Entry]:
    """Every `*.xml` file of a Pascal VOC folder (sorted by name), its objects in file order."""
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise ConfigError(f"data.annotations={str(folder)!r} is a folder without Pascal VOC .xml files")
    entries = []
    for file in files:
        try:
            root = ET.parse(file).getroot()
        except (ET.ParseError, OSError) as err:
            raise ConfigError(f"{file}: not a readable XML file ({err})") from None
        key = _text(root, "filename", str(file))
        for j, obj in enumerate(root.findall("object")):
            where = f"{file}, object {j + 1}"
            name = _text(obj, "name", where)
            box = obj.find("bndbox")
            if box is None:
                entries.append(Entry(key, name, None, where))
                continue
            x0, y0, x1, y1 = (_number(_text(box, tag, where), where, tag) for tag in ("xmin", "ymin", "xmax", "ymax"))
            if x1 < x0 or y1 < y0:
                raise ConfigError(f"{where}: xmax < xmin or ymax < ymin ({x0:g}, {y0:g}, {x1:g}, {y1:g})")
            entries.append(Entry(key, name, (x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1), where))
    return entries


def read_coco(file: Path) -> List[Entry]:
    """The `annotations` of a COCO file, in file order, keyed by their image's file_name and
    named by their category's name."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"data.annotations={str(file)!r} is not a readable JSON file: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ConfigError(f"{file}: a COCO file needs the lists images, annotations and categories")
    try:
        images = {img["id"]: str(img["file_name"]) for img in data["images"]}
        categories = {cat["id"]: str(cat["name"]) for cat in data["categories"]}
    except (KeyError, TypeError) as err:
        raise ConfigError(f"{file}: every image needs id and file_name, every category id and name "
                          f"(missing {err})") from None
    entries = []
    for j, ann in enumerate(data["annotations"]):
        where = f"{file}, annotations[{j}]"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise ConfigError(f"{where}: an annotation needs image_id and category_id")
        if ann["image_id"] not in images:
            raise ConfigError(f"{where}: image_id {ann['image_id']!r} is not in images")
        if ann["category_id"] not in categories:
            raise ConfigError(f"{where}: category_id {ann['category_id']!r} is not in categories")
        bbox = ann.get("bbox")
        if bbox is not None and (not isinstance(bbox, list) or len(bbox) != 4):
            raise ConfigError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        box = _box(bbox, where) if bbox is not None else None
        entries.append(Entry(images[ann["image_id"]], categories[ann["category_id"]], box, where))
    return entries
