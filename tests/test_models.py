import cv2
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data import SAMPLES_DIR, prepare
from pipeline.models import build_model, last_conv_block, probe_shapes, resolve_layers
from tests.tinymodels import tiny_net

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_embedded_weights_classify_sample_photos(make_cfg):
    """The one check on the real embedded weights: chelsea is a cat, coffee an espresso."""
    loaded = build_model(make_cfg().model)
    assert not loaded.module.training
    assert all(not p.requires_grad for p in loaded.module.parameters())
    batch = []
    for name in ("chelsea", "coffee"):
        rgb = cv2.cvtColor(cv2.imread(str(SAMPLES_DIR / f"{name}.jpg")), cv2.COLOR_BGR2RGB)
        batch.append(prepare(rgb, None, loaded.preprocess)[0])
    with torch.no_grad():
        top = loaded.module(torch.stack(batch)).argmax(1).tolist()
    assert top[0] in CAT_CLASSES, loaded.class_name(top[0])
    assert top[1] == ESPRESSO
    assert loaded.class_name(ESPRESSO) == "espresso" and loaded.class_name(285) == "Egyptian cat"


def test_resolve_layers_names_globs_and_order():
    model = tiny_net()
    assert resolve_layers(model, ["fc", "conv*"]) == ["conv1", "conv2", "fc"]
    assert resolve_layers(model, ["relu?"]) == ["relu1", "relu2"]


def test_unknown_layer_lists_closest_names():
    with pytest.raises(ConfigError) as err:
        resolve_layers(tiny_net(), ["conv3"])
    assert "conv3" in str(err.value) and "conv1" in str(err.value) and "conv2" in str(err.value)
    with pytest.raises(ConfigError, match="layer9"):
        resolve_layers(tiny_net(), ["layer9.*"])


def test_default_layer_is_last_conv_block():
    import torchvision

    resnet = torchvision.models.resnet18(weights=None).eval()
    assert last_conv_block(resnet, probe_shapes(resnet, 64)) == "layer4"
    model = tiny_net()
    assert last_conv_block(model, probe_shapes(model, 32)) == "boom"


def test_torchvision_by_name_without_weights(make_cfg):
    loaded = build_model(make_cfg("model=torchvision", "model.name=resnet18", "model.weights=null").model)
    assert type(loaded.module).__name__ == "ResNet" and loaded.class_names[0] == "tench"
    with pytest.raises(ConfigError, match="resnet19"):
        build_model(make_cfg("model=torchvision", "model.name=resnet19", "model.weights=null").model)
    with pytest.raises(ConfigError, match="weights"):
        build_model(make_cfg("model=torchvision", "model.name=resnet18", "model.weights=NOPE").model)


def test_timm_by_name(make_cfg):
    loaded = build_model(make_cfg("model=timm", "model.name=resnet10t").model)
    assert not loaded.module.training
    with pytest.raises(ConfigError, match="closest"):
        build_model(make_cfg("model=timm", "model.name=resnet10tt").model)


def test_checkpoint_torchscript_and_state_dict(make_cfg, tmp_path, torchscript_model):
    ref = tiny_net()
    x = torch.randn(2, 3, 32, 32)
    scripted = build_model(make_cfg("model=checkpoint", f"model.path={torchscript_model}").model)
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "sd.pt")
    from_sd = build_model(make_cfg("model=checkpoint", f"model.path={tmp_path / 'sd.pt'}",
                                   "model.arch=tests.tinymodels:TinyNet", "model.num_classes=10").model)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(scripted.module(x), expected)
        torch.testing.assert_close(from_sd.module(x), expected)
    assert scripted.class_names is None  # 10 classes: no ImageNet names


def test_checkpoint_errors_are_clear(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_model(make_cfg("model=checkpoint", f"model.path={tmp_path / 'none.pt'}").model)
    torch.save(tiny_net().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(make_cfg("model=checkpoint", f"model.path={tmp_path / 'sd.pt'}").model)
    with pytest.raises(ConfigError, match="does not fit"):
        build_model(make_cfg("model=checkpoint", f"model.path={tmp_path / 'sd.pt'}", "model.arch=resnet18").model)
