"""Model building (through the model-family registry, pipeline/families), preprocessing and layer resolution."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.families import IMAGENET, get_family, imagenet_classes
from pipeline.families.efficientnet_lite0 import build_efficientnet_lite0, embedded_weights_path
from pipeline.preprocess import Preprocess

# Re-exported: pipeline.models.{Preprocess, IMAGENET, imagenet_classes, build_efficientnet_lite0,
# embedded_weights_path} are imported elsewhere under these names.
__all__ = ["IMAGENET", "LoadedModel", "Preprocess", "build_efficientnet_lite0", "build_model",
           "default_layer", "embedded_weights_path", "imagenet_classes", "is_video_model", "last_conv_block", "layer_names",
           "probe_shapes", "resolve_layers"]


@dataclass
class LoadedModel:
    module: nn.Module  # frozen, eval mode
    preprocess: Preprocess
    class_names: Optional[List[str]]  # ImageNet (or Kinetics-400) names where known
    description: str
    num_classes: int
    clip_len: Optional[int] = None  # frames per clip for a 3D (video) CNN; None for image models
    preprocess_set: bool = False  # model.mean / model.std were given (a detection model refuses them)
    _graph: Optional[object] = field(default=None, repr=False)

    def support_graph(self):
        """The model traced for receptive fields (pipeline.rf.SupportGraph), built once; raises
        pipeline.rf.GraphError when it cannot be traced."""
        if self._graph is None:
            from pipeline.rf import SupportGraph

            from pipeline.scores import inner

            device = next(self.module.parameters()).device
            # a Scored model (pipeline.scores) is traced as its net: the same layer names, no score to trace
            self._graph = SupportGraph(inner(self.module), self.example(device))
        return self._graph

    @property
    def is_video(self) -> bool:
        return self.clip_len is not None

    def example(self, device: torch.device | str = "cpu", batch: int = 1) -> torch.Tensor:
        """A zero input of the model's shape: [B, 3, S, S], or [B, 3, T, S, S] for a video CNN."""
        s = self.preprocess.input_size
        shape = (batch, 3, self.clip_len, s, s) if self.is_video else (batch, 3, s, s)
        return torch.zeros(shape, device=device)

    def class_name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"


