"""End to end: run(cfg) in process, and the Hydra app as a real subprocess."""
import subprocess

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.layers import layer_table
from pipeline.io.render import png_name
from pipeline.runner import run
from tests.conftest import PYTHON, read_h5, subprocess_env, tiny_overrides
from tests.test_data import write_video

LAYERS = "layers=[relu1,relu2]"


def ids(data):
    return [s.decode() for s in data["id"]]


def test_run_writes_rows_pngs_and_skips(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    (image_folder / "corrupt.png").write_bytes(b"not an image at all")
    cfg = make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, LAYERS, "target=topk:2"))
    out = tmp_path / "run"
    summary = run(cfg, out)
    assert (summary.done, summary.rows, summary.skipped) == (7, 7, 1)
    data, attrs = read_h5(out / "maps.h5")
    assert ids(data) == sorted(ids(data)) and "sub/deep001.png" in ids(data)
    assert data["frame"].tolist() == [-1] * 7
    assert data["target"].shape == (7, 2) and data["score"].shape == (7, 2)
    assert np.all(np.diff(data["score"], axis=1) <= 0)  # top-2 in order
    assert data["activations/relu2/maps"].shape == (7, 16, 16, 16)
    assert data["activations/relu1/topk"].shape == (7, 8)
    assert data["saliency/input/grad"].shape == (7, 2, 3, 32, 32)
    assert data["gradcam/relu1/cam"].shape == (7, 2, 32, 32)
    assert data["gradcam/relu2/cam"].shape == (7, 2, 16, 16)
    assert [s.decode() for s in data["skipped/id"]] == ["corrupt.png"]
    assert "decode" in data["skipped/reason"][0].decode()
    assert "relu1" in attrs["config"] and attrs["rows"] == 7
    pngs = sorted(p.relative_to(out).as_posix() for p in (out / "png").rglob("*.png"))
    names = [s.decode() for s in data["png"]]  # each row's PNG name, the same in every technique folder
    assert names == [png_name(i) for i in ids(data)] and "img000.png.png" in names
    assert sorted(pngs) == sorted(f"png/{t}/{n}" for t in ("activations", "saliency", "gradcam") for n in names)

    again = run(cfg, out)  # same dir: everything is already there
    assert (again.done, again.rows, again.skipped) == (0, 7, 0)
    assert ids(read_h5(out / "maps.h5")[0]) == ids(data)


def test_render_switches(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    base = tiny_overrides(tiny_checkpoint, image_folder, LAYERS, "technique=gradcam")
    run(make_cfg(*base, "render.max_inputs=2"), tmp_path / "a")
    assert len(list((tmp_path / "a" / "png").rglob("*.png"))) == 2
    run(make_cfg(*base, "render.png=false"), tmp_path / "b")
    assert not (tmp_path / "b" / "png").exists()


def test_bad_inputs_fail_before_any_work(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    cases = {
        "unknown layer": (tiny_overrides(tiny_checkpoint, image_folder, "layers=[relu3]"), "relu1"),
        "missing folder": (tiny_overrides(tiny_checkpoint, tmp_path / "nope"), "does not exist"),
        "gradcam on a vector": (tiny_overrides(tiny_checkpoint, image_folder, "layers=[fc]", "technique=gradcam"), "fc"),
        "target outside": (tiny_overrides(tiny_checkpoint, image_folder, "target=10"), "outside"),
        "cuda without cuda": (tiny_overrides(tiny_checkpoint, image_folder, "device=cuda"), "CUDA"),
    }
    for name, (overrides, fragment) in cases.items():
        if name == "cuda without cuda" and torch.cuda.is_available():
            continue
        out = tmp_path / name.replace(" ", "_")
        with pytest.raises(ConfigError, match=fragment):
            run(make_cfg(*overrides), out)
        assert not (out / "maps.h5").exists(), name


def test_resume_refuses_a_different_config(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "layers=[relu1]", "technique=gradcam")), tmp_path)
    with pytest.raises(ConfigError, match=r"other settings.*layers: \[\"relu1\"\] -> \[\"relu2\"\]"):
        run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "layers=[relu2]", "technique=gradcam")), tmp_path)


def test_video_frames_run_and_past_the_end_is_skipped(make_cfg, tiny_checkpoint, tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, 10)
    overrides = [o for o in tiny_overrides(tiny_checkpoint, tmp_path) if not o.startswith("data")]
    cfg = make_cfg(*overrides, "data=video", f"data.path={video}", "data.start=2", "data.stop=16",
                   "data.step=3", "num_workers=2", "technique=[activations,gradcam]", LAYERS)
    summary = run(cfg, tmp_path / "run")
    assert (summary.done, summary.skipped) == (3, 1)
    data, _ = read_h5(tmp_path / "run" / "maps.h5")
    assert data["frame"].tolist() == [2, 5, 8]
    assert ids(data) == ["clip.mp4@000002", "clip.mp4@000005", "clip.mp4@000008"]
    assert "past the end" in data["skipped/reason"][0].decode() and data["skipped/frame"].tolist() == [11]
    assert len(list((tmp_path / "run" / "png").rglob("*.png"))) == 6


def test_torchscript_runs_input_space_techniques_and_refuses_layers(make_cfg, image_folder, torchscript_model, tmp_path):
    base = ["model=checkpoint", f"model.path={torchscript_model}", "model.input_size=32", "model.resize=32",
            "data=folder", f"data.path={image_folder}", "num_workers=0"]
    summary = run(make_cfg(*base, "technique=saliency"), tmp_path / "a")
    assert summary.rows == 7
    with pytest.raises(ConfigError, match="TorchScript"):
        run(make_cfg(*base, "technique=gradcam"), tmp_path / "b")


def test_layers_listing(make_cfg, tiny_checkpoint):
    table = layer_table(make_cfg(*tiny_overrides(tiny_checkpoint, "unused")[:6]))
    assert "conv2" in table and "[1, 16, 16, 16]" in table and "default layers: ['boom']" in table


# -- the Hydra app as a real process -------------------------------------------------------------
def app(*args, cwd, timeout=300, **kwargs):
    return subprocess.run([PYTHON, "-m", "pipeline", *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_app_default_job_on_the_embedded_model(tmp_path):
    """The README's main job: embedded EfficientNet-Lite0 on the bundled samples."""
    result = app(f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done 4 inputs" in result.stdout and "images/s" in result.stdout
    data, attrs = read_h5(tmp_path / "run" / "maps.h5")
    assert ids(data) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert 281 <= int(data["target"][1, 0]) <= 285  # chelsea: a cat class
    assert data["classes"][int(data["target"][2, 0])].decode() == "espresso"
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    assert len(list((tmp_path / "run" / "png").rglob("*.png"))) == 12
    assert "efficientnet_lite0" in attrs["config"]


def test_app_bad_config_exits_nonzero_with_message(tmp_path):
    result = app("data=folder", f"data.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert not (tmp_path / "run" / "maps.h5").exists()
    result = app("model.nmae=x", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0 and "nmae" in result.stderr


def test_multirun_sweep_writes_one_dir_per_job(image_folder, tiny_checkpoint, tmp_path):
    result = app("-m", *tiny_overrides(tiny_checkpoint, image_folder), "technique=saliency,gradcam",
                 "layers=[relu1],[relu2]", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in range(4):
        data, attrs = read_h5(tmp_path / "sweep" / str(job) / "maps.h5")
        assert len(data["id"]) == 7
    names = [set(read_h5(tmp_path / "sweep" / str(j) / "maps.h5")[0]) for j in range(4)]
    assert "saliency/input/grad" in names[0] and "gradcam/relu2/cam" in names[3]


