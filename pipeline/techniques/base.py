"""Technique base class, registry, and the per-batch `Pass` that techniques share.

A technique is one small class registered by name. `attribute()` is the public entry: it checks
the batch and the model state, builds a `Pass`, and calls `_attribute(p)`, which does the maths and
returns raw tensors. Upsampling, normalisation, colouring, HDF5 and PNG live elsewhere (pipeline.io).

The runner builds ONE `Pass` per batch for all techniques of a run, so computations they have in
common (the logits and targets, the layer activations and their gradients, the input gradient) run
once. Each technique declares which of them it uses in `needs`, so that e.g. `activations` next to
`gradcam` reads its maps off Grad-CAM's forward pass instead of running its own.

Each technique declares its `outputs` once, name -> `Output(kind, shape)` (pipeline.contracts):
the kind says how the renderer draws it, the shape is what `_attribute` returns (tested):
  Kind.HEATMAP  [N, K, (T,) h, w]        one map per target, drawn over the input
  Kind.GRADIENT [N, K, C, (T,) H, W]     a signed input-space map: colour and grey images
  Kind.CHANNELS [N, C, ...]              feature maps, the top channels drawn as a grid
  Kind.DATA     any shape                stored, not drawn
  Kind.IMAGE    [N, 3, H, W] uint8       an image made from each input (dream, inversion)
  Kind.TILES    [N, n, 3, S, S] uint8    n images about each input (top_activated)
  Kind.GALLERY  [M, 3, H, W] uint8       synthesized images (data-free techniques), drawn as a grid
                                         titled with the "label" output (or the layer and the
                                         "index" output) and the last "objective" value
  Kind.RF       [N, crops, h, w]         one map per crop (receptive-field techniques), drawn as
                                         one grid across layers per crop, as `draw()` (a Draw) says
Besides `outputs`, a technique names its `family` and `paper`; `python -m pipeline.techniques`
lists them all (pipeline.techniques.catalog).

Techniques with `uses_data = False` (kernels, filter and class visualization) need no inputs: the
runner calls their `generate()` once per run and stores its arrays under `<technique>/<layer>/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, is_dataclass
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple, Type

import numpy as np
import torch
from torch import nn

from pipeline.contracts import Draw, Family, Kind, Output, Paper
from pipeline.hooks import capture
from pipeline.layouts import NCHW, Layout
from pipeline.precision import forward_autocast
from pipeline.progress import NO_PROGRESS, Progress
from pipeline.seeds import keyed_generator
from pipeline.summaries import add as add_stats
from pipeline.targets import TargetSpec

REGISTRY: Dict[str, Type["Technique"]] = {}
INPUT = "input"  # the pseudo-layer name of maps in input space
ACTS, LAYER_GRADS, INPUT_GRADS = "acts", "layer_grads", "input_grads"


def register(name: str):
    """Class decorator: register a technique under `name` (a duplicate name raises)."""

    def wrap(cls: Type["Technique"]) -> Type["Technique"]:
        if name in REGISTRY:
            raise ValueError(f"technique {name!r} is already registered by {REGISTRY[name].__module__}")
        check_declaration(name, cls)
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return wrap


def check_declaration(name: str, cls: Type["Technique"]) -> None:
    """Raise TypeError unless the class declares typed outputs (Output), a Family and an Options
    dataclass (what the runner, the renderer and the listing read)."""
    outputs, summary = getattr(cls, "outputs", {}), getattr(cls, "summary_outputs", {})
    untyped = [o for o, decl in {**outputs, **summary}.items() if not isinstance(decl, Output)]
    if untyped or not outputs:
        raise TypeError(f"technique {name!r}: outputs {untyped or '{}'} must be declared as Output(Kind..., shape)")
    if not isinstance(getattr(cls, "family", None), Family):
        raise TypeError(f"technique {name!r}: family must be a pipeline.contracts.Family")
    paper = getattr(cls, "paper", None)
    if not is_dataclass(getattr(cls, "Options", None)) or (paper is not None and not isinstance(paper, Paper)):
        raise TypeError(f"technique {name!r}: Options must be a dataclass and paper a Paper or None")


def get_technique(name: str) -> Type["Technique"]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


@dataclass
class Result:
    logits: torch.Tensor  # [N, classes]
    targets: torch.Tensor  # [N, K] class indices the maps explain
    maps: Dict[Tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (layer, output) -> [N, ...]


def chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total) in pieces of at most `size` (the memory budget max_batch)."""
    for start in range(0, total, max(1, size)):
        yield slice(start, min(total, start + size))


