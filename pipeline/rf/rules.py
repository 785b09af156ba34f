"""Which receptive-field rule each operation of a traced CNN goes by: a table from operation to rule.

A rule (`pipeline.rf.ops`) is a small function `rule(op: Op) -> Support | END | value` for one call
with a Support among its arguments. `MODULE_RULES` holds them by module type (subclasses included:
the nearest class of the module's MRO listed there wins), `FUNCTION_RULES` by function or method
name (torch.relu, F.relu, Tensor.relu and operator.add go by their `__name__`). `module_rule` and
`function_rule` look an operation up; one without a rule raises `GraphError` naming it. What
the rules do:

  convolution, pooling     an averaging box filter of the same kernel, stride, padding, dilation and
                           groups; padding counts as zeros (outside every crop)
  activation, norm, dropout, scaling by a constant, reshaping the channels: the map passes unchanged
  sum / difference / product of branches: the mean of their maps (the union of their fields)
  concatenation along channels: the maps are kept per channel; splitting and indexing channels
                           keep the maps of the channels taken
  global pool, linear layer over a spatial axis, flattening the spatial axes: the spatial path ends
                           (END); a branch that ended is ignored where it meets a spatial one
                           (a squeeze-excite gate scales x: x's map passes)
  adaptive pool to a grid, interpolation: the same operation on the map
  shape queries (x.shape, x.size(), x.dim(), x.dtype ...): answered as for the real tensor
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

from torch import nn
from torch.nn.modules import pooling

from pipeline.rf.ops import (GraphError, Rule, adaptive, attribute, avg_pool_function, cat, conv_function, conv_module,
                             elementwise, getitem, interpolate_function, linear, max_pool_function, movedim, ndim, pad,
                             passthrough, permute, pool_module, reduce, reshape, size, softmax, split, transpose,
                             upsample_module)


def _by_name(*groups: Tuple[Iterable[str], Rule]) -> Dict[str, Rule]:
    """{name: rule} from (names, rule) groups; a name in two groups is a ValueError."""
    table: Dict[str, Rule] = {}
    for names, rule in groups:
        for name in names:
            if name in table:
                raise ValueError(f"{name!r} has two receptive-field rules")
            table[name] = rule
    return table


_ELEMENTWISE = (
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardswish",
    "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "pow",
    "square", "reciprocal", "dropout", "dropout2d", "dropout3d", "alpha_dropout", "batch_norm", "layer_norm",
    "group_norm", "instance_norm", "local_response_norm", "stochastic_depth", "drop_path", "contiguous",
    "float", "half", "double", "to", "type", "type_as", "clone", "detach", "identity",
    # of two tensors: several spatial branches are averaged (`merge`)
    "add", "add_", "iadd", "sub", "sub_", "isub", "mul", "mul_", "imul", "truediv", "div", "div_",
    "itruediv", "maximum", "minimum", "where", "addcmul",
)

FUNCTION_RULES: Dict[str, Rule] = _by_name(
    (["getattr"], attribute), (["size"], size), (["dim"], ndim),
    (_ELEMENTWISE, elementwise),
    (["softmax", "log_softmax"], softmax),
    (["conv1d", "conv2d", "conv3d"], conv_function),
    (["max_pool1d", "max_pool2d", "max_pool3d",
      "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"], max_pool_function),
    (["avg_pool1d", "avg_pool2d", "avg_pool3d"], avg_pool_function),
    ([f"adaptive_{kind}_pool{d}d" for kind in ("avg", "max") for d in (1, 2, 3)], adaptive),
    (["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"], interpolate_function),
    (["linear"], linear),
    (["flatten", "view", "reshape", "unflatten"], reshape),
    (["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm"], reduce),
    (["permute"], permute), (["transpose", "swapaxes"], transpose), (["movedim"], movedim),
    (["cat", "concat", "concatenate"], cat),
    (["chunk", "split", "tensor_split"], split),
    (["getitem"], getitem),
    (["pad"], pad),
)

_PASS_MODULES = (
    nn.Identity, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.dropout._DropoutNd, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Softmax2d,
)

MODULE_RULES: Dict[type, Rule] = {
    nn.modules.conv._ConvNd: conv_module,
    pooling._MaxPoolNd: pool_module, pooling._AvgPoolNd: pool_module,
    pooling._AdaptiveAvgPoolNd: adaptive, pooling._AdaptiveMaxPoolNd: adaptive,
    nn.Linear: linear,
    nn.Flatten: reshape,
    nn.Upsample: upsample_module,
    **dict.fromkeys(_PASS_MODULES, passthrough),
}


def module_rule(path: str, module: nn.Module) -> Rule:
    """The rule for a call of `module` at `path`: the first class of its MRO in MODULE_RULES."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    raise GraphError(f"receptive fields: no rule for module {path!r} ({type(module).__name__})")


def function_rule(name: str, kind: str, where: str) -> Rule:
    """The rule for function or method `name` (kind: fx's call_function / call_method) called in module `where`."""
    if name not in FUNCTION_RULES:
        raise GraphError(f"receptive fields: no rule for {name!r} ({kind}) in module {where!r}; "
                         "see pipeline/rf/rules.py for the operations it knows")
    return FUNCTION_RULES[name]
