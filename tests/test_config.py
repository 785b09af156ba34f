import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from pipeline.config import ConfigError, validate


def test_default_config_composes(make_cfg):
    cfg = make_cfg()
    assert cfg.model.kind == "efficientnet_lite0"
    assert cfg.data.kind == "samples"
    assert list(cfg.technique) == ["activations", "saliency", "gradcam"]
    assert list(cfg.layers) == ["blocks.4", "bn2"]  # from the model config
    assert cfg.target == "pred" and cfg.render.png is True
    validate(cfg)


def test_overrides_select_groups_and_lists(make_cfg):
    cfg = make_cfg("model=torchvision", "model.name=resnet50", "model.weights=null",
                   "technique=[saliency,gradcam]", "layers=[layer4.*.conv2]", "target=topk:3",
                   "data=video", "data.path=x.mp4", "data.start=5", "data.step=2", "data.crop=[0,0,10,10]")
    assert cfg.model.weights is None and cfg.model.name == "resnet50"
    assert list(cfg.technique) == ["saliency", "gradcam"]
    assert list(cfg.layers) == ["layer4.*.conv2"]
    assert cfg.target == "topk:3" and cfg.data.start == 5 and list(cfg.data.crop) == [0, 0, 10, 10]
    assert make_cfg("target=7").target == "7"


def test_misspelt_key_is_named(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("model.nmae=resnet18")
    assert "nmae" in str(err.value.__cause__)


def test_misspelt_technique_option_is_named(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("technique=gradcam", "technique.gradcam.relux=false")
    assert "relux" in str(err.value.__cause__)


def test_wrong_type_is_named(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("batch_size=many")
    assert "batch_size" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        make_cfg("technique=activations", "technique.activations.topk=lots")


def test_unknown_group_option_lists_known(make_cfg):
    with pytest.raises(MissingConfigException) as err:
        make_cfg("technique=gradcamz")
    assert "gradcamz" in str(err.value) and "gradcam" in str(err.value) and "saliency" in str(err.value)
    with pytest.raises(MissingConfigException):
        make_cfg("model=resnet")


@pytest.mark.parametrize("override, fragment", [
    ("target=topk:0", "target"),
    ("target=topk:x", "target"),
    ("batch_size=0", "batch_size"),
    ("device=gpu", "device"),
    ("data.crop=[1,2,3]", "data.crop"),
    ("data.limit=0", "data.limit"),
    ("model.interpolation=nearest", "interpolation"),
])
def test_validate_names_the_bad_value(make_cfg, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        validate(make_cfg(override))
