"""`run(cfg, out_dir)`: every check first, then batches from the decoder processes through each
technique into the background writer (maps.h5 through pipeline.store, PNGs through pipeline.io),
then the run-level summaries. Re-running into the same dir skips inputs already in maps.h5."""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from pipeline.allocator import keep_freed_memory
from pipeline.precision import full_precision, pin
from pipeline.config import ConfigError, validate
from pipeline.contracts import Kind
from pipeline.data import build_source, resolve_shard
from pipeline.data.boxes import batch_boxes
from pipeline.data.loader import Loader, SpareDecoders
from pipeline.errors import RunError
from pipeline.evaluation import SanityCheck, deletion_insertion, heatmaps
from pipeline.interrupts import first_line, interruption, sigterm_as_interrupt
from pipeline.io.lock import RunDirLock
from pipeline.io.plots import write_plots
from pipeline.io.space import remove_stale_temporaries
from pipeline.io.writer import AsyncWriter, BatchRecord
from pipeline.metrics.pointing import pointing_columns
from pipeline.metrics.confidence import confidence
from pipeline.metrics.road import auto_solver as road_solver, road
from pipeline.metrics.sparseness import gini
from pipeline.models import build_model
from pipeline.planning import (Plan, as_config, build_techniques, check_clips, check_torchscript, choose_layers,
                               decode_side, plan_annotations, resolve_device, run_key)
from pipeline.progress import NO_PROGRESS, BatchProgress
from pipeline.provenance import attempt, command_line, provenance
from pipeline.runlevel import generate_all, write_field_table, write_summaries
from pipeline.store import MapsFile
from pipeline.store.layout import metric_output
from pipeline.io.render import draw_boxes
from pipeline.scores import Detections, detection_batch
from pipeline.scores import configure as configure_scores
from pipeline.summaries import Summaries
from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, Technique

log = logging.getLogger("pipeline")
# tqdm's default bar with the count shown to one decimal: a batch's inputs move the bar part-way
BAR_FORMAT = "{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


@dataclass
class Summary:
    out_dir: Path
    done: int  # inputs computed by this call
    rows: int  # rows in maps.h5 after this call
    skipped: int  # skipped records added by this call
    seconds: float
    images_per_s: float
    pngs: int
    generated: List[str] = field(default_factory=list)  # data-free techniques: "<name> (<what>) in <s> s"
    per_input: bool = True  # the run had per-input techniques
    summary_seconds: float = 0.0  # the run-level summaries at the end (e.g. dataset examples' patches)

    def line(self) -> str:
        """The closing line: inputs done (3 significant digits of throughput, never "0.0"), and
        what data-free techniques generated and how long they took."""
        parts = []
        if self.per_input:
            rate = f"{self.images_per_s:.3g}" if math.isfinite(self.images_per_s) else "-"
            parts.append(f"done {self.done} inputs ({self.rows} rows in maps.h5), skipped {self.skipped}, "
                         f"{self.seconds:.3g} s, {rate} images/s")
        if self.generated:
            parts.append(("generated " if self.per_input else "done: generated ") + ", ".join(self.generated))
        if not parts:
            parts.append("done: nothing left to do")
        return "; ".join(parts) + f" -> {self.out_dir}"


