"""Pretrained torchvision and timm weights: loaded from the local cache (torch hub's, Hugging Face's)
with no network access at all; when missing, downloaded after a bounded check that their host
answers; when they cannot be fetched, a ConfigError within seconds naming the weights and the ways
out (model.weights=null, model.pretrained=false, model=checkpoint, where to put the file)."""
from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from pipeline.errors import ConfigError

PROBE_TIMEOUT_S = 5.0  # the bounded check that the weights' host answers, before any download
DOWNLOAD_TIMEOUT_S = 30.0  # socket timeout of each connect / read while torch hub downloads


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # a redirect is an answer: the host is reachable
        return None


def _unreachable(url: str) -> Optional[str]:
    """None when `url`'s host gives any HTTP answer to a HEAD request within PROBE_TIMEOUT_S
    (through the proxies the environment sets, as torch hub and huggingface_hub use them); else
    why not, in a few words. DNS included: the probe runs in a thread given PROBE_TIMEOUT_S."""
    outcome: List[Optional[str]] = []

    def probe() -> None:
        try:
            opener = urllib.request.build_opener(_NoRedirect)
            opener.open(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # 3xx / 4xx / 5xx: it answered
            outcome.append(None)
        except urllib.error.URLError as err:
            # TLS trouble is left to the library, whose own certificate setup decides
            outcome.append(None if isinstance(err.reason, ssl.SSLError) else str(err.reason))
        except (OSError, http.client.HTTPException, ValueError) as err:
            outcome.append(f"{err.__class__.__name__}: {err}")

    thread = threading.Thread(target=probe, name="weights-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S)
    return outcome[0] if outcome else f"no answer within {PROBE_TIMEOUT_S:g} s"


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch hub's urlopen has no timeout of its own: a stalled download would wait for ever."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _network_errors() -> tuple:
    """What a failed download raises: urllib / socket errors (OSError, huggingface_hub's errors
    included), http.client's, and the transport errors of huggingface_hub's HTTP client."""
    errors = [OSError, http.client.HTTPException]
    for module in ("httpx2", "httpx", "requests"):  # one not imported raised nothing
        lib = sys.modules.get(module)
        errors.append(getattr(lib, "TransportError", None) or getattr(lib, "RequestException", None))
    return tuple(e for e in errors if isinstance(e, type))


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{err.__class__.__name__}: {text[:160]}" if text else err.__class__.__name__


def _hub_file(url: str) -> Path:
    """Where torch hub's load_state_dict_from_url keeps (and first looks for) the file at `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name


def torchvision_model(name: str, w, kwargs: dict) -> nn.Module:
    """tvm.get_model(name, weights=w). A weights file in torch hub's cache loads with no network
    access; a missing one is downloaded after a bounded check that its host answers, and one that
    cannot be fetched raises ConfigError naming the weights and the ways out."""
    import torchvision.models as tvm

    cached = _hub_file(w.url)

    def refused(why: str) -> ConfigError:
        return ConfigError(
            f"torchvision {name} weights {w} ({w.url}) are not in torch hub's cache and cannot be "
            f"downloaded ({why}); ways out: model.weights=null (random initialization), "
            f"model=checkpoint model.path=FILE model.arch={name} (a local state dict), or put the "
            f"file from {w.url} at {cached}")

    if not cached.is_file():
        why = _unreachable(w.url)
        if why:
            raise refused(why)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                return tvm.get_model(name, weights=w, **kwargs)
        except _network_errors() as err:
            raise refused(_short(err)) from None
    return tvm.get_model(name, weights=w, **kwargs)


def _hf_filenames(filename: Optional[str]) -> List[str]:
    """The files timm's load_state_dict_from_hf tries, in order (a .safetensors alternative first)."""
    if filename is None:
        return ["model.safetensors", "pytorch_model.bin"]
    alternative = {"pytorch_model.bin": "model.safetensors",
                   "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(filename)
    if alternative is None and filename.endswith(".bin"):
        alternative = filename[:-4] + ".safetensors"
    return [alternative, filename] if alternative else [filename]


def timm_model(name: str, pretrained: bool) -> nn.Module:
    """timm.create_model(name, pretrained). Pretrained weights already in the Hugging Face cache
    (or, for a model with a plain URL, in torch hub's cache) are loaded from that file with no
    network access; missing ones are downloaded after a bounded check that the host answers, and
    weights that cannot be fetched raise ConfigError naming them and the ways out."""
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False)
    from timm.models import get_pretrained_cfg

    pc = get_pretrained_cfg(name)
    if pc is None or not (pc.hf_hub_id or pc.url or pc.file):
        raise ConfigError(f"timm {name} has no pretrained weights; set model.pretrained=false")
    repo = revision = None
    filenames: List[str] = []
    if pc.hf_hub_id:
        repo, _, revision = pc.hf_hub_id.partition("@")
        filenames = _hf_filenames(pc.hf_hub_filename)
    local = None
    if repo:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str):  # (not the sentinel of a file known to be missing)
                # timm's hub loading applies custom_load only to an explicit filename with "hf"
                local = (hit, "hf" if pc.hf_hub_filename and pc.custom_load == "hf" else False)
                break
    if local is None and pc.url and _hub_file(pc.url).is_file():
        local = (str(_hub_file(pc.url)), pc.custom_load)
    if local is not None:
        return timm.create_model(name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=local[0], custom_load=local[1]))

    import torchvision.models as tvm
    from huggingface_hub import constants, hf_hub_url

    arch = name.partition(".")[0]
    arch = f"timm.models:{arch}" if arch in tvm.list_models() and hasattr(timm.models, arch) else name
    source = f"Hugging Face hub {repo} {filenames[0]}" if repo else pc.url
    put = [f"put the file from {pc.url} at {_hub_file(pc.url)}"] if pc.url else []
    if repo:
        put.append(f"copy a Hugging Face cache holding {repo} into {constants.HF_HUB_CACHE}")

    def refused(why: str) -> ConfigError:
        return ConfigError(
            f"timm {name} pretrained weights ({source}) are not in the local cache and cannot be "
            f"downloaded ({why}); ways out: model.pretrained=false (random initialization), "
            f"model=checkpoint model.path=FILE model.arch={arch} (a local state dict), or "
            f"{' or '.join(put)}")

    if repo and constants.HF_HUB_OFFLINE:
        raise refused("HF_HUB_OFFLINE is set")
    url = hf_hub_url(repo, filenames[0], revision=revision or None) if repo else pc.url
    why = _unreachable(url)
    if why:
        raise refused(why)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return timm.create_model(name, pretrained=True)
    except _network_errors() as err:
        raise refused(_short(err)) from None
