"""3D CNNs on video clips: per-frame maps from every technique, clip sources, the run end to end."""
import h5py
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.contracts import Kind
from pipeline.data import VideoSource
from pipeline.runner import run
from pipeline.targets import TargetSpec
from pipeline.techniques import REGISTRY, get_technique
from tests.test_data import write_video
from tests.tinymodels import TinyNet3D

T, H, W = 4, 16, 16


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_technique_gives_per_frame_maps_shaped_like_the_clip(name):
    torch.manual_seed(0)
    model = TinyNet3D().eval()
    x = torch.rand(2, 3, T, H, W)
    technique = get_technique(name)()
    if not technique.uses_data:
        pytest.skip(f"{name} is data-free (generate(), no per-clip maps)")
    if technique.attention:  # a 3D CNN has no attention weights: refused before any work
        with pytest.raises(ValueError, match="attention"):
            technique.check_model(model, [])
        return
    if not technique.video:  # images only: refused before any work on a 3D model
        with pytest.raises(ValueError, match="clips|3D|5-D|video"):
            technique.check_layers({"relu1": (1, 4, T, H, W), "relu2": (1, 8, T, 8, 8)})
        return
    result = technique.attribute(model, x, ["relu1", "relu2"], TargetSpec.parse("topk:2"), max_batch=16)
    drawn = 0
    for (layer, output), m in result.maps.items():
        kind = technique.outputs[output].kind
        if kind is Kind.HEATMAP:
            assert tuple(m.shape) == (2, 2, T, H, W), (layer, output, tuple(m.shape))
            drawn += 1
        elif kind is Kind.GRADIENT:
            assert tuple(m.shape) == (2, 2, 3, T, H, W), (layer, output, tuple(m.shape))
            drawn += 1
        elif kind is Kind.CHANNELS:
            assert m.shape[:2] == (2, 8 if layer == "relu2" else 4) and m.dim() == 5
            drawn += 1
    assert drawn, f"{name} drew nothing on a 3D model"


def test_clip_source_ids_strides_and_past_the_end(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, 20)
    source = VideoSource(str(path), start=1, stop=40, clip_len=4, frame_stride=2, clip_stride=5)
    assert [it.frame for it in source.items] == [1, 6, 11]  # the clip at 11 ends at frame 17
    assert source.items[0].id == "clip.mp4@000001+4x2"
    (skip,) = source.skipped
    assert skip.frame == 16 and "past the end" in skip.reason
    clip = source.read(source.items[1])
    assert clip.shape == (4, 48, 64, 3)
    assert [round(float(f[..., 1].mean()) / 10) for f in clip] == [6, 8, 10, 12]  # frames 6, 8, 10, 12


def clip_overrides(checkpoint, video, *extra):
    return ("model=checkpoint", f"model.path={checkpoint}", "model.arch=tests.tinymodels:TinyNet3D",
            "model.num_classes=5", "model.input_size=16", "model.resize=16", "data=video",
            f"data.path={video}", "num_workers=0", "batch_size=2", *extra)


def test_run_on_clips_end_to_end(make_cfg, tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, 24)
    torch.manual_seed(0)
    torch.save(TinyNet3D().state_dict(), tmp_path / "net3d.pt")
    cfg = make_cfg(*clip_overrides(tmp_path / "net3d.pt", video, "data.clip_len=4", "data.clip_stride=6",
                                   "data.stop=30", "technique=[activations,saliency,gradcam]",
                                   "layers=[relu1,relu2]", "render.frames=3"))
    summary = run(cfg, tmp_path / "run")
    assert (summary.done, summary.skipped) == (4, 1)  # clips at 0, 6, 12, 18; 24 runs past the end
    with h5py.File(tmp_path / "run" / "maps.h5", "r") as f:
        assert f["frame"][:].tolist() == [0, 6, 12, 18]
        assert f["gradcam/relu2/cam"].shape == (4, 1, 4, 16, 16)
        assert f["saliency/input/maxabs"].shape == (4, 1, 4, 16, 16)
    assert len(list((tmp_path / "run" / "png").rglob("*.png"))) == 12


def test_3d_model_without_clips_and_clips_without_3d_model_fail_early(make_cfg, tmp_path, tiny_checkpoint):
    video = tmp_path / "clip.mp4"
    write_video(video, 8)
    torch.save(TinyNet3D().state_dict(), tmp_path / "net3d.pt")
    with pytest.raises(ConfigError, match="clip_len"):
        run(make_cfg(*clip_overrides(tmp_path / "net3d.pt", video)), tmp_path / "a")
    overrides = [o for o in clip_overrides(tiny_checkpoint, video, "data.clip_len=4") if "TinyNet3D" not in o
                 and "num_classes" not in o] + ["model.arch=tests.tinymodels:TinyNet", "model.num_classes=10"]
    with pytest.raises(ConfigError, match="not a 3D"):
        run(make_cfg(*overrides), tmp_path / "b")


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_models_take_their_own_preprocessing_and_give_per_frame_cams(make_cfg, name):
    from pipeline.models import build_model, last_conv_block, probe_shapes

    loaded = build_model(make_cfg("model=torchvision", f"model.name={name}", "model.weights=null").model, clip_len=8)
    assert loaded.is_video and loaded.example().shape == (1, 3, 8, 112, 112)
    assert loaded.preprocess.resize == 128 and loaded.preprocess.mean[0] == pytest.approx(0.43216)
    assert loaded.num_classes == 400
    layer = last_conv_block(loaded.module, probe_shapes(loaded.module, loaded.example()))
    assert layer == "layer4"
    cam = get_technique("gradcam")().attribute(loaded.module, torch.rand(1, 3, 8, 112, 112), [layer],
                                               TargetSpec.parse("pred")).maps[layer, "cam"]
    assert cam.shape == (1, 1, 8, 112, 112)


def test_a_clip_too_short_for_the_model_is_a_config_error(make_cfg):
    from pipeline.models import build_model

    with pytest.raises(ConfigError, match="clip_len"):
        build_model(make_cfg("model=torchvision", "model.name=s3d", "model.weights=null").model, clip_len=8)
