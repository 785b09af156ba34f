"""The registry describing itself: every technique with its family, paper, outputs (kind and shape),
needs and options with their defaults, read from the classes (what `python -m pipeline.techniques`
prints, and the README's generated reference table)."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Tuple

import yaml

from pipeline.contracts import Family, Output, Paper
from pipeline.techniques.base import REGISTRY, get_technique


@dataclass(frozen=True)
class Entry:
    """One technique as the listing shows it."""

    name: str
    family: Family
    paper: Optional[Paper]
    outputs: Mapping[str, Output]
    summary_outputs: Mapping[str, Output]  # run-level arrays per layer (e.g. erf's mean map)
    needs: Tuple[str, ...]  # shared Pass computations, sorted
    uses_data: bool  # False: generate() once per run, no inputs
    uses_layers: bool  # False: no layer is chosen (maps in input space, or class_vis's logits)
    video: bool  # runs on 3D video models
    torchscript: bool  # runs on TorchScript checkpoints
    options: Mapping[str, Any]  # option -> default


def option_defaults(options_cls) -> Dict[str, Any]:
    """{option: default} of an Options dataclass, in declaration order (factories called)."""
    out = {}
    for f in fields(options_cls):
        out[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return out


def describe(name: str) -> Entry:
    """The Entry of one registered technique (an unknown name raises KeyError listing the known)."""
    cls = get_technique(name)
    return Entry(name, cls.family, cls.paper, dict(cls.outputs), dict(cls.summary_outputs), tuple(sorted(cls.needs)),
                 cls.uses_data, cls.uses_layers, cls.video, cls.torchscript, option_defaults(cls.Options))


def catalog() -> List[Entry]:
    """Every registered technique, grouped by family (in Family's order), by name within one."""
    order = {family: i for i, family in enumerate(Family)}
    return [describe(name) for name in sorted(REGISTRY, key=lambda n: (order[REGISTRY[n].family], n))]


def yaml_value(value: Any) -> str:
    """A default as the YAML files write it: null, true, 0.05, [1.0, 0.975], 0-7, and a string
    YAML would read as something else quoted ("0")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str) and yaml.safe_load(value) != value:
        return f'"{value}"'
    return str(value)


def _runs(e: Entry) -> str:
    where = "per input batch" if e.uses_data else "once per run, no input data"
    layers = "on the chosen layers" if e.uses_layers else "no layers chosen"
    yes = {True: "yes", False: "no"}
    return f"{where}, {layers}; video models: {yes[e.video]}; TorchScript: {yes[e.torchscript]}"


def _output_lines(outputs: Mapping[str, Output]) -> List[str]:
    width = max(map(len, outputs), default=0)
    return [f"    {name:<{width}}  {decl.describe()}" + (f"  ({decl.doc})" if decl.doc else "")
            for name, decl in outputs.items()]


def text(entries: List[Entry]) -> str:
    """One block per technique: name, family, paper, outputs, summary, needs, how it runs, options."""
    blocks = []
    for e in entries:
        lines = [f"{e.name}  ({e.family})"]
        if e.paper:
            lines.append(f"  paper    {e.paper.cite}, {e.paper.url}")
        lines += ["  outputs"] + _output_lines(e.outputs)
        if e.summary_outputs:
            lines += ["  summary (per layer, at the end of a run)"] + _output_lines(e.summary_outputs)
        lines.append(f"  needs    {', '.join(e.needs) or '-'}")
        lines.append(f"  runs     {_runs(e)}")
        lines.append("  options" + ("" if e.options else "  -"))
        lines += [f"    {key}: {yaml_value(v)}" for key, v in e.options.items()]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _outputs_cell(outputs: Mapping[str, Output]) -> str:
    return "; ".join(f"`{name}` {decl.kind} `{decl.shape}`" + (f" {decl.dtype}" if decl.dtype else "")
                     for name, decl in outputs.items())


def markdown(entries: List[Entry]) -> str:
    """A README table: name | family | paper | outputs: kind, shape | needs | options (defaults)."""
    rows = ["| name | family | paper | outputs: kind `[shape]` | needs | options (defaults) |",
            "|---|---|---|---|---|---|"]
    for e in entries:
        paper = f"[{e.paper.cite}]({e.paper.url})" if e.paper else "—"
        outputs = _outputs_cell(e.outputs)
        if e.summary_outputs:
            outputs += "; run summary per layer: " + _outputs_cell(e.summary_outputs)
        needs = ", ".join(f"`{n}`" for n in e.needs) if e.uses_data else "no input data"
        options = ", ".join(f"`{key}: {yaml_value(v)}`" for key, v in e.options.items()) or "—"
        rows.append("| " + " | ".join(_cell(c) for c in (f"`{e.name}`", str(e.family), paper, outputs,
                                                         needs or "—", options)) + " |")
    return "\n".join(rows) + "\n"
