"""The patches of dataset_examples: for each kept example, the model-input crop under the
receptive field of the unit where its channel fires most (`rf`), under the region holding 90% of
that unit's input gradient (`erf`), or the whole input (`full`), resized to P x P with the unit
at the centre. Not a technique: helpers of pipeline/techniques/dataset_examples.py."""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import cv2
import numpy as np

log = logging.getLogger("pipeline")
ERF_MASS = 0.9  # patch=erf: the square around the unit holding this share of |input gradient|


def square(field: np.ndarray, uy: int, ux: int, side: int) -> Tuple[int, int, int]:
    """(x0, y0, L): the unclipped L x L square of input pixels centred on unit (uy, ux)'s
    receptive field (field [2, 3]: (y, x) x (start, jump, size)); the whole input if untraced."""
    if field[0, 2] <= 0:
        return 0, 0, side
    cy, cx = field[0, 0] + uy * field[0, 1], field[1, 0] + ux * field[1, 1]
    size = int(round(max(field[0, 2], field[1, 2])))
    return int(round(cx - (size - 1) / 2)), int(round(cy - (size - 1) / 2)), size


def erf_square(grad: np.ndarray, centre: Tuple[float, float]) -> Tuple[int, int, int]:
    """The smallest square around `centre` (y, x) holding ERF_MASS of the gradient map grad [S, S]."""
    S = grad.shape[0]
    total = float(grad.sum())
    cy, cx = (int(round(v)) for v in centre)
    cy, cx = min(max(cy, 0), S - 1), min(max(cx, 0), S - 1)
    prefix = np.pad(grad, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    r = 0
    for r in range(S):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, S), max(cx - r, 0), min(cx + r + 1, S)
        mass = prefix[y1, x1] - prefix[y0, x1] - prefix[y1, x0] + prefix[y0, x0]
        if total <= 0 or mass >= ERF_MASS * total:
            break
    return cx - r, cy - r, 2 * r + 1


def place(image: np.ndarray, x0: int, y0: int, side: int, P: int) -> Tuple[np.ndarray, List[int]]:
    """The square [x0, x0 + side) x [y0, y0 + side) of image [S, S, 3] as [3, P, P] uint8 (black
    outside the image, so the unit stays at the centre) and the clipped box (x, y, w, h). Only the
    part inside the image is resized (to its share of P), never a side x side canvas."""
    S = image.shape[0]
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, S), max(x0, 0), min(x0 + side, S)
    patch = np.zeros((P, P, 3), np.uint8)
    scale = P / side
    top, left = int(round((ya - y0) * scale)), int(round((xa - x0) * scale))
    h, w = min(P - top, int(round((yb - ya) * scale))), min(P - left, int(round((xb - xa) * scale)))
    if yb > ya and xb > xa and h > 0 and w > 0:
        crop = image[ya:yb, xa:xb]
        inter = cv2.INTER_AREA if crop.shape[0] > h else cv2.INTER_LINEAR
        patch[top: top + h, left: left + w] = cv2.resize(crop, (w, h), interpolation=inter)
    return np.ascontiguousarray(patch.transpose(2, 0, 1)), [xa, ya, max(xb - xa, 0), max(yb - ya, 0)]


def cut_patches(t, final, facts, fetch, earlier=()) -> Dict[Tuple[str, str], np.ndarray]:
    """`<side>_box` [C, k, 4], `<side>_patches` [C, k, 3, P, P] and `<side>_frames` [C, k] (-1 for
    images) for each layer and side of a finalized dataset_examples summary (see
    DatasetExamples.complete). The inputs that no earlier summary covers are decoded again once,
    for every layer and side together."""
    P, out, todo = t.options.patch_size, {}, {}
    for layer, side in sorted({(layer, o[: -len("_ids")]) for layer, o in final if o.endswith("_ids")}):
        ids = final[layer, f"{side}_ids"]
        box = out[layer, f"{side}_box"] = np.zeros(ids.shape + (4,), np.int64)
        patches = out[layer, f"{side}_patches"] = np.zeros(ids.shape + (3, P, P), np.uint8)
        frames = out[layer, f"{side}_frames"] = np.full(ids.shape, -1, np.int64)
        left = _from_earlier(layer, side, ids, facts, earlier, box, patches, frames)
        if left:
            todo[layer, side] = left
    if not todo:
        return out
    if fetch is None:
        (layer, side), left = next(iter(todo.items()))
        missing = sorted({final[layer, f"{side}_ids"][c, j] for c, j in left})
        raise ValueError(f"dataset_examples: {len(missing)} kept example(s) of {layer} have no patch in any "
                         f"shard's summary (e.g. {missing[0]}): resume the shard holding them so its run "
                         "finishes its summary, then merge again")
    wanted: Dict[str, Dict[Tuple[str, str], List[Tuple[int, int]]]] = {}  # id -> (layer, side) -> slots
    for (layer, side), left in todo.items():
        ids = final[layer, f"{side}_ids"]
        for c, j in left:
            wanted.setdefault(str(ids[c, j]), {}).setdefault((layer, side), []).append((c, j))
    found = set()
    for batch_ids, batch_frames, display, x in fetch(list(wanted)):
        found.update(batch_ids)
        for layer, side in todo:
            slots = {i: wanted.get(i, {}).get((layer, side), []) for i in batch_ids}
            _cut(t, layer, final[layer, f"{side}_argmax"], facts, batch_ids, batch_frames, display, x, slots,
                 out[layer, f"{side}_box"], out[layer, f"{side}_patches"], out[layer, f"{side}_frames"])
    lost = sorted(set(wanted) - found)
    if lost:
        log.warning("dataset_examples: %d kept input(s) could not be decoded again (moved or changed since?); "
                    "their patches are black: %s", len(lost), ", ".join(lost[:5]))
    return out


