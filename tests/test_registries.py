"""Data sources and model families by registry: a new kind is one registered class or function
plus its YAML; duplicate names raise, unknown names list the known ones."""
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from pipeline.config import CONF_DIR, ConfigError, DataConfig, ModelConfig, register_configs, validate
from pipeline.data import SOURCES, Item, Source, build_source, get_source, register_source
from pipeline.families import FAMILIES, SCHEMAS, Built, get_family, register_family
from pipeline.models import build_model
from pipeline.runner import run
from tests.conftest import read_h5
from tests.tinymodels import TinyNet


@dataclass
class StripesConfig(DataConfig):
    count: int = 3  # inputs the source makes
    period: int = 4  # stripe width in pixels


class StripesSource(Source):
    """`count` synthetic 40x48 images of vertical stripes, a different phase each."""

    def __init__(self, count: int, period: int):
        self.items = [Item(f"stripes{i:02d}", "<stripes>", i) for i in range(count)]
        self.skipped, self.period = [], period

    @classmethod
    def from_config(cls, cfg) -> "StripesSource":
        return cls(cfg.count, cfg.period)

    def read(self, item, min_side=None) -> np.ndarray:
        columns = (np.arange(48) + item.frame) // self.period % 2 * 255
        return np.broadcast_to(columns[None, :, None], (40, 48, 3)).astype(np.uint8)


@dataclass
class TinyFamilyConfig(ModelConfig):
    classes: int = 5  # the tiny net's number of classes


def build_tiny(cfg, load_weights: bool) -> Built:
    torch.manual_seed(0)
    return Built(TinyNet(cfg.classes), f"tiny family ({cfg.classes} classes)",
                 [f"stripe class {i}" for i in range(cfg.classes)],
                 dict(input_size=32, resize=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))


DATA_YAML = """defaults:
  - /schema/data/stripes@_here_
kind: stripes
count: 4
"""
MODEL_YAML = """defaults:
  - /schema/model/tiny@_here_
kind: tiny
classes: 6
layers: [relu2]
"""


@pytest.fixture
def plugins(tmp_path):
    """The stripes source and tiny family registered (with their schemas) and a conf dir holding
    the shipped configs plus conf/data/stripes.yaml and conf/model/tiny.yaml; all removed after."""
    register_source("stripes", schema=StripesConfig)(StripesSource)
    register_family("tiny", schema=TinyFamilyConfig)(build_tiny)
    register_configs()
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "data" / "stripes.yaml").write_text(DATA_YAML)
    (conf / "model" / "tiny.yaml").write_text(MODEL_YAML)
    try:
        yield lambda *overrides: _compose(conf, overrides)
    finally:
        SOURCES.pop("stripes", None)
        FAMILIES.pop("tiny", None)
        SCHEMAS.pop("tiny", None)
        repo = ConfigStore.instance().repo["schema"]
        repo["data"].pop("stripes.yaml", None)
        repo["model"].pop("tiny.yaml", None)


def _compose(conf, overrides):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_a_registered_source_and_family_run_end_to_end_from_their_yaml(plugins, tmp_path):
    cfg = plugins("model=tiny", "data=stripes", "data.period=3", "technique=[activations,gradcam]",
                  "num_workers=0", "batch_size=3", "render.png=false")
    assert (cfg.data.count, cfg.data.period, cfg.model.classes) == (4, 3, 6)
    summary = run(cfg, tmp_path / "run")
    assert (summary.done, summary.rows, summary.skipped) == (4, 4, 0)
    data, attrs = read_h5(tmp_path / "run" / "maps.h5")
    assert [s.decode() for s in data["id"]] == [f"stripes{i:02d}" for i in range(4)]
    assert data["gradcam/relu2/cam"].shape == (4, 1, 16, 16)
    assert data["activations/relu2/maps"].shape == (4, 16, 16, 16)
    assert data["target"].max() < 6  # the family's 6 classes
    assert "tiny family (6 classes)" in str(attrs) and "period: 3" in attrs["config"]


def test_a_family_and_source_schema_types_their_own_keys(plugins):
    cfg = plugins("model=tiny", "data=stripes")
    assert OmegaConf.get_type(cfg.model) is TinyFamilyConfig and OmegaConf.get_type(cfg.data) is StripesConfig
    for override in ("model.classes=many", "data.period=wide"):
        with pytest.raises(HydraException, match=override) as err:
            plugins("model=tiny", "data=stripes", override)
        assert isinstance(err.value.__cause__, ValidationError), err.value.__cause__


def test_the_family_builds_through_build_model(plugins):
    loaded = build_model(plugins("model=tiny").model)
    assert loaded.num_classes == 6 and loaded.class_name(5) == "stripe class 5"
    assert (loaded.preprocess.input_size, loaded.preprocess.std) == (32, (0.25, 0.25, 0.25))
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert isinstance(build_source(plugins("data=stripes").data), StripesSource)


def test_duplicate_names_raise():
    with pytest.raises(ValueError, match="'folder' is already registered by pipeline.data.images"):
        register_source("folder")(StripesSource)
    with pytest.raises(ValueError, match="'timm' is already registered by pipeline.families.timm"):
        register_family("timm")(build_tiny)
    assert SOURCES["folder"].__name__ == "FolderSource" and FAMILIES["timm"].__module__ == "pipeline.families.timm"


def test_unknown_kinds_list_the_known_ones(make_cfg):
    with pytest.raises(ConfigError, match=r"data.kind='tape' is unknown; known: folder, samples, video"):
        get_source("tape")
    with pytest.raises(ConfigError, match=r"model.kind='onnx' is unknown; known: checkpoint, efficientnet_lite0, "
                                          r"timm, torchvision"):
        get_family("onnx")
    for override, fragment in (("data.kind=tape", "data.kind='tape' is unknown; known: folder"),
                               ("model.kind=onnx", "model.kind='onnx' is unknown; known: checkpoint")):
        with pytest.raises(ConfigError, match=fragment):
            validate(make_cfg(override))


def test_unknown_kind_stops_run_before_any_work(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="data.kind='tape'"):
        run(make_cfg("data.kind=tape", "num_workers=0"), tmp_path / "run")
    assert not (tmp_path / "run" / "maps.h5").exists()


def test_a_schema_of_the_wrong_type_is_refused(tmp_path):
    register_family("untyped", schema=StripesConfig)(build_tiny)  # a DataConfig, not a ModelConfig
    try:
        with pytest.raises(TypeError, match="model 'untyped' must be a dataclass subclassing ModelConfig"):
            register_configs()
    finally:
        FAMILIES.pop("untyped")
        SCHEMAS.pop("untyped")


def test_a_family_says_what_code_it_imports_and_reproduce_asks_for_trust():
    """reproduce's --trust-code question comes from each family's `imports` hook, not from a list of kinds."""
    from pipeline.families.base import IMPORTS
    from pipeline.reproduce import code_imports

    @register_family("plugin_net", imports=lambda cfg: [f"import {cfg.name}"])
    def plugin_net(cfg, load_weights):  # pragma: no cover - never built here
        raise AssertionError

    try:
        assert code_imports(OmegaConf.create({"model": {"kind": "plugin_net", "name": "my.nets"}})) == ["import my.nets"]
        assert code_imports(OmegaConf.create({"model": {"kind": "timm", "name": "resnet18"}})) == []
    finally:
        FAMILIES.pop("plugin_net"), IMPORTS.pop("plugin_net")
