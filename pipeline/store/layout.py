"""The layout of maps.h5: every dataset name, attribute and suffix, in one place.

    id, source, frame, png                  [R]     strings / int64: one row per computed input
    target, score, logit                    [R, K]  the classes explained, softmax and logit of each
    <technique>/<layer>/<output>            [R, ...] a technique's maps (rows)
    <technique>/<layer>/<output>.<metric>   [R, ...] an evaluation of that map (evaluate.*)
    skipped/{id,source,frame,reason}        [S]     inputs that could not be used, and why
    classes                                 [C]     class names, when the model has them
    receptive_fields/*                      fixed   the model's receptive-field table
    <technique>/<layer>/<output>            fixed   a data-free technique's results (a group)
    summary/<technique>/<layer>/<output>    fixed   a run-level summary over all rows
    summary/<technique>/.stats/<name>       fixed   its sufficient statistics (they combine)
    summary/<technique>/.facts/<layer>/<output>  fixed  its model-derived values (equal in every shard)

Row datasets grow along their first axis (maxshape None); the attributes `rows` and
`skipped_rows` count the committed ones. A fixed group is written under `<name>.partial` and
renamed when complete, so it is either whole or absent.
"""
from __future__ import annotations

from typing import Optional, Tuple

ROW_COLUMNS = ("id", "source", "frame", "target", "score", "logit", "png")
SKIPPED = "skipped"
SKIP_FIELDS = ("id", "source", "frame", "reason")
CLASSES = "classes"
FIELD_TABLE = "receptive_fields"
SUMMARY = "summary"
STATS, FACTS = ".stats", ".facts"  # not layer names: a module path never starts with "."
PARTIAL = ".partial"
NOT_MAPS = (SKIPPED, CLASSES, FIELD_TABLE, SUMMARY)  # top-level groups that hold no technique rows

# attributes
RUN_KEY, ROWS, SKIPPED_ROWS = "run_key", "rows", "skipped_rows"
ATTEMPTS, CONFIG, SHARD, MERGED_FROM = "attempts", "config", "shard", "merged_from"
SUMMARY_ROWS = "rows"  # on summary/<technique>: the committed rows its statistics cover
STORE_ATTRS = {RUN_KEY, ROWS, SKIPPED_ROWS, ATTEMPTS, CONFIG, SHARD, MERGED_FROM}  # the rest is provenance


# Row strings are fixed-length bytes (UTF-8), stored in the datasets' own compressed chunks: never in
# HDF5's global heap, which a process killed mid-write can leave damaged for rows already committed.
STRING_WIDTH = 4096  # ids and source paths (PATH_MAX)
STRING_WIDTHS = {"png": 256, f"{SKIPPED}/reason": 1024}  # a longer skip reason is cut (it is a message)


def string_width(name: str) -> int:
    """The byte width of the fixed-length string row dataset `name`."""
    return STRING_WIDTHS.get(name, STRING_WIDTH)


def map_name(technique: str, layer: str, output: str) -> str:
    return f"{technique}/{layer}/{output}"


def metric_output(output: str, metric: str) -> str:
    """The output name of an evaluation of a map (`<output>.<metric>`, e.g. cam.deletion)."""
    return f"{output}.{metric}"


def is_metric(output: str) -> bool:
    """Whether an output name is an evaluation of a map (`<output>.<metric>`), not a map itself."""
    return "." in output


def summary_group(technique: str) -> str:
    return f"{SUMMARY}/{technique}"


def skipped_name(field: str) -> str:
    return f"{SKIPPED}/{field}"


def split_map_name(name: str) -> Optional[Tuple[str, str, str, Optional[str]]]:
    """`<technique>/<layer>/<output>[.<metric>]` -> (technique, layer, output, metric or None); None
    for a name that is not a technique's dataset. Layer names may hold dots (blocks.4) and
    slashes never; an output name has no dot, so the last dot of the last part starts a metric."""
    parts = name.strip("/").split("/")
    if len(parts) != 3 or parts[0] in NOT_MAPS or parts[0] in ROW_COLUMNS:
        return None
    technique, layer, last = parts
    output, dot, metric = last.partition(".")
    return technique, layer, output, (metric if dot else None)


def is_partial(name: str) -> bool:
    return name.endswith(PARTIAL) or f"{PARTIAL}/" in name
