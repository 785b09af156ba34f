"""`python -m pipeline.layers [model=...]`: every layer with its type, output shape, how it is read
as maps [N, C, h, w] when it is not one already (channels-last, or ViT tokens with their prefix and
patch grid: pipeline.layouts) and theoretical receptive field (size, jump = cumulative stride,
centre of element 0's field, in input pixels).

The listing builds the architecture alone (build_model's load_weights=False): torchvision and
timm weights are neither downloaded nor read, so it works offline with an empty cache."""
import sys

import hydra
import torch
from omegaconf import DictConfig

from pipeline.config import CONF_DIR, ConfigError, register_configs
from pipeline.layouts import read_shapes
from pipeline.models import build_model, default_layer, probe_shapes
from pipeline.rf import GraphError
from pipeline.rf.table import field_table, fmt

register_configs()


def layer_table(cfg: DictConfig) -> str:
    """One line per module: name, type, output shape for one [1, 3, S, S] input, and the receptive
    field of its output (size, jump, centre; per axis when they differ, "-" after a global pool).
    No weights are loaded (but the embedded model's local ones): shapes and fields do not need them."""
    model = build_model(cfg.model, "cpu", cfg.data.clip_len, load_weights=False)
    if isinstance(model.module, torch.jit.ScriptModule):
        raise ConfigError("a TorchScript model cannot be hooked, so its layers cannot be listed")
    example = model.example()
    shapes = probe_shapes(model.module, example)
    size = tuple(example.shape[-2:])
    layouts, _ = read_shapes(model.module, shapes, size)
    modules = dict(model.module.named_modules())
    width = max(len(n) for n in modules)
    try:
        fields = {row.layer: row for row in field_table(model.support_graph())}
        note = "receptive field in input pixels: size, jump (stride), centre of element 0"
    except GraphError as err:
        fields, note = {}, f"no receptive fields: {err}"
    lines = [f"# {model.description}, input {list(example.shape)}; {note}",
             f"{'layer':<{width}}  {'type':<24}  {'output':<22}  {'as maps':<18}  {'rf':>7}  {'jump':>5}  centre"]
    for name, module in modules.items():
        if name:
            shape = shapes.get(name, "not run")
            shape = str(list(shape) if isinstance(shape, tuple) else shape)
            row = fields.get(name)
            rf = f"{fmt(row.size):>7}  {fmt(row.jump):>5}  {fmt(row.centre)}" if row else f"{'-':>7}  {'-':>5}  -"
            read = layouts.get(name)
            read = str(read) if read is not None and read.kind != "nchw" else "-"
            lines.append(f"{name:<{width}}  {type(module).__name__:<24}  {shape:<22}  {read:<18}  {rf}")
    default = list(cfg.model.layers) or [default_layer(model.module, shapes, size)]
    lines.append(f"# default layers: {default}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        print(layer_table(cfg))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # A listing writes no run dir and no log file.
    sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()
