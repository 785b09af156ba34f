"""`run(cfg, out_dir)`: every check first, then batches from the DataLoader through each technique
into the async HDF5/PNG writer. Re-running into the same dir skips inputs already in maps.h5."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pipeline.config import ConfigError, validate
from pipeline.contracts import Kind
from pipeline.data import Source, build_source, resolve_shard
from pipeline.data.loader import Loader
from pipeline.errors import RunError
from pipeline.evaluation import SanityCheck, deletion_insertion, heatmaps
from pipeline.io.h5 import MapsFile
from pipeline.io.lock import RunDirLock
from pipeline.io.plots import write_plots
from pipeline.io.render import render_gallery, render_summary
from pipeline.io.space import remove_stale_temporaries
from pipeline.io.writer import AsyncWriter, BatchRecord
from pipeline.models import LoadedModel, build_model, last_conv_block, probe_shapes, resolve_layers
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.provenance import attempt, command_line, provenance
from pipeline.rf.table import field_table, table_arrays
from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, Technique, get_technique

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


@dataclass
class Plan:
    """Everything checked and built before the first input is decoded."""

    cfg: DictConfig
    device: torch.device
    model: LoadedModel
    layers: List[str]
    target: TargetSpec
    techniques: Dict[str, Technique]
    source: Source
    sanity: Optional[SanityCheck] = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device=auto or cpu")
    return torch.device(name)


def _as_config(cfg) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)


def plan(cfg) -> Plan:
    """Validate the config, build model, techniques and source; raises ConfigError on any problem.
    `data.shard=auto` is resolved here (a Slurm job array's task, else all)."""
    cfg = _as_config(cfg)
    validate(cfg)
    if cfg.data.shard == "auto":
        cfg = copy.deepcopy(cfg)
        cfg.data.shard = resolve_shard("auto")
    techniques: Dict[str, Technique] = {}
    for name, options in cfg.technique.items():
        try:
            techniques[name] = get_technique(name)(**OmegaConf.to_container(options, resolve=True))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"technique {name}: {err}") from None
    source = build_source(cfg.data)  # missing path / empty folder fail here, before the model loads
    device = resolve_device(cfg.device)
    model = build_model(cfg.model, device, cfg.data.clip_len)
    clips = cfg.data.kind == "video" and cfg.data.clip_len is not None
    if model.is_video and not clips:
        raise ConfigError(f"{model.description} is a 3D video CNN: it needs clips, e.g. data=video "
                          "data.path=FILE data.clip_len=16")
    if clips and not model.is_video:
        raise ConfigError(f"data.clip_len={cfg.data.clip_len} makes clips, but {model.description} "
                          "is not a 3D (video) CNN; drop data.clip_len to use single frames")
    try:
        target = TargetSpec.parse(cfg.target, model.class_names)
        for technique in techniques.values():
            technique.setup(model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if isinstance(model.module, torch.jit.ScriptModule):
        refused = [name for name, t in techniques.items() if t.uses_layers or not t.torchscript]
        if refused:
            raise ConfigError(
                f"{refused} need the model's Python modules (layers to hook, ReLUs to reroute) and a "
                "TorchScript model has none; use an input-space technique (saliency, gradxinput, "
                "smoothgrad, integrated_gradients, occlusion) or save a state dict and set model.arch")
    layers: List[str] = []
    layered = [t for t in techniques.values() if t.uses_layers]
    try:
        target.check(model.num_classes)
        if layered:
            shapes = probe_shapes(model.module, model.example(device))
            layers = resolve_layers(model.module, cfg.layers) if cfg.layers else [last_conv_block(model.module, shapes)]
            for technique in layered:
                technique.check_layers({layer: shapes.get(layer) for layer in layers})
        for technique in techniques.values():
            technique.check_model(model.module, layers if technique.uses_layers else [])
    except ValueError as err:  # ConfigError included
        raise ConfigError(str(err)) from None
    sanity = SanityCheck(model.module, cfg.evaluate.sanity_steps, cfg.seed) if cfg.evaluate.sanity else None
    return Plan(cfg, device, model, layers, target, techniques, source, sanity)


def run_key(p: Plan) -> dict:
    """What the rows of maps.h5 mean; a resumed run must match it."""
    data = OmegaConf.to_container(p.cfg.data, resolve=True)
    data.pop("limit", None)
    return {
        "model": OmegaConf.to_container(p.cfg.model, resolve=True),
        "data": data,
        "technique": OmegaConf.to_container(p.cfg.technique, resolve=True),
        "layers": p.layers,
        "target": str(p.cfg.target),
        "evaluate": OmegaConf.to_container(p.cfg.evaluate, resolve=True),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, scancel), handled like Ctrl-C: the run stops, its attempt recorded as interrupted."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated in the main thread, unless something else (e.g.
    submitit, which has its own preemption handling) already handles SIGTERM. A second SIGTERM
    while the run winds down kills it at once (the commits make that safe too)."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    try:
        installed = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        if installed:
            signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def interruption(err: BaseException) -> str:
    """How an attempt ended early, for its record: SIGTERM, SIGINT or the exception's class."""
    if isinstance(err, Terminated):
        return "SIGTERM"
    if isinstance(err, KeyboardInterrupt):
        return "SIGINT"
    return type(err).__name__