def plan(cfg, spares: Optional[SpareDecoders] = None) -> Plan:
    """Validate the config, build model, techniques and source; raises ConfigError on any problem.
    `data.shard=auto` is resolved here (a Slurm job array's task, else all). With `spares`, the
    decoder processes of a run with inputs to decode are started once config and source are
    checked, so that they start up while the model loads."""
    cfg = as_config(cfg)
    validate(cfg)
    if cfg.data.shard == "auto":
        cfg = copy.deepcopy(cfg)
        cfg.data.shard = resolve_shard("auto")
    techniques = build_techniques(cfg)
    source = build_source(cfg.data)  # missing path / empty folder fail here, before the model loads
    if spares is not None and source.items and any(t.uses_data for t in techniques.values()):
        spares.start(min(cfg.num_workers, len(source.items)))
    device = resolve_device(cfg.device)
    pin(cfg.pin_memory, device)  # pin_memory=true off CUDA is refused before the model loads
    model = build_model(cfg.model, device, cfg.data.clip_len)
    check_clips(model, source, cfg)
    configure_scores(model, cfg, device)  # score.region, target=similar:PATH (pipeline.scores)
    try:
        target = TargetSpec.parse(cfg.target, model.class_names)
        for technique in techniques.values():
            technique.setup(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_torchscript(model, techniques)
    layers = choose_layers(cfg, model, device, techniques, target)
    annotations = plan_annotations(cfg, source, model, target)
    sanity = SanityCheck(model.module, cfg.evaluate.sanity_steps, cfg.seed, cfg.layout) if cfg.evaluate.sanity else None
    return Plan(cfg, device, model, layers, target, techniques, source, sanity, annotations)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg, out_dir: str | Path, command: Optional[str] = None,
        on_start: Optional[Callable[[], None]] = None) -> Summary:
    """Run a config into `out_dir` (Hydra's run dir under the CLI); returns the closing summary.

    The run dir is locked first (a second live run into it is refused, naming the holder), then
    every check runs before any work; `on_start` is called once the run is accepted (maps.h5 opened
    or resumed), e.g. to write Hydra's `.hydra/` record, so a refused resume leaves the old record
    and maps.h5 untouched. `command` (recorded in maps.h5) defaults to this process's command line.
    """
    out_dir = Path(out_dir)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    with RunDirLock(out_dir, command or command_line()), sigterm_as_interrupt(), one_opencv_thread(), \
            SpareDecoders() as spares:
        p = plan(cfg, spares)
        return _run(p, out_dir, command, on_start, spares)