def _from_earlier(layer, side, ids, facts, earlier, box, patches, frames) -> List[Tuple[int, int]]:
    """Fill what earlier summaries (a merge's shards) hold; returns the (channel row, slot) left."""
    known = {}
    for summary in earlier:
        e_ids, e_patches = summary.get((layer, f"{side}_ids")), summary.get((layer, f"{side}_patches"))
        if e_ids is None or e_patches is None:
            continue
        e_box, e_frames = summary[layer, f"{side}_box"], summary.get((layer, f"{side}_frames"))
        for c in range(e_ids.shape[0]):
            for j, i in enumerate(e_ids[c]):
                known[c, str(i)] = (e_box[c, j], e_patches[c, j], -1 if e_frames is None else e_frames[c, j])
    todo = []
    for c in range(ids.shape[0]):
        for j, i in enumerate(ids[c]):
            hit = known.get((c, str(i)))
            if hit is None:
                todo.append((c, j))
            else:
                box[c, j], patches[c, j], frames[c, j] = hit
    return todo


def _cut(t, layer, argmax, facts, batch_ids, batch_frames, display, x, slots, box, patches, frames) -> None:
    """Cut the patches of one layer and side from a batch of inputs decoded again: `slots` maps
    each id of the batch to its (channel row, slot) entries."""
    field, channels = facts[layer, "field"], facts[layer, "channels"]
    if not any(slots.values()):
        return
    grads = _erf_grads(t, layer, batch_ids, x, slots, argmax, channels) if t.options.patch == "erf" else {}
    S = display.shape[1]
    for row, i in enumerate(batch_ids):
        cut: Dict[Tuple[int, int, int], Tuple[np.ndarray, List[int]]] = {}  # one crop per square of an input
        for c, j in slots[i]:
            frames[c, j] = batch_frames[row]
            uy, ux = (int(v) for v in argmax[c, j])
            if t.options.patch == "full":
                x0, y0, side = 0, 0, S
            elif t.options.patch == "erf":
                sq = square(field, uy, ux, S)
                x0, y0, side = erf_square(grads[c, j], (sq[1] + (sq[2] - 1) / 2, sq[0] + (sq[2] - 1) / 2))
            else:
                x0, y0, side = square(field, uy, ux, S)
            if (x0, y0, side) not in cut:  # deep layers: many channels, one field covering the input
                cut[x0, y0, side] = place(display[row], x0, y0, side, patches.shape[-1])
            patches[c, j], box[c, j] = cut[x0, y0, side]


def _erf_grads(t, layer, batch_ids, x, wanted, argmax, channels) -> Dict[Tuple[int, int], np.ndarray]:
    """|input gradient| maps of the kept units of this batch's inputs, in rounds of one unit per input."""
    queue = {row: list(wanted.get(i, [])) for row, i in enumerate(batch_ids)}
    grads = {}
    while any(queue.values()):
        units, slots = [], []
        for row, entries in queue.items():
            if entries:
                c, j = entries.pop()
                uy, ux = (int(v) for v in argmax[c, j])
                units.append((row, int(channels[c]), uy, ux))
                slots.append((c, j))
        for slot, g in zip(slots, t.unit_grads(x, layer, units)):
            grads[slot] = g
    return grads