def first_line(err: BaseException) -> Optional[str]:
    """An exception's message for an attempt record: its first line, at most 300 characters."""
    text = str(err)
    return text.splitlines()[0][:300] if text else None


def run(cfg, out_dir: str | Path, command: Optional[str] = None,
        on_start: Optional[Callable[[], None]] = None) -> Summary:
    """Run a config into `out_dir` (Hydra's run dir under the CLI); returns the closing summary.

    The run dir is locked first (a second live run into it is refused, naming the holder), then
    every check runs before any work; `on_start` is called once the run is accepted (maps.h5 opened
    or resumed), e.g. to write Hydra's `.hydra/` record, so a refused resume leaves the old record
    and maps.h5 untouched. `command` (recorded in maps.h5) defaults to this process's command line.
    """
    out_dir = Path(out_dir)
    with RunDirLock(out_dir, command or command_line()), sigterm_as_interrupt():
        p = plan(cfg)
        return _run(p, out_dir, command, on_start)


def _run(p: Plan, out_dir: Path, command: Optional[str], on_start: Optional[Callable[[], None]]) -> Summary:
    cfg = p.cfg
    seed_everything(cfg.seed)
    remove_stale_temporaries(out_dir / "png")  # left by a run killed mid-write (we hold the lock)
    attrs = {"config": OmegaConf.to_yaml(cfg, resolve=True), "model": p.model.description,
             "layers": ",".join(p.layers), "shard": cfg.data.shard, **provenance(p.device, cfg.seed, command)}
    if p.sanity:
        attrs["sanity_labels"] = p.sanity.labels
    maps_file = MapsFile(out_dir / "maps.h5", run_key(p), attrs)
    try:
        return _run_into(p, out_dir, command, on_start, maps_file)
    finally:
        maps_file.close()


def _run_into(p: Plan, out_dir: Path, command: Optional[str], on_start, maps_file: MapsFile) -> Summary:
    cfg = p.cfg
    if on_start is not None:
        on_start()
    this_attempt = attempt(p.device, command)
    attempts = json.loads(maps_file.f.attrs.get("attempts", "[]")) + [this_attempt]
    maps_file.set_attr("attempts", json.dumps(attempts))
    if p.model.class_names:
        maps_file.write_once("classes", np.array(p.model.class_names, dtype=object))
    per_input = {name: t for name, t in p.techniques.items() if t.uses_data}
    done_ids = maps_file.done_ids()
    todo = [it for it in p.source.items if it.id not in done_ids] if per_input else []
    pre_skipped = [s for s in p.source.skipped if s.id not in done_ids] if per_input else []
    # large JPEGs may be decoded at reduced size (data.reduced_decode); not with a crop box, which is in full-size pixels
    min_side = p.model.preprocess.resize if cfg.data.crop is None and cfg.data.reduced_decode else None
    loader = Loader(p.source, todo, cfg.data.crop, p.model.preprocess, cfg.batch_size, cfg.num_workers, min_side)
    try:
        _write_field_table(p, maps_file)
        generated = _generate(p, maps_file, out_dir)
        if not per_input:  # data-free techniques only: nothing to decode
            summary = Summary(out_dir, 0, maps_file.rows, 0, 0.0, math.nan, 0, generated, per_input=False)
            this_attempt.update(finished=True, done=0, skipped=0, rows=maps_file.rows, generated=generated)
            _record_attempt(maps_file, attempts, this_attempt)
            return summary
        if done_ids:
            log.info("resuming %s: %d inputs already done, %d to go", out_dir, len(done_ids), len(todo))
        log.info("model %s on %s; layers %s; techniques %s; %d inputs", p.model.description, p.device,
                 p.layers, list(p.techniques), len(todo))
        with loader:  # the decoder processes start here: their start-up counts in images/s
            return _compute_all(p, out_dir, maps_file, attempts, this_attempt, loader, per_input, pre_skipped,
                                generated)
    except BaseException as err:  # stopped before the per-input loop (e.g. Ctrl-C while generating)
        if "interrupted" not in this_attempt:
            this_attempt.update(done=0, skipped=0, rows=maps_file.rows, interrupted=interruption(err),
                                error=first_line(err))
            _record_attempt(maps_file, attempts, this_attempt)
        raise