@contextmanager
def one_opencv_thread():
    """OpenCV's thread pool in this process at one thread for the run, put back after. Here OpenCV
    only draws and encodes PNGs, in the writer's thread, off the compute path (the decoders are
    processes with their own one thread); its pool's threads wait actively between calls and took
    CPU from the model's threads (Grad-CAM end to end with PNGs for every input: ~10% faster on 2
    cores, runs interleaved with and without)."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def _run(p: Plan, out_dir: Path, command: Optional[str], on_start: Optional[Callable[[], None]],
         spares: Optional[SpareDecoders] = None) -> Summary:
    """Open (or resume) maps.h5 once, record this attempt, do the work; an attempt stopped early
    is recorded as interrupted, with how far it got."""
    seed_everything(p.cfg.seed)
    remove_stale_temporaries(out_dir / "png")  # left by a run killed mid-write (we hold the lock)
    maps_file = _open_maps(p, out_dir, command)
    try:
        if on_start is not None:
            on_start()
        record = AttemptRecord(maps_file, attempt(p.device, command))
        try:
            return _work(p, out_dir, maps_file, record, spares)
        except BaseException as err:  # stopped before the per-input loop (e.g. Ctrl-C while generating)
            record.stopped(err, done=0, skipped=0)
            raise
    finally:
        maps_file.close()


def _open_maps(p: Plan, out_dir: Path, command: Optional[str]) -> MapsFile:
    cfg = p.cfg
    attrs = {"model": p.model.description, "layers": ",".join(p.layers), **provenance(p.device, cfg.seed, command)}
    if p.sanity:
        attrs["sanity_labels"] = p.sanity.labels
    return MapsFile(out_dir / "maps.h5", run_key(p), attrs, dtype=cfg.store.dtype,
                    config=OmegaConf.to_yaml(cfg, resolve=True), shard=cfg.data.shard)


class AttemptRecord:
    """This attempt's entry (the last) in maps.h5's attempts record, rewritten as the run goes;
    on a full disk the final record is logged instead (the rows stay as committed)."""

    def __init__(self, maps_file: MapsFile, record: dict):
        self.file, self.record = maps_file, record
        self.attempts = maps_file.attempts() + [record]
        maps_file.record_attempts(self.attempts)

    def finished(self, **fields) -> None:
        self.record.update(finished=True, rows=self.file.rows, **fields)
        self._write()

    def stopped(self, err: BaseException, **fields) -> None:
        """Interrupted (a signal, Ctrl-C, preemption) or failed; only the first call counts."""
        if "interrupted" in self.record:
            return
        self.record.update(rows=self.file.rows, interrupted=interruption(err), error=first_line(err), **fields)
        self._write()

    def _write(self) -> None:
        try:
            self.file.record_attempts(self.attempts)
        except RunError as err:
            log.warning("this attempt could not be recorded in maps.h5: %s", err)


def _work(p: Plan, out_dir: Path, maps_file: MapsFile, record: AttemptRecord,
          spares: Optional[SpareDecoders] = None) -> Summary:
    """Run-level records first (class names, receptive fields, data-free techniques), then the inputs."""
    if p.model.class_names:
        maps_file.write_classes(p.model.class_names)
    write_field_table(p, maps_file)
    generated = generate_all(p, maps_file, out_dir, bar=tqdm)  # the runner's bars (tests record them)
    per_input = {name: t for name, t in p.techniques.items() if t.uses_data}
    if not per_input:  # data-free techniques only: nothing to decode
        record.finished(done=0, skipped=0, generated=generated)
        return Summary(out_dir, 0, maps_file.rows, 0, 0.0, math.nan, 0, generated, per_input=False)
    return _inputs(p, out_dir, maps_file, record, per_input, generated, spares)


def _inputs(p: Plan, out_dir: Path, maps_file: MapsFile, record: AttemptRecord, per_input: Dict[str, Technique],
            generated: List[str], spares: Optional[SpareDecoders] = None) -> Summary:
    """Every input not yet in maps.h5 through the per-input techniques, then the summaries."""
    cfg = p.cfg
    done_ids = maps_file.done_ids()
    todo = [it for it in p.source.items if it.id not in done_ids]
    pre_skipped = [s for s in p.source.skipped if s.id not in done_ids]
    if done_ids:
        log.info("resuming %s: %d inputs already done, %d to go", out_dir, len(done_ids), len(todo))
    log.info("model %s on %s; layers %s; techniques %s; %d inputs", p.model.description, p.device,
             p.layers, list(p.techniques), len(todo))
    if cfg.evaluate.road and todo:
        road_solver(p.device)  # the C kernel built (or its fallback announced) before the progress bar starts
    summaries = Summaries(per_input)
    if summaries and maps_file.rows:
        summaries.resume(maps_file.reader())
    loader = Loader(p.source, todo, cfg.data.crop, p.model.preprocess, cfg.batch_size, cfg.num_workers, decode_side(p),
                    spares=spares, pin_memory=pin(cfg.pin_memory, p.device))
    count = Count()
    try:
        with loader:  # decoding starts here (in the spares started while the model loaded, see plan)
            pngs = _compute_all(p, out_dir, maps_file, loader, per_input, pre_skipped, summaries, count)
    except BaseException as err:
        record.stopped(err, done=count.done, skipped=count.skipped, seconds=round(count.seconds(), 3))
        raise
    seconds = count.seconds()
    write_summaries(p, out_dir, summaries, maps_file)
    summary = Summary(out_dir, count.done, maps_file.rows, count.skipped, seconds,
                      count.done / seconds if seconds > 0 else math.nan, pngs, generated,
                      summary_seconds=count.seconds() - seconds)
    record.finished(done=count.done, skipped=count.skipped, seconds=round(seconds, 3),
                    images_per_s=float(f"{summary.images_per_s:.4g}") if count.done else None,  # never 0.0
                    summary_seconds=round(summary.summary_seconds, 3))
    if cfg.evaluate.deletion or cfg.evaluate.insertion or cfg.evaluate.sanity or cfg.evaluate.road:
        for path in write_plots(out_dir, maps_file.reader()):
            log.info("wrote %s", path)
    return summary


@dataclass
class Count:
    """How far the per-input loop got: inputs computed, skipped records added, since `start`."""

    done: int = 0
    skipped: int = 0
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _compute_all(p: Plan, out_dir: Path, maps_file: MapsFile, loader: Loader, per_input: Dict[str, Technique],
                 pre_skipped: list, summaries: Summaries, count: Count) -> int:
    """The per-input loop: batches from the loader through every technique into the writer;
    returns the PNGs written. On an error the writer is stopped (its own error logged) first."""
    writer = AsyncWriter(maps_file, out_dir, p.cfg.render, {name: t.kinds() for name, t in per_input.items()},
                         p.model.class_name, draw={name: t.draw() for name, t in per_input.items()},
                         summaries=summaries)
    try:
        _skip(writer, pre_skipped, count)
        slots = _slots(p, per_input)
        with tqdm(total=len(loader.items), unit="img", desc="pipeline", mininterval=1.0,
                  bar_format=BAR_FORMAT) as bar:
            for batch in loader:
                if batch.skipped:
                    _skip(writer, batch.skipped, count)
                    bar.update(len(batch.skipped))
                if batch.items:
                    progress = BatchProgress(bar, len(batch.items), slots)
                    writer.put(_compute(p, batch, progress))
                    progress.finish()
                    count.done += len(batch.items)
    except BaseException as err:
        writer_error = writer.abort()
        if writer_error is not None and writer_error is not err:
            log.error("the maps writer had failed too: %r", writer_error)
        raise
    writer.close()
    return writer.pngs


def _skip(writer: AsyncWriter, records: list, count: Count) -> None:
    """Skipped records: a warning each, then into maps.h5 through the writer."""
    for s in records:
        log.warning("skipped %s: %s", s.id, s.reason)
    if records:
        writer.put(records)
        count.skipped += len(records)


def _evaluate(p: Plan, x, maps, targets, ids, progress: Optional[BatchProgress] = None, slot: int = 0,
              probs=None) -> dict:
    """Extra columns from `evaluate.*`: deletion / insertion curves, ROAD, confidence, sparseness,
    pointing and sanity correlations. `probs` [N, K]: the targets' probabilities from the batch's
    own forward, so the confidence metrics need no second one."""
    ev, out = p.cfg.evaluate, {}
    hm = heatmaps(p.techniques, maps)
    kinds = [k for k, on in (("deletion", ev.deletion), ("insertion", ev.insertion)) if on]
    if kinds:
        for (name, layer, output), m in hm.items():
            curves = deletion_insertion(p.model.module, x, m, targets, ev.steps, p.cfg.max_batch, kinds,
                                        progress.slot(slot) if progress else NO_PROGRESS, precision=p.cfg.precision)
            slot += 1
            for metric, values in curves.items():
                out[name, layer, metric_output(output, metric)] = values
    if ev.pointing and hm:
        boxes = batch_boxes(p.annotations, p.source, p.cfg.data.crop, p.model.preprocess, ids, targets.cpu().numpy())
        out.update(pointing_columns(hm, boxes, p.model.preprocess.input_size, ev.pointing_tolerance))
    for (name, layer, output), m in hm.items():
        extra = {}
        if ev.road:
            extra.update(road(p.model.module, x, m, targets, list(ev.road_percentages), p.cfg.max_batch,
                              p.cfg.seed, ids, progress.slot(slot) if progress else NO_PROGRESS,
                              precision=p.cfg.precision))
            slot += 1
        if ev.confidence:
            extra.update(confidence(p.model.module, x, m, targets, p.cfg.max_batch, probs,
                                    progress=progress.slot(slot) if progress else NO_PROGRESS,
                                    precision=p.cfg.precision))
            slot += 1
        if ev.sparseness:
            extra["gini"] = gini(m, x.shape[2:])
        for metric, values in extra.items():
            out[name, layer, metric_output(output, metric)] = values
    if p.sanity and hm:
        correlations = p.sanity.correlations(x, p.layers, p.target, p.techniques, hm, targets,
                                             p.cfg.max_batch, p.cfg.seed, ids,
                                             progress.slot(slot) if progress else NO_PROGRESS)
        for (name, layer, output), values in correlations.items():
            out[name, layer, metric_output(output, "sanity")] = values
    return out


def _slots(p: Plan, techniques: Dict[str, Technique]) -> int:
    """How many equal parts a batch's work is split into for the progress bar (see BatchProgress)."""
    ev = p.cfg.evaluate
    heatmaps_made = sum(len(t.outputs_of(Kind.HEATMAP)) * (len(p.layers) if t.uses_layers else 1)
                        for t in techniques.values())
    per_map = bool(ev.deletion or ev.insertion) + bool(ev.road) + bool(ev.confidence)
    return len(techniques) + heatmaps_made * per_map + bool(p.sanity)


