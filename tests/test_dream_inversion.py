"""deepdream, inversion (per input, image outputs) and kernels (data-free) on TinyNet."""
import h5py
import numpy as np
import pytest
import torch

from pipeline.hooks import capture, hook_count
from pipeline.runner import run
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from tests.conftest import tiny_overrides
from tests.tinymodels import tiny_net

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PRED = TargetSpec.parse("pred")


def normalize(pixels):
    """pixels [N, 3, H, W] in [0, 1] -> model input."""
    return (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def layer_act(model, x, layer):
    with torch.no_grad(), capture(model, [layer]) as acts:
        model(x)
    return acts[layer]


def test_inversion_lowers_the_representation_loss_and_is_deterministic():
    model, x = tiny_net(), normalize(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)))
    technique = get_technique("inversion")(steps=40, mean=MEAN, std=STD)
    maps = technique.attribute(model, x, ["relu1", "conv2"], PRED).maps
    for layer in ("relu1", "conv2"):
        image, loss = maps[layer, "image"], maps[layer, "loss"]
        assert image.dtype == torch.uint8 and image.shape == (2, 3, 16, 16)
        assert loss.shape == (2, 40)
        assert (loss[:, -1] < 0.3 * loss[:, 0]).all(), (layer, loss[:, [0, -1]])
        # the stored loss is the representation loss of the (pre-rounding) result: recheck on the image
        phi0 = layer_act(model, x, layer)
        phi = layer_act(model, normalize(image.float() / 255), layer)
        rep = (phi - phi0).pow(2).flatten(1).sum(1) / phi0.pow(2).flatten(1).sum(1)
        assert (rep < 0.5 * loss[:, 0]).all()
    again = technique.attribute(model, x, ["relu1"], PRED).maps  # same seed, same init: same result
    assert torch.equal(maps["relu1", "image"], again["relu1", "image"])
    assert torch.equal(maps["relu1", "loss"], again["relu1", "loss"])
    assert hook_count(model) == 0


def test_deepdream_keeps_the_shape_and_amplifies_the_layer():
    model = tiny_net()
    pixels = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(2))
    x = normalize(pixels)
    technique = get_technique("deepdream")(octaves=2, steps=5, mean=MEAN, std=STD)
    maps = technique.attribute(model, x, ["relu1", "conv2"], PRED).maps
    for layer in ("relu1", "conv2"):
        dream = maps[layer, "dream"]
        assert dream.dtype == torch.uint8 and dream.shape == (2, 3, 20, 24)
        assert maps[layer, "objective"].shape == (2, 10)
        before = layer_act(model, x, layer).pow(2).flatten(1).mean(1)
        after = layer_act(model, normalize(dream.float() / 255), layer).pow(2).flatten(1).mean(1)
        assert (after > 1.2 * before).all(), (layer, before, after)
    # one channel: its mean activation goes up
    one = get_technique("deepdream")(channel=3, octaves=2, steps=5, mean=MEAN, std=STD)
    dream = one.attribute(model, x, ["conv2"], PRED).maps["conv2", "dream"]
    before = layer_act(model, x, "conv2")[:, 3].mean((1, 2))
    after = layer_act(model, normalize(dream.float() / 255), "conv2")[:, 3].mean((1, 2))
    assert (after > before).all()
    with pytest.raises(ValueError, match="channel"):
        one.check_layers({"conv2": (1, 2, 8, 8)})
    with pytest.raises(ValueError, match="3D"):
        technique.check_layers({"relu1": (1, 4, 4, 8, 8)})


def test_kernels_tiles_are_the_normalized_weights():
    model = tiny_net()
    gen = dict(device=torch.device("cpu"), generator=torch.Generator(), max_batch=4)
    out = get_technique("kernels")(size=6).generate(model, ["conv1"], **gen)  # 3x3 kernels, repeated 2x
    w = model.conv1.weight.detach().numpy()  # [8, 3, 3, 3]
    expected = np.round(127.5 * (1 + w / np.abs(w).max())).astype(np.uint8).repeat(2, 2).repeat(2, 3)
    assert out["conv1", "images"].dtype == torch.uint8
    np.testing.assert_array_equal(out["conv1", "images"].numpy(), expected)
    np.testing.assert_array_equal(out["conv1", "index"].numpy(), np.arange(8))
    np.testing.assert_array_equal(out["conv1", "channel"].numpy(), np.full(8, -1))

    out = get_technique("kernels")(in_channels=2, normalize="tile", size=0).generate(model, ["conv2"], **gen)
    w = model.conv2.weight.detach().numpy()  # [16, 8, 3, 3]
    tiles = []
    for f in range(16):
        for c in range(2):
            k = w[f, c]
            tiles.append(np.repeat(np.round(255 * (k - k.min()) / (k.max() - k.min()))[None], 3, 0))
    np.testing.assert_array_equal(out["conv2", "images"].numpy(), np.stack(tiles).astype(np.uint8))
    np.testing.assert_array_equal(out["conv2", "index"].numpy(), np.arange(16).repeat(2))
    np.testing.assert_array_equal(out["conv2", "channel"].numpy(), np.tile([0, 1], 16))

    with pytest.raises(ValueError, match="not Conv2d"):
        get_technique("kernels")().check_model(model, ["conv1", "relu1"])


def test_run_writes_dreams_inversions_and_kernels(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[deepdream,inversion]",
                                 "layers=[relu1,conv2]", "technique.deepdream.octaves=2",
                                 "technique.deepdream.steps=2", "technique.inversion.steps=3",
                                 "data.limit=3")), tmp_path / "a")
    with h5py.File(tmp_path / "a" / "maps.h5", "r") as f:
        for name in ("deepdream/relu1/dream", "deepdream/conv2/dream", "inversion/relu1/image", "inversion/conv2/image"):
            assert f[name].shape == (3, 3, 32, 32) and f[name].dtype == np.uint8, name
        assert f["deepdream/conv2/objective"].shape == (3, 4) and f["inversion/relu1/loss"].shape == (3, 3)
    for name in ("deepdream", "inversion"):
        assert len(list((tmp_path / "a" / "png" / name).glob("*.png"))) == 3

    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=kernels", "layers=[conv1,conv2]",
                                 "data.limit=1")), tmp_path / "b")
    with h5py.File(tmp_path / "b" / "maps.h5", "r") as f:
        assert f["kernels/conv1/images"].shape == (8, 3, 48, 48)
        assert f["kernels/conv2/images"].shape == (16, 3, 48, 48)
    assert (tmp_path / "b" / "png" / "kernels.png").is_file()


def test_deepdream_does_not_depend_on_how_the_batch_is_chunked():
    from pipeline.targets import TargetSpec
    from pipeline.techniques import get_technique
    from tests.tinymodels import tiny_net

    model, x = tiny_net(), torch.rand(3, 3, 20, 24)
    dream = get_technique("deepdream")(octaves=2, steps=3, jitter=2, mean=[0.5] * 3, std=[0.5] * 3)
    runs = [dream.attribute(model, x, ["relu2"], TargetSpec.parse("pred"), max_batch=mb).maps["relu2", "dream"]
            for mb in (1, 2, 3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