def _compute_all(p: Plan, out_dir: Path, maps_file: MapsFile, attempts: List[dict], this_attempt: dict,
                 loader: Loader, per_input: Dict[str, Technique], pre_skipped: list, generated: List[str]) -> Summary:
    """The per-input loop: batches from the loader through every technique into the writer."""
    cfg = p.cfg
    kinds = {name: t.kinds() for name, t in per_input.items()}
    writer = AsyncWriter(maps_file, out_dir, cfg.render, kinds, p.model.class_name,
                         draw={name: t.draw() for name, t in per_input.items()})
    skipped = len(pre_skipped)
    done = 0
    start = time.perf_counter()
    try:
        for s in pre_skipped:
            log.warning("skipped %s: %s", s.id, s.reason)
        if pre_skipped:
            writer.put(pre_skipped)
        slots = _slots(p, per_input)
        with tqdm(total=len(loader.items), unit="img", desc="pipeline", mininterval=1.0,
                  bar_format=BAR_FORMAT) as bar:
            for batch in loader:
                for s in batch.skipped:
                    log.warning("skipped %s: %s", s.id, s.reason)
                if batch.skipped:
                    writer.put(batch.skipped)
                    skipped += len(batch.skipped)
                    bar.update(len(batch.skipped))
                if batch.items:
                    progress = BatchProgress(bar, len(batch.items), slots)
                    writer.put(_compute(p, batch, progress))
                    progress.finish()
                    done += len(batch.items)
    except BaseException as err:  # interrupted (a signal, Ctrl-C, preemption) or failed: record how far it got
        writer_error = writer.abort()
        if writer_error is not None and writer_error is not err:
            log.error("the maps writer had failed too: %r", writer_error)
        this_attempt.update(done=done, skipped=skipped, rows=maps_file.rows, interrupted=interruption(err),
                            error=first_line(err),
                            seconds=round(time.perf_counter() - start, 3))
        _record_attempt(maps_file, attempts, this_attempt)
        raise
    writer.close()
    seconds = time.perf_counter() - start
    _summarize(p, out_dir, per_input, maps_file)
    summary = Summary(out_dir, done, maps_file.rows, skipped, seconds,
                      done / seconds if seconds > 0 else math.nan, writer.pngs, generated)
    this_attempt.update(finished=True, done=done, skipped=skipped, rows=summary.rows, seconds=round(seconds, 3),
                        images_per_s=float(f"{summary.images_per_s:.4g}") if done else None)  # significant digits: never 0.0
    _record_attempt(maps_file, attempts, this_attempt)
    if cfg.evaluate.deletion or cfg.evaluate.insertion or cfg.evaluate.sanity:
        maps_file.close()
        for path in write_plots(out_dir, out_dir / "maps.h5"):
            log.info("wrote %s", path)
    return summary


