"""What a run writes once rather than per input: data-free techniques' results (kernels, filter
and class images), the model's receptive-field table, and run-level summaries with their PNGs."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.loader import Loader
from pipeline.io.render import draw_summary, render_gallery
from pipeline.planning import decode_side
from pipeline.progress import Progress, follow
from pipeline.rf.table import field_table, table_arrays
from pipeline.store import MapsFile
from pipeline.summaries import Summaries

log = logging.getLogger("pipeline")


def generate_all(p, maps_file: MapsFile, out_dir: Path, bar: Callable = tqdm) -> List[str]:
    """Data-free techniques, once per run and before the inputs, each with a progress bar (made by
    `bar`, tqdm's signature) over its optimization steps; one already complete in maps.h5 (a
    resumed run) is not computed again. Returns what was generated, one line each
    ("<name> (<what>) in <s> s")."""
    made: List[str] = []
    for name, technique in p.techniques.items():
        if technique.uses_data:
            continue
        if maps_file.has_generated(name):  # from an earlier attempt; draw its PNG if that run died before
            if p.cfg.render.png and not (out_dir / "png" / f"{name}.png").is_file():
                render_gallery(out_dir, name, maps_file.generated(name), p.cfg.render)
            continue
        made.append(_generate(p, name, technique, maps_file, out_dir, bar))
    return made


def _generate(p, name: str, technique, maps_file: MapsFile, out_dir: Path, bar: Callable) -> str:
    log.info("%s: generating (no input data needed)", name)
    generator = torch.Generator(device=p.device).manual_seed(p.cfg.seed)
    start = time.perf_counter()
    with bar(total=0, unit="step", desc=name, mininterval=1.0) as shown:
        results = technique.generate(p.model.module, p.layers if technique.uses_layers else [],
                                     device=p.device, generator=generator, max_batch=p.cfg.max_batch,
                                     class_names=p.model.class_names, preprocess=p.model.preprocess,
                                     progress=Progress(lambda done, total: follow(shown, done, total)))
    seconds = time.perf_counter() - start
    arrays = {key: t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t) for key, t in results.items()}
    maps_file.write_generated(name, arrays)
    line = f"{name} ({describe_generated(arrays)}) in {seconds:.3g} s"
    log.info("generated %s", line)
    if p.cfg.render.png and render_gallery(out_dir, name, arrays, p.cfg.render):
        log.info("wrote %s", out_dir / "png" / f"{name}.png")
    return line


class Fetched(NamedTuple):
    """A batch of inputs decoded again by id (for Technique.complete)."""

    ids: List[str]
    frames: List[int]  # frame index of each (-1 for images)
    display: np.ndarray  # [n, S, S, 3] uint8, as the model saw them
    x: torch.Tensor  # [n, 3, S, S] model input, on the run's device


FETCH_IN_PROCESS = 64  # up to this many inputs are decoded again in the main process (no decoder start-up)


def input_fetcher(p) -> Callable:
    """fetch(ids) -> batches (Fetched: ids, frames, display [n, S, S, 3] uint8, x [n, 3, S, S] on the device):
    this run's inputs decoded again by id, as the model saw them (for Technique.complete); more
    than FETCH_IN_PROCESS of them in `num_workers` decoder processes."""
    by_id = {item.id: item for item in p.source.items}
    cfg = p.cfg

    def fetch(ids: Sequence[str]) -> Iterator[Fetched]:
        items = [by_id[i] for i in dict.fromkeys(ids) if i in by_id]
        workers = cfg.num_workers if len(items) > FETCH_IN_PROCESS else 0
        with Loader(p.source, items, cfg.data.crop, p.model.preprocess, cfg.batch_size, workers,
                    decode_side(p)) as loader:
            for batch in loader:
                if batch.items:
                    yield Fetched([it.id for it in batch.items], [it.frame for it in batch.items], batch.display,
                                  batch.x.to(p.device))

    return fetch


def describe_generated(arrays: Dict[tuple, np.ndarray]) -> str:
    """"112 images of blocks.4, 2 images of logits": what a data-free technique made, per layer."""
    parts = [f"{len(a)} images of {layer}" for (layer, output), a in arrays.items() if output == "images"]
    return ", ".join(parts) or f"{len(arrays)} arrays"


def write_field_table(p, maps_file: MapsFile) -> None:
    """The model's receptive-field table (pipeline.rf) in maps.h5, once; skipped with a log line
    for a model that cannot be traced."""
    if maps_file.has_field_table() or isinstance(p.model.module, torch.jit.ScriptModule):
        return
    try:
        rows = field_table(p.model.support_graph())
    except Exception as err:  # noqa: BLE001 - the table is extra information, never a reason to stop
        log.info("no receptive-field table: %s", err)
        return
    maps_file.write_field_table(table_arrays(rows))


def write_summaries(p, out_dir: Path, summaries: Summaries, maps_file: MapsFile) -> None:
    """Run-level summaries over every committed row (e.g. the mean effective receptive field),
    under summary/<technique>/, and drawn."""
    for name, arrays in summaries.write(maps_file, input_fetcher(p)).items():
        technique = p.techniques[name]
        if not p.cfg.render.png:
            continue
        kinds = [d.kind for d in technique.summary_outputs.values()]
        for path in draw_summary(out_dir, name, arrays, technique.draw(), kinds, p.cfg.render, filter_images(p)):
            log.info("wrote %s", path)


def filter_images(p):
    """`(layer, channel) -> cached filter_vis image or None` from top_activated's cache (its
    settings in this run, else its defaults); nothing is computed here."""
    from pipeline.io.atlas import filter_cache
    from pipeline.techniques import get_technique

    top = p.techniques.get("top_activated") or get_technique("top_activated")()
    folders = {}

    def lookup(layer, channel):
        if layer not in folders:
            folders[layer] = top.cache_folder(p.model.module, layer, p.cfg.seed)
        return filter_cache(folders)(layer, channel)

    return lookup
