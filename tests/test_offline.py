"""Offline (issue 11, point 3): weights that cannot be fetched fail fast with one `error:` line and
the ways out; cached weights load with no network access; `python -m pipeline.layers` needs no
weights at all.

"No network" is simulated so that these tests behave the same on a machine with or without one:
- subprocesses get HTTP(S)_PROXY / http(s)_proxy pointing at a closed local port (and NO_PROXY
  removed). torch hub (urllib) and huggingface_hub (its httpx client) both honour these variables,
  so every request the run makes is refused at once, as on a machine without a route out; with
  TORCH_HOME / HF_HOME / XDG_CACHE_HOME at empty folders this is what a new user offline sees.
- in process, the `no_network` fixture makes every socket connect and DNS lookup raise (and
  records it), which also proves that cached weights are loaded without touching the network.
"""
import socket
import subprocess
import time

import pytest
import torch

from pipeline import weights
from pipeline.config import ConfigError
from pipeline.layers import layer_table
from pipeline.models import build_model
from tests.conftest import PYTHON, subprocess_env

PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy")
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ResNet18_Weights.IMAGENET1K_V1 (DEFAULT)
TIMM_TINY = "test_resnet.r160_in1k"  # timm's test model: weights on the Hugging Face hub only
FAIL_FAST_S = 15  # whole process: ~3-9 s of it is importing torch / torchvision / timm on 2 busy cores


def closed_port() -> int:
    """A local port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp_path) -> dict:
    """A subprocess environment with empty caches and every proxy at a closed local port."""
    env = subprocess_env()
    proxy = f"http://127.0.0.1:{closed_port()}"
    env.update({name: proxy for name in PROXY_VARS})
    for name in ("NO_PROXY", "no_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        env.pop(name, None)
    env.update(TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    return env


def run_module(module, *args, env, cwd):
    start = time.monotonic()
    result = subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    return result, time.monotonic() - start


def error_lines(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every socket connect and DNS lookup of this process raises (each attempt is recorded);
    torch hub's and the Hugging Face caches are empty folders under tmp_path."""
    import huggingface_hub.constants as hf

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    return attempts


def hub_checkpoint(tmp_path, filename: str, state: dict):
    """`state` saved where torch hub's load_state_dict_from_url looks first (TORCH_HOME)."""
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / filename)