def _record_attempt(maps_file: MapsFile, attempts: List[dict], record: dict) -> None:
    """Replace this attempt's entry (the last) in the `attempts` attribute with its final record;
    on a full disk it is logged instead (the rows stay as committed)."""
    attempts[-1:] = [record]
    try:
        maps_file.set_attr("attempts", json.dumps(attempts))
    except RunError as err:
        log.warning("this attempt could not be recorded in maps.h5: %s", err)


def _generate(p: Plan, maps_file: MapsFile, out_dir: Path) -> List[str]:
    """Data-free techniques (kernels, filter / class visualization): once per run, before the
    inputs, each with a progress bar over its optimization steps; a group already complete in
    maps.h5 (a resumed run) is not computed again. Returns what was generated, one line each."""
    made: List[str] = []
    for name, technique in p.techniques.items():
        if technique.uses_data:
            continue
        if maps_file.has(name):  # complete from an earlier attempt; draw its PNG if that run died before
            if p.cfg.render.png and not (out_dir / "png" / f"{name}.png").is_file():
                render_gallery(out_dir, name, maps_file.group_arrays(name), p.cfg.render)
            continue
        log.info("%s: generating (no input data needed)", name)
        generator = torch.Generator(device=p.device).manual_seed(p.cfg.seed)
        start = time.perf_counter()
        with tqdm(total=0, unit="step", desc=name, mininterval=1.0) as bar:
            results = technique.generate(p.model.module, p.layers if technique.uses_layers else [],
                                         device=p.device, generator=generator, max_batch=p.cfg.max_batch,
                                         class_names=p.model.class_names, preprocess=p.model.preprocess,
                                         progress=Progress(lambda done, total: _follow(bar, done, total)))
        seconds = time.perf_counter() - start
        arrays = {key: t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t) for key, t in results.items()}
        maps_file.write_group(name, {f"{layer}/{output}": a for (layer, output), a in arrays.items()})
        made.append(f"{name} ({describe_generated(arrays)}) in {seconds:.3g} s")
        log.info("generated %s", made[-1])
        if p.cfg.render.png and render_gallery(out_dir, name, arrays, p.cfg.render):
            log.info("wrote %s", out_dir / "png" / f"{name}.png")
    return made


def _follow(bar, done: float, total: float) -> None:
    """Show a Progress on a tqdm bar (its total grows as work is announced)."""
    total, done = (int(v) if float(v).is_integer() else v for v in (total, done))
    if total != bar.total:
        bar.total = total
        bar.refresh()
    if done > bar.n:
        bar.update(done - bar.n)


def describe_generated(arrays: Dict[tuple, np.ndarray]) -> str:
    """"112 images of blocks.4, 2 images of logits": what a data-free technique made, per layer."""
    parts = [f"{len(a)} images of {layer}" for (layer, output), a in arrays.items() if output == "images"]
    return ", ".join(parts) or f"{len(arrays)} arrays"


def _write_field_table(p: Plan, maps_file: MapsFile) -> None:
    """The model's receptive-field table (pipeline.rf) in maps.h5, once; skipped with a log line
    for a model that cannot be traced."""
    if maps_file.has("receptive_fields") or isinstance(p.model.module, torch.jit.ScriptModule):
        return
    try:
        rows = field_table(p.model.support_graph())
    except Exception as err:  # noqa: BLE001 - the table is extra information, never a reason to stop
        log.info("no receptive-field table: %s", err)
        return
    maps_file.write_group("receptive_fields", table_arrays(rows))


def _summarize(p: Plan, out_dir: Path, techniques: Dict[str, Technique], maps_file: MapsFile) -> None:
    """Run-level summaries (e.g. the mean effective receptive field) from all rows in maps.h5, so a
    resumed run summarizes every input once; written under summary/<technique>/ and drawn."""
    for name, technique in techniques.items():
        if not technique.has_summary:
            continue
        rows = maps_file.technique_rows(name)
        if not rows or maps_file.rows == 0:
            continue
        arrays = {key: np.asarray(a) for key, a in technique.summarize(rows).items()}
        maps_file.write_group(f"summary/{name}", {f"{layer}/{output}": a for (layer, output), a in arrays.items()})
        if p.cfg.render.png and render_summary(out_dir, name, arrays, technique.draw(), p.cfg.render):
            log.info("wrote %s", out_dir / "png" / f"{name}.png")


