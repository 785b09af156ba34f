"""model=checkpoint: a local file, TorchScript or a state dict for model.arch (read weights_only)."""
from __future__ import annotations

import importlib
import inspect
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.families.base import Built, register_family


def arch_net(arch: str, num_classes: Optional[int]) -> nn.Module:
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
        if "weights_backbone" in inspect.signature(tvm.get_model_builder(arch)).parameters:
            kwargs["weights_backbone"] = None  # segmentation / detection: no backbone weights read either
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


def checkpoint_net(path: str, arch: Optional[str], num_classes: Optional[int]) -> nn.Module:
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
    model = arch_net(arch, num_classes)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"checkpoint {path} does not fit model.arch={arch!r}: {str(err)[:400]}") from None
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not fit model.arch={arch!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def arch_imports(cfg) -> List[str]:
    """`model.arch=package.module:Class` imports that module and calls that class; a torchvision /
    timm name or a TorchScript file imports no Python code of its own."""
    arch = cfg.arch
    if arch is not None and ":" in str(arch):
        module_name, _, attr = str(arch).partition(":")
        return [f"model.arch={arch!r}: import the Python module {module_name!r} and call its {attr!r}"]
    return []


@register_family("checkpoint", imports=arch_imports)
def build(cfg, load_weights: bool) -> Built:
    """model.path: TorchScript (model.arch null) or a state dict for model.arch; `load_weights=False`
    builds model.arch alone without reading the file (TorchScript is loaded: it is the architecture)."""
    if load_weights or cfg.arch is None:
        return Built(checkpoint_net(cfg.path, cfg.arch, cfg.num_classes),
                     f"checkpoint {cfg.path} arch={cfg.arch or 'torchscript'}")
    return Built(arch_net(cfg.arch, cfg.num_classes),
                 f"checkpoint arch={cfg.arch} (architecture only, {cfg.path} not read)")