def is_video_model(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def build_model(cfg, device: torch.device | str = "cpu", clip_len: Optional[int] = None,
                load_weights: bool = True) -> LoadedModel:
    """Build the model a `model` config describes, frozen and in eval mode, on `device`.

    `model.kind` names a family (pipeline/families) that builds the network. Preprocessing keys
    left null come from the family (torchvision weights' transforms, timm's pretrained config) or
    ImageNet's defaults. A 3D CNN (any Conv3d) takes clips of `clip_len` frames (16 when not
    given). `load_weights=False` builds the architecture alone, with the preprocessing the weights
    would give: torchvision and timm weights are neither downloaded nor read, a state-dict
    checkpoint's file is not read (TorchScript is loaded: it is the architecture); the embedded
    model's local weights are loaded as always.
    """
    built = get_family(cfg.kind)(cfg, load_weights)
    model = _frozen(built.module, device)
    preprocess = _preprocess(cfg, built.preprocess)
    video = not isinstance(model, torch.jit.ScriptModule) and is_video_model(model)
    loaded = LoadedModel(model, preprocess, built.class_names, built.description, 0,
                         (clip_len or 16) if video else None)
    loaded.preprocess_set = cfg.mean is not None or cfg.std is not None
    loaded.num_classes = _count_classes(loaded, device)  # a segmentation model is wrapped here (pipeline.scores)
    if loaded.class_names is None and loaded.num_classes == 1000:
        loaded.class_names = imagenet_classes()
    return loaded


def _frozen(model: nn.Module, device: torch.device | str) -> nn.Module:
    """`model` in eval mode on `device`, every parameter without grad."""
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _preprocess(cfg, defaults: Dict[str, Any]) -> Preprocess:
    """The config's preprocessing keys, each null one taken from the family's `defaults`."""
    pick = lambda key: defaults[key] if cfg[key] is None else cfg[key]  # noqa: E731
    preprocess = Preprocess(int(pick("input_size")), int(pick("resize")), cfg.interpolation,
                            tuple(pick("mean")), tuple(pick("std")))
    if preprocess.resize < preprocess.input_size:
        raise ConfigError(f"model.resize={preprocess.resize} is smaller than model.input_size={preprocess.input_size}")
    return preprocess


def _count_classes(loaded: LoadedModel, device: torch.device | str) -> int:
    """The model's output width on its example input; a model that cannot run on it is a ConfigError.
    A segmentation model (output {"out": [N, K, H, W]}) becomes `Scored` (pipeline.scores) here:
    K class scores, its default layers looked for under its `backbone`."""
    from pipeline.scores import Scored, SegmentationScore, is_detection_output, is_segmentation_output

    example = loaded.example(device)
    try:
        with torch.no_grad():
            out = loaded.module(example)
            if is_segmentation_output(out) and not isinstance(loaded.module, Scored):
                scope = "backbone" if isinstance(getattr(loaded.module, "backbone", None), nn.Module) else None
                loaded.module = Scored(loaded.module, SegmentationScore(), "segmentation", layer_scope=scope)
                out = loaded.module(example)
            if is_detection_output(out) and not isinstance(loaded.module, Scored):
                return _detection(loaded)
            if not torch.is_tensor(out):
                raise ConfigError(f"{loaded.description} returns a {type(out).__name__}, not logits [N, classes] "
                                  "(a segmentation model's {'out': [N, K, H, W]} is read as K class scores)")
            return int(out.shape[-1])
    except RuntimeError as err:
        hint = " (a video model may need a longer data.clip_len)" if loaded.is_video else " (check model.input_size)"
        raise ConfigError(f"{loaded.description} cannot run on an input of shape {list(example.shape)}{hint}: "
                          f"{str(err).splitlines()[0]}") from None


def _detection(loaded: LoadedModel) -> int:
    """A detector (output: a list of dicts boxes / labels / scores) becomes `Scored` (pipeline.scores):
    its default layers under `backbone.body` (the FPN's input), its inputs in [0, 1] (it normalises
    them itself: model.mean / model.std other than 0 / 1 are refused); returns its label count."""
    from dataclasses import replace

    from pipeline.scores import DetectionScore, Scored, detection_classes

    net = loaded.module
    body = getattr(getattr(net, "backbone", None), "body", None)
    scope = "backbone.body" if isinstance(body, nn.Module) else ("backbone" if hasattr(net, "backbone") else None)
    loaded.module = Scored(net, DetectionScore(), "detection", layer_scope=scope)
    pre = loaded.preprocess
    if loaded.preprocess_set and (tuple(pre.mean) != (0.0,) * 3 or tuple(pre.std) != (1.0,) * 3):
        raise ConfigError(f"{loaded.description} is a detection model: it normalises its inputs itself, so it takes "
                          f"images in [0, 1]; drop model.mean / model.std (given: {list(pre.mean)} / {list(pre.std)})")
    loaded.preprocess = replace(pre, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    count = detection_classes(net) or (len(loaded.class_names) if loaded.class_names else None)
    if count is None:
        raise ConfigError(f"{loaded.description} returns detections but its number of labels is unknown "
                          "(a torchvision Faster R-CNN, RetinaNet or FCOS has it)")
    return count


def layer_names(model: nn.Module) -> List[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> List[str]:
    """Expand names and glob patterns (e.g. `layer4.*.conv2`) into module names, in model order.

    An unknown name or a pattern matching nothing raises ConfigError listing the closest names.
    """
    names = layer_names(model)
    chosen: List[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            hits = [pattern] if pattern in names else []
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=6, cutoff=0.5)
            raise ConfigError(
                f"unknown layer {pattern!r}; closest: {', '.join(close) or 'none'} "
                "(python -m pipeline.layers lists them all)"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def probe_shapes(model: nn.Module, example: torch.Tensor | int, device: torch.device | str = "cpu") -> Dict[str, Optional[Tuple[int, ...]]]:
    """Output shape of every module for one example input (a tensor, or S for [1, 3, S, S]),
    in execution order (None: not a tensor)."""
    if isinstance(example, int):
        example = torch.zeros(1, 3, example, example, device=device)
    shapes: Dict[str, Optional[Tuple[int, ...]]] = {}
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape) if torch.is_tensor(output) else None

        return hook

    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def default_layer(model: nn.Module, shapes: Dict[str, Optional[Tuple[int, ...]]], size: Tuple[int, int]) -> str:
    """The layer used when none is given: for a ViT-family model the tokens entering its last
    attention (layouts.default_token_layer), else the last conv block, channels-last outputs read
    as maps (Swin, ConvNeXt); for a segmentation model (pipeline.scores) the last one of its backbone."""
    from pipeline.layouts import default_token_layer, read_shapes

    layouts, maps = read_shapes(model, shapes, size)
    scope = getattr(model, "layer_scope", None)  # a segmentation model (pipeline.scores): its backbone's last block
    if scope:
        maps = {n: s for n, s in maps.items() if n.startswith(scope + ".")} or maps
    return default_token_layer(model, shapes, layouts) or last_conv_block(model, maps)


def last_conv_block(model: nn.Module, shapes: Dict[str, Optional[Tuple[int, ...]]]) -> str:
    """The default layer: the last module to finish with a spatial [1, C, (T,) h, w] output (h*w > 1).

    Hooks fire in execution order and a container finishes after its children, so this is the
    outermost block producing the final feature map (`layer4` in a ResNet, `bn2` in EfficientNet,
    `features` in VGG). Adaptive pooling (a classifier head's resizing) does not count.
    """
    modules = dict(model.named_modules())
    head = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
    spatial = [
        n for n, s in shapes.items()
        if s is not None and len(s) in (4, 5) and s[-2] * s[-1] > 1 and not isinstance(modules[n], head)
    ]
    if not spatial:
        raise ConfigError("the model has no layer with a spatial output; set layers=[...] explicitly")
    return spatial[-1]