def _evaluate(p: Plan, x, maps, targets, ids, progress: Optional[BatchProgress] = None, slot: int = 0) -> dict:
    """Extra columns from `evaluate.*`: deletion / insertion curves and sanity correlations."""
    ev, out = p.cfg.evaluate, {}
    hm = heatmaps(p.techniques, maps)
    kinds = [k for k, on in (("deletion", ev.deletion), ("insertion", ev.insertion)) if on]
    if kinds:
        for (name, layer, output), m in hm.items():
            curves = deletion_insertion(p.model.module, x, m, targets, ev.steps, p.cfg.max_batch, kinds,
                                        progress.slot(slot) if progress else NO_PROGRESS)
            slot += 1
            for metric, values in curves.items():
                out[name, layer, f"{output}.{metric}"] = values
    if p.sanity and hm:
        correlations = p.sanity.correlations(x, p.layers, p.target, p.techniques, hm, targets,
                                             p.cfg.max_batch, p.cfg.seed, ids,
                                             progress.slot(slot) if progress else NO_PROGRESS)
        for (name, layer, output), values in correlations.items():
            out[name, layer, f"{output}.sanity"] = values
    return out


class BatchProgress:
    """Moves the images bar within a batch of n inputs: the batch's work is split into `slots`
    equal parts (one per technique, one per evaluated heatmap, one for the sanity check), and a
    slot's Progress (the rows of its expanded batches) moves the bar through its part."""

    def __init__(self, bar, n: int, slots: int):
        self.bar, self.n, self.slots = bar, n, max(1, slots)
        self.position = 0.0  # inputs of this batch shown as done

    def slot(self, index: int) -> Progress:
        return Progress(lambda done, total: self.reach(index + (min(1.0, done / total) if total else 0.0)))

    def reach(self, slots_done: float) -> None:
        """Show `slots_done` of the batch's slots as done (the bar never moves back)."""
        position = self.n * min(1.0, slots_done / self.slots)
        if position > self.position + 1e-9:
            self.bar.update(position - self.position)
            self.position = position

    def finish(self) -> None:
        self.reach(self.slots)


def _slots(p: Plan, techniques: Dict[str, Technique]) -> int:
    """How many equal parts a batch's work is split into for the progress bar (see BatchProgress)."""
    ev = p.cfg.evaluate
    heatmaps_made = sum(len(t.outputs_of(Kind.HEATMAP)) * (len(p.layers) if t.uses_layers else 1)
                        for t in techniques.values())
    return len(techniques) + (heatmaps_made if ev.deletion or ev.insertion else 0) + bool(p.sanity)


def _compute(p: Plan, batch, progress: Optional[BatchProgress] = None) -> BatchRecord:
    x = batch.x.to(p.device, non_blocking=True)
    techniques = {name: t for name, t in p.techniques.items() if t.uses_data}
    needs = frozenset().union(*(t.needs for t in techniques.values()))
    ids = [item.id for item in batch.items]  # random draws are keyed by seed and id (Pass.input_generator)
    shared = Pass(p.model.module, x, p.layers, p.target, max_batch=p.cfg.max_batch, needs=needs,
                  seed=p.cfg.seed, ids=ids)
    maps = {}
    for i, (name, technique) in enumerate(techniques.items()):
        shared.progress = progress.slot(i) if progress else NO_PROGRESS
        result = technique.attribute(p.model.module, x, p.layers, p.target, shared=shared)
        for (layer, output), tensor in result.maps.items():
            maps[name, layer, output] = tensor.detach()
        if progress:
            progress.reach(i + 1)
    targets = shared.targets
    maps.update(_evaluate(p, x, maps, targets, ids, progress, len(techniques)))
    maps = {key: tensor.cpu().numpy() for key, tensor in maps.items()}
    logits = shared.logits.float()
    probs = logits.softmax(1).gather(1, targets)
    return BatchRecord(
        items=batch.items, display=batch.display,
        targets=targets.cpu().numpy(), scores=probs.cpu().numpy(),
        logits=logits.gather(1, targets).cpu().numpy(), maps=maps,
    )