def _compute(p: Plan, batch, progress: Optional[BatchProgress] = None) -> BatchRecord:
    x = batch.x.to(p.device, non_blocking=True)  # asynchronous from a pinned batch (pin_memory)
    with detection_batch(p.model.module, x, p.target.k, p.cfg.score.min_score) as found:
        return _compute_on(p, batch, x, progress, found)


def _compute_on(p: Plan, batch, x, progress: Optional[BatchProgress], found: Optional[Detections]) -> BatchRecord:
    """The batch through every technique; `found`: a detection model's boxes (pipeline.scores), the
    targets (one per box), stored with the maps, drawn on the PNGs, and empty slots' maps NaN."""
    techniques = {name: t for name, t in p.techniques.items() if t.uses_data}
    needs = frozenset().union(*(t.needs for t in techniques.values()))
    ids = [item.id for item in batch.items]  # random draws are keyed by seed and id (Pass.input_generator)
    labels = torch.as_tensor(p.annotations.label_array(ids), device=p.device) if p.target.mode == "label" else None
    if found is not None:
        labels = found.targets  # each input's boxes: their columns in the scores
    shared = Pass(p.model.module, x, p.layers, p.target, max_batch=p.cfg.max_batch, needs=needs,
                  seed=p.cfg.seed, ids=ids, targets=labels, layout=p.cfg.layout, precision=p.cfg.precision)
    maps = {}
    for i, (name, technique) in enumerate(techniques.items()):
        shared.progress = progress.slot(i) if progress else NO_PROGRESS
        result = technique.attribute(p.model.module, x, p.layers, p.target, shared=shared)
        for (layer, output), tensor in result.maps.items():
            maps[name, layer, output] = tensor.detach()
        if progress:
            progress.reach(i + 1)
    targets = shared.targets
    logits = shared.logits.float()
    probs = logits.softmax(1).gather(1, targets)  # [N, K]
    maps.update(_evaluate(p, x, maps, targets, ids, progress, len(techniques), probs=probs))
    display = batch.display
    if found is not None:
        maps = _empty_slots(techniques, maps, found.valid)
        maps.update({("detections", "input", "boxes"): found.boxes, ("detections", "input", "labels"): found.labels,
                     ("detections", "input", "scores"): found.scores})
        targets, probs = found.labels, found.scores  # stored: each box's label and detection score
        display = draw_boxes(display, found.boxes.cpu().numpy(), found.labels.cpu().numpy(), p.model.class_name)
    maps = {key: full_precision(tensor).cpu().numpy() for key, tensor in maps.items()}
    return BatchRecord(
        items=batch.items, display=display,
        targets=targets.cpu().numpy(), scores=probs.cpu().numpy(),
        logits=logits.gather(1, shared.targets).cpu().numpy(), maps=maps,
    )


def _empty_slots(techniques: Dict[str, Technique], maps: dict, valid: torch.Tensor) -> dict:
    """Per-target maps ([N, K, ...] heatmaps and gradients) of slots without a box set to NaN."""
    N, K = valid.shape
    out = {}
    for (name, layer, output), m in maps.items():
        t = techniques.get(name)
        kind = t.outputs[output].kind if t is not None and output in t.outputs else None
        if kind in (Kind.HEATMAP, Kind.GRADIENT) and m.is_floating_point() and tuple(m.shape[:2]) == (N, K):
            m = m.masked_fill(~valid.view(N, K, *(1,) * (m.dim() - 2)).to(m.device), float("nan"))
        out[name, layer, output] = m
    return out