def hf_cache_entry(tmp_path, repo: str, filename: str, state: dict):
    """`state` as a safetensors file in a Hugging Face cache (HF_HOME/hub), laid out as
    huggingface_hub leaves a download: refs/main names a snapshot holding the file."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "snapshots" / commit / filename))


def same_weights(module, state):
    """The model holds `state` (the file put in the cache), not some other initialization."""
    loaded = module.state_dict()
    for key in (next(iter(state)), "fc.weight"):
        torch.testing.assert_close(loaded[key], state[key])


# -- the reproduction: a new user, offline, empty caches -----------------------------------------
def test_torchvision_weights_offline_fail_fast(tmp_path):
    """Before: an 88-line urllib traceback, exit 1."""
    result, elapsed = run_module("pipeline", "model=torchvision", "model.name=resnet18", "model.weights=DEFAULT",
                                 f"hydra.run.dir={tmp_path / 'run'}", env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    for part in ("torchvision resnet18", "ResNet18_Weights.IMAGENET1K_V1",
                 f"https://download.pytorch.org/models/{RESNET18_FILE}", "model.weights=null",
                 "model=checkpoint model.path=FILE model.arch=resnet18",
                 str(tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_FILE)):
        assert part in line, part
    assert elapsed < FAIL_FAST_S, elapsed
    assert not (tmp_path / "run" / "maps.h5").exists()


def test_timm_pretrained_offline_fail_fast(tmp_path):
    """Before: five Hugging Face hub retries (~45 s), then a traceback, exit 1."""
    result, elapsed = run_module("pipeline", "model=timm", "model.name=resnet18", "model.pretrained=true",
                                 f"hydra.run.dir={tmp_path / 'run'}", env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    for part in ("timm resnet18", "timm/resnet18.a1_in1k", "model.pretrained=false",
                 "model=checkpoint model.path=FILE", str(tmp_path / "hf" / "hub"),
                 str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18_a1_0-d63eafa0.pth")):
        assert part in line, part
    assert elapsed < FAIL_FAST_S, elapsed


# -- the same in process: the network part alone is immediate ------------------------------------
def test_missing_weights_fail_at_once_in_process(make_cfg, no_network):
    import timm  # noqa: F401 - imported first: the timing is of the weights' check alone
    import torchvision.models  # noqa: F401

    for overrides, way_out, expected in (
        (("model=torchvision", "model.name=resnet18", "model.weights=IMAGENET1K_V1"), "model.weights=null", RESNET18_FILE),
        (("model=timm", f"model.name={TIMM_TINY}", "model.pretrained=true"), "model.pretrained=false", "timm/test_resnet.r160_in1k"),
    ):
        start = time.monotonic()
        with pytest.raises(ConfigError) as err:
            build_model(make_cfg(*overrides).model)
        assert time.monotonic() - start < 2
        message = str(err.value)
        assert "\n" not in message and "network disabled by the test" in message
        assert expected in message and way_out in message and "model=checkpoint" in message
    assert no_network  # the probe was the only attempt, refused


def test_a_download_that_fails_after_the_check_is_refused_too(make_cfg, no_network, monkeypatch, tmp_path):
    """The host answered the check, then the download itself fails (here: every socket refused)."""
    monkeypatch.setattr(weights, "_unreachable", lambda url: None)
    with pytest.raises(ConfigError, match=r"cannot be downloaded \(URLError: .*network disabled.*model.weights=null"):
        build_model(make_cfg("model=torchvision", "model.name=resnet18").model)
    assert no_network and not list((tmp_path / "torch").rglob("*.pth"))  # tried, and nothing half-written kept


def test_hf_hub_offline_is_named_and_nothing_is_tried(make_cfg, no_network, monkeypatch):
    """HF_HUB_OFFLINE=1 (huggingface_hub's own offline switch) with an empty cache: refused at once."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set.*model.pretrained=false"):
        build_model(make_cfg("model=timm", f"model.name={TIMM_TINY}", "model.pretrained=true").model)
    assert no_network == []


def test_a_host_that_never_answers_is_given_up_on(make_cfg, monkeypatch, tmp_path):
    """A proxy that accepts connections and never replies (a black hole): the bounded check gives up
    after PROBE_TIMEOUT_S instead of waiting for ever."""
    monkeypatch.setattr(weights, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        for name in PROXY_VARS:
            monkeypatch.setenv(name, f"http://127.0.0.1:{hole.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot be downloaded \(.*\); ways out: model.weights=null"):
            build_model(make_cfg("model=torchvision", "model.name=resnet18").model)
        assert time.monotonic() - start < 3


# -- cached weights: loaded from the cache with no network access at all -------------------------
def test_cached_weights_load_with_no_network(make_cfg, no_network, tmp_path):
    import timm
    import torchvision

    tv_state = torchvision.models.resnet18(weights=None).state_dict()
    hub_checkpoint(tmp_path, RESNET18_FILE, tv_state)
    loaded = build_model(make_cfg("model=torchvision", "model.name=resnet18", "model.weights=DEFAULT").model)
    same_weights(loaded.module, tv_state)
    assert loaded.class_names[0] == "tench"

    hf_state = timm.create_model(TIMM_TINY, pretrained=False).state_dict()  # timm's HF hub weights
    hf_cache_entry(tmp_path, f"timm/{TIMM_TINY}", "model.safetensors", hf_state)
    loaded = build_model(make_cfg("model=timm", f"model.name={TIMM_TINY}", "model.pretrained=true").model)
    same_weights(loaded.module, hf_state)
    assert loaded.preprocess.input_size == 160

    url_state = timm.create_model("resnet10t", pretrained=False).state_dict()  # a timm URL in torch hub's cache
    hub_checkpoint(tmp_path, "resnet10t_176_c3-f3215ab1.pth", url_state)
    loaded = build_model(make_cfg("model=timm", "model.name=resnet10t", "model.pretrained=true").model)
    same_weights(loaded.module, url_state)
    assert no_network == []


def test_app_runs_on_cached_torchvision_weights_offline(tmp_path):
    """The app as a user runs it, network simulated away: the cached file is all it needs."""
    import torchvision

    hub_checkpoint(tmp_path, RESNET18_FILE, torchvision.models.resnet18(weights=None).state_dict())
    result, _ = run_module("pipeline", "model=torchvision", "model.name=resnet18", "model.weights=DEFAULT",
                           "technique=activations", "data.limit=1", "num_workers=0", "render.png=false",
                           f"hydra.run.dir={tmp_path / 'run'}", env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done 1 inputs" in result.stdout and (tmp_path / "run" / "maps.h5").exists()


# -- python -m pipeline.layers: no weights needed ------------------------------------------------
def test_layers_cli_lists_torchvision_without_its_weights(tmp_path):
    result, _ = run_module("pipeline.layers", "model=torchvision", "model.name=resnet18", "model.weights=DEFAULT",
                           env=offline_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "architecture only" in result.stdout and "input [1, 3, 224, 224]" in result.stdout
    lines = {line.split()[0]: line.split() for line in result.stdout.splitlines() if not line.startswith("#")}
    assert lines["layer4"][2:6] == ["[1,", "512,", "7,", "7]"] and lines["layer4"][6] == "-"  # already maps
    assert lines["layer4"][7:9] == ["435", "32"]
    assert "# default layers: ['layer4']" in result.stdout
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.safetensors"))


def test_layer_table_needs_no_weights(make_cfg, no_network, tmp_path):
    table = layer_table(make_cfg("model=timm", "model.name=resnet18", "model.pretrained=true"))
    assert "timm resnet18 pretrained=True (architecture only" in table and "layer4.1.conv2" in table
    # the preprocessing the weights would give: efficientnet_b1's DEFAULT weights take 240 px
    loaded = build_model(make_cfg("model=torchvision", "model.name=efficientnet_b1").model, load_weights=False)
    assert (loaded.preprocess.input_size, loaded.preprocess.resize) == (240, 255)
    with pytest.raises(ConfigError, match="unknown weights"):  # a weights name is still checked
        build_model(make_cfg("model=torchvision", "model.name=resnet18", "model.weights=NOPE").model, load_weights=False)
    # a state-dict checkpoint: its architecture, the file is not read
    table = layer_table(make_cfg("model=checkpoint", f"model.path={tmp_path / 'absent.pt'}",
                                 "model.arch=tests.tinymodels:TinyNet", "model.num_classes=10",
                                 "model.input_size=32", "model.resize=32"))
    assert "architecture only" in table and "[1, 16, 16, 16]" in table
    assert no_network == []


def test_layer_table_embedded_and_torchscript(make_cfg, no_network, torchscript_model):
    table = layer_table(make_cfg())
    assert "tf_efficientnet_lite0 (embedded ImageNet weights)" in table and "blocks.4" in table
    with pytest.raises(ConfigError, match="TorchScript model cannot be hooked"):
        layer_table(make_cfg("model=checkpoint", f"model.path={torchscript_model}"))
    assert no_network == []
