"""precision=bf16|fp16 for the perturbation forwards, and pin_memory (pipeline/precision.py).

The tolerance README states (*Precision*) is checked here on the embedded model's real weights:
perturbation maps in fp16 keep r >= 0.999 against float32, in bf16 r >= 0.98; maps that take a
gradient are computed in float32 whatever the setting, to the bit."""
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.config import CONF_DIR, ConfigError
from pipeline.data import SAMPLES_DIR, prepare
from pipeline.models import build_model
from pipeline.precision import pin
from pipeline.targets import TargetSpec
from pipeline.techniques import Pass, get_technique

CASES = [("occlusion", {"window": 96, "stride": 64}, "input", "drop"),  # 3 x 3 windows: fp16 convolutions are slow on a CPU
         ("scorecam", {"top_channels": 12}, "bn2", "cam"),
         ("ablationcam", {"top_channels": 12}, "bn2", "cam"),
         ("gradcam", {}, "bn2", "cam"),
         ("saliency", {}, "input", "grad")]
FLOOR = {"fp16": 0.999, "bf16": 0.98}


@pytest.fixture(scope="module")
def embedded():
    import cv2

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config")
    loaded = build_model(cfg.model, "cpu")
    photos = sorted(SAMPLES_DIR.glob("*.jpg"))[:2]
    x = torch.stack([prepare(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), None, loaded.preprocess)[0]
                     for f in photos])
    return loaded.module, x


FULL = {}  # the float32 maps, computed once per case


def maps_at(model, x, name, options, layer, output, precision):
    if precision == "fp32" and name in FULL:
        return FULL[name]
    technique = get_technique(name)(**options)
    p = Pass(model, x, ["bn2"], TargetSpec.parse("pred"), needs=technique.needs, max_batch=16, precision=precision)
    maps = technique.attribute(model, x, ["bn2"], p.target, shared=p).maps[layer, output].float()
    if precision == "fp32":
        FULL[name] = maps
    return maps


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name,options,layer,output", CASES, ids=[c[0] for c in CASES])
def test_perturbation_maps_keep_the_stated_tolerance(embedded, precision, name, options, layer, output):
    model, x = embedded
    full = maps_at(model, x, name, options, layer, output, "fp32")
    low = maps_at(model, x, name, options, layer, output, precision)
    assert low.dtype == torch.float32 and low.shape == full.shape
    if name in ("gradcam", "saliency"):  # gradient passes stay in float32
        assert torch.equal(low, full)
        return
    assert not torch.equal(low, full)  # the forwards did run in the lower precision
    for n in range(x.shape[0]):
        r = np.corrcoef(full[n].flatten().numpy(), low[n].flatten().numpy())[0, 1]
        assert r >= FLOOR[precision], (name, precision, n, r)


def test_precision_is_validated_and_in_the_run_key(make_cfg, tmp_path):
    from pipeline.runner import run

    with pytest.raises(ConfigError, match="precision='fp64': expected fp32, bf16, fp16"):
        run(make_cfg("precision=fp64"), tmp_path / "bad")
    common = ["technique=occlusion", "technique.occlusion.window=112", "technique.occlusion.stride=112",
              "data.limit=1", "num_workers=0", "render.png=false"]
    run(make_cfg(*common, "precision=bf16"), tmp_path / "run")
    with pytest.raises(ConfigError, match="precision: bf16 -> fp32"):
        run(make_cfg(*common, "precision=fp32"), tmp_path / "run")  # another precision is another run


def test_pin_memory_is_refused_off_cuda_and_pins_batches(monkeypatch, image_folder, make_cfg):
    from pipeline.data import build_source
    from pipeline.data.loader import Loader
    from pipeline.preprocess import Preprocess

    assert pin(None, torch.device("cpu")) is False and pin(False, torch.device("cpu")) is False
    with pytest.raises(ConfigError, match="pin_memory=true needs a CUDA device"):
        pin(True, torch.device("cpu"))
    assert pin(None, torch.device("cuda")) is True  # null: on CUDA
    pinned = []

    def fake_pin(self):  # this machine has no CUDA: record the call, keep the strides
        pinned.append(self.stride())
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    source = build_source(make_cfg("data=folder", f"data.path={image_folder}").data)
    pre = Preprocess(16, 16, "area", (0.5,) * 3, (0.5,) * 3)
    for workers in (0, 2):
        pinned.clear()
        with Loader(source, source.items, None, pre, 2, workers, pin_memory=True) as loader:
            batches = [b for b in loader if b.x is not None]
        assert len(pinned) == len(batches) > 0
        assert all(s == batches[0].x.stride() for s in pinned)  # channels-last kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_batches_are_really_pinned_on_cuda(image_folder, make_cfg):
    from pipeline.data import build_source
    from pipeline.data.loader import Loader
    from pipeline.preprocess import Preprocess

    source = build_source(make_cfg("data=folder", f"data.path={image_folder}").data)
    with Loader(source, source.items, None, Preprocess(16, 16, "area", (0.5,) * 3, (0.5,) * 3), 2, 0,
                pin_memory=True) as loader:
        assert all(b.x.is_pinned() for b in loader if b.x is not None)
