"""top_activated: the most activated channels beside their filter_vis images, cached on disk."""
import h5py
import pytest
import torch

from pipeline.runner import run
from pipeline.targets import TargetSpec
from pipeline.techniques import get_technique
from pipeline.techniques import top_activated
from pipeline.techniques.filter_vis import FilterVis
from tests.conftest import tiny_overrides
from tests.tinymodels import tiny_net

PRED = TargetSpec.parse("pred")


def make(tmp_path, **options):
    return get_technique("top_activated")(cache_dir=str(tmp_path / "cache"), size=16, steps=4, **options)


def test_top_channels_beside_their_cached_filter_images(tmp_path, monkeypatch):
    model, x = tiny_net(), torch.rand(3, 3, 16, 16)
    calls = []
    generate = FilterVis.generate
    monkeypatch.setattr(FilterVis, "generate", lambda self, *a, **k: calls.append(self.options.channels) or generate(self, *a, **k))
    result = make(tmp_path, top=3).attribute(model, x, ["relu2"], PRED).maps
    with torch.no_grad():
        mean = model.relu2(model.conv2(model.relu1(model.bn1(model.conv1(x))))).mean((2, 3))
    assert torch.equal(result["relu2", "channels"], mean.topk(3, 1).indices)
    torch.testing.assert_close(result["relu2", "mean"], mean.topk(3, 1).values)
    images = result["relu2", "images"]
    assert images.shape == (3, 3, 3, 16, 16) and images.dtype == torch.uint8
    assert len(calls) == 1  # the missing channels of all inputs optimized together, once
    needed = sorted(set(result["relu2", "channels"].flatten().tolist()))
    assert calls[0] == ",".join(map(str, needed))
    # a second input set and a new instance (a second run) reuse the cache: no optimization
    again = make(tmp_path, top=3).attribute(model, x, ["relu2"], PRED).maps
    assert len(calls) == 1 and torch.equal(again["relu2", "images"], images)
    # same channel, same picture, whichever input asked for it
    for n in range(3):
        for j, c in enumerate(result["relu2", "channels"][n].tolist()):
            first = (result["relu2", "channels"] == c).nonzero()[0]
            assert torch.equal(images[n, j], images[first[0], first[1]])


def test_other_settings_or_weights_get_their_own_cache(tmp_path):
    model = tiny_net()
    a = make(tmp_path)._cache(model, "relu2", 0)
    assert make(tmp_path)._cache(model, "relu2", 0) == a
    assert get_technique("top_activated")(cache_dir=str(tmp_path / "cache"), size=16, steps=5)._cache(model, "relu2", 0) != a
    assert make(tmp_path)._cache(tiny_net(seed=1), "relu2", 0) != a
    assert make(tmp_path)._cache(model, "relu1", 0) != a
    assert make(tmp_path)._cache(model, "relu2", 1) != a  # the seed picks the random starts


def test_the_weights_are_hashed_once_per_model_until_they_change(tmp_path, monkeypatch):
    model, technique = tiny_net(), make(tmp_path)
    hashed = []
    real_sha1 = top_activated.hashlib.sha1
    monkeypatch.setattr(top_activated.hashlib, "sha1", lambda *a: hashed.append(a) or real_sha1(*a))
    first = technique._cache(model, "relu2", 0)
    weight_hashes = sum(1 for a in hashed if not a)  # the weights' sha1 starts empty; the key's gets bytes
    for _ in range(3):  # later batches and layers: the key only
        assert technique._cache(model, "relu2", 0) == first
        technique._cache(model, "relu1", 0)
    assert sum(1 for a in hashed if not a) == weight_hashes == 1
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # changed in place: a new digest, a new folder
    assert technique._cache(model, "relu2", 0) != first
    assert make(tmp_path)._cache(model, "relu2", 0) == technique._cache(model, "relu2", 0)


def test_refuses_layers_without_feature_maps(tmp_path):
    with pytest.raises(ValueError, match="fc"):
        make(tmp_path).check_layers({"fc": (1, 10)})


def test_run_writes_rows_and_pngs(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=top_activated", "layers=[relu1,relu2]",
                                   f"technique.top_activated.cache_dir={tmp_path / 'cache'}",
                                   "technique.top_activated.size=16", "technique.top_activated.steps=3"))
    run(cfg, tmp_path / "run")
    with h5py.File(tmp_path / "run" / "maps.h5", "r") as f:
        assert f["top_activated/relu2/images"].shape == (7, 4, 3, 16, 16)
        assert f["top_activated/relu1/channels"].shape == (7, 4)
    assert len(list((tmp_path / "run" / "png" / "top_activated").glob("*.png"))) == 7
    assert len(list((tmp_path / "cache").rglob("*.png"))) >= 4