def rows_logits(model: nn.Module, total: int, build: Callable[[torch.Tensor], torch.Tensor], max_batch: int,
                device: torch.device, progress: Progress = NO_PROGRESS,
                precision: str = "fp32") -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Rows 0..total-1 built on demand, max_batch at a time (memory bounded by max_batch):
    yields (idx [m], model(build(idx)) [m, classes]), without grad; `progress` counts the rows.
    `precision` bf16 / fp16: the forwards under autocast, the logits read as float32."""
    progress.add(total)
    with torch.no_grad():
        for s in chunks(total, max_batch):
            idx = torch.arange(s.start, s.stop, device=device)
            inputs = build(idx)
            with forward_autocast(precision, inputs.device):
                logits = model(inputs)
            logits = logits.float() if precision != "fp32" else logits
            progress.step(len(idx))
            yield idx, logits


class Pass:
    """Computations on one batch x [N, C, (T,) H, W], each run at most once and shared.

    Every accessor is lazy and memoized. `needs` (the union over the run's techniques) lets the
    first request pick the pass that serves the most: with layer gradients needed, the
    activations come from that same forward pass.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, layers: Sequence[str], target: TargetSpec,
                 *, max_batch: int = 64, needs: FrozenSet[str] = frozenset(), seed: int = 0,
                 ids: Optional[Sequence[str]] = None, targets: Optional[torch.Tensor] = None,
                 layout: str = "auto", precision: str = "fp32"):
        self.model, self.x, self.layers, self.target = model, x, list(layers), target
        self.precision = precision  # of the no-grad perturbation forwards (rows_logits; pipeline.precision)
        self.layout = layout  # how layer outputs become maps [N, C, h, w] (pipeline.layouts)
        self._layouts: Dict[str, Layout] = {}  # each layer's, as the first capture read it
        self.max_batch, self.needs = max_batch, needs
        # Random draws are keyed per input by `seed` and the input's id (`input_generator`), so an
        # input's map does not depend on its batch; without ids, inputs are keyed by position.
        self.seed = int(seed)
        self.ids = list(ids) if ids is not None else [f"#{n}" for n in range(x.shape[0])]
        if len(self.ids) != x.shape[0]:
            raise ValueError(f"{len(self.ids)} ids for a batch of {x.shape[0]} inputs")
        self.progress: Progress = NO_PROGRESS  # the runner sets one per technique: expanded rows are counted
        self._memo: Dict[str, Any] = {}
        self._logits: Optional[torch.Tensor] = None
        self._targets: Optional[torch.Tensor] = targets  # [N, K] given: explain these classes
        self._acts: Optional[Dict[str, torch.Tensor]] = None
        self._layer_grads: Optional[Dict[str, torch.Tensor]] = None
        self._input_grads: Optional[torch.Tensor] = None

    # -- per-input random draws ----------------------------------------------------------------
    def input_generator(self, n: int, *purpose) -> torch.Generator:
        """A generator (on x's device) for input n's draws for `purpose` (e.g. "smoothgrad", s),
        seeded by the run's seed and the input's id only (pipeline.seeds)."""
        return keyed_generator(self.seed, self.ids[n], *purpose, device=self.x.device)

    def input_generators(self, *purpose) -> List[torch.Generator]:
        """`input_generator(n, *purpose)` for every input n of the batch."""
        return [self.input_generator(n, *purpose) for n in range(self.x.shape[0])]

    # -- logits and targets ---------------------------------------------------------------------
    def set_logits(self, logits: torch.Tensor) -> None:
        """Record the first forward pass's logits (and choose the targets from them)."""
        if self._logits is None:
            self._logits = logits.detach()
            if self._targets is None:
                self._targets = self.target.select(self._logits)

    @property
    def logits(self) -> torch.Tensor:
        """[N, classes] from whichever forward pass ran first."""
        if self._logits is None:
            if LAYER_GRADS in self.needs and self.layers:
                self.layer_grads()
            elif INPUT_GRADS in self.needs:
                self.input_grads()
            elif self.layers:
                self.activations()
            else:
                with torch.no_grad():
                    self.set_logits(self.model(self.x))
        return self._logits

    @property
    def targets(self) -> torch.Tensor:
        """[N, K] class indices, chosen once per batch so every technique explains the same classes."""
        self.logits
        return self._targets

    # -- shared passes ----------------------------------------------------------------------------
    def activations(self) -> Dict[str, torch.Tensor]:
        """{layer: [N, C, ...]} detached outputs of the chosen layers."""
        if self._acts is None:
            if LAYER_GRADS in self.needs:
                self.layer_grads()
            else:
                with torch.no_grad(), capture(self.model, self.layers, layout=self.layout, found=self._layouts) as acts:
                    self.set_logits(self.model(self.x))
                self._acts = dict(acts)
        return self._acts

    def layout_of(self, layer: str) -> Layout:
        """How `layer`'s output is laid out (nchw, nhwc, tokens), as the shared pass read it."""
        self.activations()
        return self._layouts.get(layer, NCHW)

    def layer_grads(self) -> Dict[str, torch.Tensor]:
        """{layer: [N, K, C, ...]} d(target logit)/d(layer output), every layer from one forward and
        one backward per target; the backward stops at the shallowest chosen layer."""
        if self._layer_grads is None:
            with torch.enable_grad(), capture(self.model, self.layers, grad=True, layout=self.layout,
                                              found=self._layouts) as acts:
                logits = self.model(self.x)  # [N, classes]
            self.set_logits(logits)
            feats = [acts[layer] for layer in self.layers]
            per_target: List[Tuple[torch.Tensor, ...]] = []
            K = self.targets.shape[1]
            for k in range(K):
                grads = torch.autograd.grad(target_scores(logits, self.targets, k), feats,
                                            retain_graph=k < K - 1, allow_unused=True)
                for layer, g in zip(self.layers, grads):
                    if g is None:
                        raise ValueError(f"the class score does not depend on layer {layer!r}")
                per_target.append(grads)
            self._layer_grads = {layer: torch.stack([g[i] for g in per_target], 1)
                                 for i, layer in enumerate(self.layers)}
            if self._acts is None:
                self._acts = {layer: a.detach() for layer, a in zip(self.layers, feats)}
        return self._layer_grads

    def input_grads(self) -> torch.Tensor:
        """[N, K, C, (T,) H, W] d(target logit)/d(input)."""
        if self._input_grads is None:
            x = self.x.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x)
            self.set_logits(logits)
            K = self.targets.shape[1]
            grads = [torch.autograd.grad(target_scores(logits, self.targets, k), x, retain_graph=k < K - 1)[0]
                     for k in range(K)]
            self._input_grads = torch.stack(grads, 1)
        return self._input_grads

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """Memoize any other computation several techniques use (e.g. a guided-backprop pass)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- helpers for techniques that expand the batch (samples, steps, masks, windows) --------
    # Rows are built by the technique on demand, max_batch at a time, so memory is bounded by
    # max_batch whatever the number of samples, steps, masks or windows.
    def rows_logits(self, total: int, build: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """For rows 0..total-1, max_batch at a time: yields (idx [m], logits [m, classes]) of
        build(idx) -> inputs [m, C, ...], without grad."""
        return rows_logits(self.model, total, build, self.max_batch, self.x.device, self.progress, self.precision)

    def rows_input_grads(self, total: int, build: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]
                         ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """For rows 0..total-1, max_batch at a time: yields (idx [m], d logit[classes]/d inputs [m, C, ...])
        of build(idx) -> (inputs [m, C, ...], classes [m])."""
        self.progress.add(total)
        for s in chunks(total, self.max_batch):
            idx = torch.arange(s.start, s.stop, device=self.x.device)
            inputs, classes = build(idx)
            x = inputs.detach().requires_grad_(True)
            with torch.enable_grad():
                score = self.model(x).gather(1, classes[:, None]).sum()
                grads = torch.autograd.grad(score, x)[0]
            self.progress.step(len(idx))
            yield idx, grads


class Technique:
    name: ClassVar[str]
    family: ClassVar[Family]
    paper: ClassVar[Optional[Paper]] = None
    outputs: ClassVar[Dict[str, Output]] = {}  # output name -> its kind and shape (see the module docstring)
    summary_outputs: ClassVar[Dict[str, Output]] = {}  # what summarize() returns, per layer (has_summary)
    uses_layers: ClassVar[bool] = True  # False: maps live in input space (layer "input")
    needs: ClassVar[FrozenSet[str]] = frozenset()  # shared Pass computations it uses
    torchscript: ClassVar[bool] = True  # False: needs the model's Python modules (refused on TorchScript)
    layouts: ClassVar[bool] = False  # True: token and channels-last layers work (read through the Pass, or layout-aware)
    layout: str = "auto"  # the run's layout setting; planning sets it with layer_layouts, before check_model
    layer_layouts: Mapping[str, Layout] = MappingProxyType({})  # {layer: Layout} of the chosen layers
    uses_data: ClassVar[bool] = True  # False: generate() once per run instead of per batch
    video: ClassVar[bool] = True  # False: images only; refused (check_layers) on 3D video models
    attention: ClassVar[bool] = False  # True: reads a transformer's attention weights (check_model refuses other models)
    has_summary: ClassVar[bool] = False  # True: partial/combine/finalize make a run-level summary
    completed_outputs: ClassVar[FrozenSet[str]] = frozenset()  # summary outputs complete() adds

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = self.Options(**options)

    def check_layers(self, shapes: Dict[str, Optional[Tuple[int, ...]]]) -> None:
        """Raise ValueError before any work if a chosen layer's output cannot be used.

        `shapes` maps each chosen layer to its output shape for one input ([1, ...]), or None
        when the output is not a tensor.
        """
        for layer, shape in shapes.items():
            if shape is None:
                raise ValueError(f"{self.name}: layer {layer!r} does not output a single tensor")

    def require_image_maps(self, shapes: Dict[str, Optional[Tuple[int, ...]]]) -> None:
        """For techniques that need 2D image feature maps: refuse vectors and 3D (video) layers."""
        for layer, shape in shapes.items():
            if shape is not None and len(shape) != 4:
                raise ValueError(f"{self.name}: layer {layer!r} outputs {list(shape)}; it needs an image "
                                 "feature map [N, C, h, w] (no vectors, no 3D video layers)")

    def check_model(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Raise ValueError before any work if this model or these layers cannot be used (beyond
        what `check_layers` sees from shapes)."""

    def setup(self, model) -> None:
        """Called once by the runner with the LoadedModel before any work (e.g. to read its
        preprocessing); raise ValueError to refuse the model."""

    @classmethod
    def kinds(cls) -> Dict[str, Kind]:
        """{output name: its Kind}, what the renderer needs."""
        return {output: decl.kind for output, decl in cls.outputs.items()}

    @classmethod
    def outputs_of(cls, kind: Kind) -> Tuple[str, ...]:
        """The names of the outputs of one kind (e.g. the heatmaps the evaluation scores)."""
        return tuple(output for output, decl in cls.outputs.items() if decl.kind is kind)

    def draw(self) -> Draw:
        """How the renderer draws receptive-field maps: labels, boxes, display mode, scale."""
        return Draw()

    # -- run-level summaries (has_summary = True; see pipeline.summaries) --------------------------
    def partial(self, rows: Dict[Tuple[str, str], np.ndarray], ids: Sequence[str]) -> Dict[str, np.ndarray]:
        """Sufficient statistics of some rows, {name: array}: rows {(layer, output): [R, ...]} as
        stored, `ids` [R] the inputs' ids."""
        raise NotImplementedError(f"{self.name} has no run-level summary")

    def combine(self, a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Two statistics as one (associative, commutative); by default key-wise sums."""
        return add_stats(a, b)

    def finalize(self, stats: Dict[str, np.ndarray]) -> Dict[Tuple[str, str], np.ndarray]:
        """The summary arrays {(layer, output): array} from the statistics of all rows."""
        raise NotImplementedError(f"{self.name} has no run-level summary")

    def facts(self) -> Dict[Tuple[str, str], np.ndarray]:
        """Summary arrays that come from the model, not from rows (after check_model)."""
        return {}

    def complete(self, final, facts, fetch, earlier=()) -> Dict[Tuple[str, str], np.ndarray]:
        """Summary arrays cut from inputs at the end (`completed_outputs`, e.g. dataset examples'
        patches): from `earlier` summaries (a merge's shards) where they hold them, else from the
        inputs `fetch(ids)` decodes again (batches of (ids, frames, display [n, S, S, 3], x [n, 3, S, S]));
        `fetch` is None in a merge. Default: none."""
        return {}

    def summarize(self, rows: Dict[Tuple[str, str], np.ndarray], ids: Optional[Sequence[str]] = None
                  ) -> Dict[Tuple[str, str], np.ndarray]:
        """The summary of `rows` in one call: finalize(partial(rows, ids)) and the facts."""
        n = len(next(iter(rows.values()))) if rows else 0
        return {**self.finalize(self.partial(rows, ids if ids is not None else [f"#{i}" for i in range(n)])),
                **self.facts()}

    def attribute(self, model: nn.Module, x: torch.Tensor, layers: Sequence[str], target: TargetSpec,
                  *, max_batch: int = 64, shared: Optional[Pass] = None, seed: int = 0,
                  ids: Optional[Sequence[str]] = None) -> Result:
        """Maps for a batch x [N, C, H, W] or [N, C, T, H, W]; the model must be in eval mode.

        `shared`: the runner's Pass for this batch, so computations common to several
        techniques run once; standalone calls get a Pass of their own (random draws keyed by
        `seed` and the inputs' `ids`, by position without them).
        """
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 4:
            raise ValueError(f"{self.name}: expected a float batch [N, C, H, W], got {tuple(getattr(x, 'shape', ()))}")
        if model.training:
            raise ValueError(f"{self.name}: model must be in eval mode")
        p = shared or Pass(model, x.detach(), layers if self.uses_layers else [], target,
                           max_batch=max_batch, needs=self.needs, seed=seed, ids=ids)
        maps = self._attribute(p)
        return Result(p.logits, p.targets, maps)

    def _attribute(self, p: Pass) -> Dict[Tuple[str, str], torch.Tensor]:
        raise NotImplementedError

    def generate(self, model: nn.Module, layers: Sequence[str], *, device: torch.device,
                 generator: torch.Generator, max_batch: int, class_names: Optional[Sequence[str]] = None,
                 preprocess=None, progress: Progress = NO_PROGRESS) -> Dict[Tuple[str, str], torch.Tensor]:
        """Data-free techniques: {(layer, output): array} computed once per run, e.g.
        (layer, "images") uint8 [M, 3, H, W], (layer, "index") [M], (layer, "objective") [M, steps].
        `progress` (pipeline.progress): announce the work with `progress.add(units)` up front (e.g.
        rows x steps) and report it with `progress.step(units)` as it is done."""
        raise NotImplementedError(f"{self.name} works on inputs; it has no generate()")


def target_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over the batch of the logit of each row's k-th target (a scalar to differentiate)."""
    return logits.gather(1, targets[:, k : k + 1]).sum()
