"""A new user's first hour (issue 11): two commands, installs that are not editable, progress,
each line once, the app's help, a typo inside a list, a run dir that cannot be made."""
import re
import subprocess
import sys

import pytest

from pipeline.cli import group_override_errors, unwritable
from pipeline.runner import Summary, run
from tests.conftest import PYTHON, REPO, subprocess_env, tiny_overrides


def cli(*args, cwd, env=None, module="pipeline"):
    return subprocess.run([PYTHON, "-m", module, *args], cwd=cwd, env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=600)


# -- 1. two commands ------------------------------------------------------------------------------
def first_block(text: str) -> list:
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_two_commands_that_ci_runs():
    commands = first_block((REPO / "README.md").read_text())
    assert commands == ["pip install -e '.[dev]' && python -m pipeline", "pytest"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert commands[0] in ci and commands[1] in ci and ci.index(commands[0]) < ci.index(commands[1])


def test_browser_tests_skip_without_chromium_saying_why(tmp_path):
    env = subprocess_env()
    env["PIPELINE_TEST_CHROMIUM"] = "none"  # as on a machine without Chromium
    result = subprocess.run([PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_report.py"), "-k", "chromium"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"2 skipped", result.stdout) and "no chromium binary" in result.stdout
    assert "apt-get install -y chromium" in result.stdout


# -- 2. installs that are not editable ------------------------------------------------------------
def test_a_wheel_installed_elsewhere_runs_the_main_job_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("pipeline-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    shipped = {p.relative_to(site).as_posix() for p in (site / "pipeline").rglob("*") if p.is_file()}
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*.py")}
    configs = {"pipeline/" + p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert sources <= shipped and configs <= shipped  # every module and every config ships

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(subprocess_env(), PYTHONPATH=str(site))  # the wheel's copy, not the checkout's
    where = subprocess.run([PYTHON, "-c", "import pipeline.config as c; print(c.__file__); print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.splitlines() == [str(site / "pipeline" / "config.py"), str(site / "pipeline" / "conf")]
    result = cli("technique=gradcam", "data.limit=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done 2 inputs" in result.stdout and (tmp_path / "run" / "maps.h5").is_file()


# -- 4. progress you can see -----------------------------------------------------------------------
class RecordingBar:
    """Stands in for tqdm: records every position the bar is moved to."""

    bars: list = []

    def __init__(self, *args, total=0, desc="", **kwargs):
        self.total, self.desc, self.n, self.positions = total, desc, 0, []
        RecordingBar.bars.append(self)

    def update(self, n=1):
        self.n += n
        self.positions.append(self.n)

    def refresh(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.bars = []
    monkeypatch.setattr("pipeline.runner.tqdm", RecordingBar)
    return RecordingBar.bars


@pytest.mark.parametrize("technique", [
    ["technique=occlusion", "technique.occlusion.window=8", "technique.occlusion.stride=8", "max_batch=4"],
    ["technique=integrated_gradients", "technique.integrated_gradients.steps=8", "max_batch=4"],
    ["technique=scorecam", "layers=[relu2]", "max_batch=4"],
    ["technique=gradcam", "layers=[relu2]", "evaluate.deletion=true", "evaluate.steps=8", "max_batch=4"],
])
def test_slow_techniques_move_the_bar_within_a_batch(make_cfg, image_folder, tiny_checkpoint, tmp_path, bars,
                                                     technique):
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *technique, "batch_size=7")), tmp_path / "run")
    (bar,) = bars
    assert bar.total == 7 and bar.n == pytest.approx(7)
    inside = [x for x in bar.positions if 0 < x < 7 - 1e-6]  # one batch of 7: every position is within it
    assert len(inside) >= 3 and inside == sorted(inside)


def test_the_bar_ends_exactly_at_its_total_with_skipped_inputs(make_cfg, image_folder, tiny_checkpoint, tmp_path, bars):
    """Float steps within batches, whole batches and skipped inputs: the bar's count is the number
    of inputs, exactly (tqdm warns and clamps a count past its total)."""
    (image_folder / "broken.png").write_bytes(b"not an image")
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,occlusion,saliency]",
                                 "layers=[relu2]", "technique.occlusion.window=8", "technique.occlusion.stride=8",
                                 "batch_size=3", "max_batch=2")), tmp_path / "run")
    (bar,) = bars
    assert bar.total == 8 and bar.n == 8 and max(bar.positions) == 8
    assert all(p <= bar.total for p in bar.positions)


def test_closing_line_digits_and_what_was_generated(tmp_path):
    slow = Summary(tmp_path, 2, 2, 0, 162.0, 2 / 162.0, 0)
    assert "0.0123 images/s" in slow.line() and "162 s" in slow.line()
    only = Summary(tmp_path, 0, 0, 0, 0.0, float("nan"), 0, ["filter_vis (112 images of blocks.4) in 312 s"],
                   per_input=False)
    assert only.line() == f"done: generated filter_vis (112 images of blocks.4) in 312 s -> {tmp_path}"
    both = Summary(tmp_path, 4, 4, 0, 1.5, 4 / 1.5, 12, ["kernels (32 images of conv_stem) in 0.2 s"])
    assert "2.67 images/s; generated kernels (32 images of conv_stem) in 0.2 s" in both.line()


def test_data_free_run_says_what_it_generated(make_cfg, image_folder, tiny_checkpoint, tmp_path, bars):
    summary = run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=kernels", "layers=[conv1]")),
                  tmp_path / "run")
    assert summary.line().startswith("done: generated kernels (8 images of conv1) in ")
    assert [b.desc for b in bars] == ["kernels"]  # no images bar for a run with nothing to decode


# -- 5. each line once ----------------------------------------------------------------------------
def test_error_and_closing_lines_are_printed_once_and_logged(image_folder, tiny_checkpoint, tmp_path):
    bad = cli("data=folder", f"data.path={tmp_path / 'missing'}", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert (bad.stdout + bad.stderr).count("does not exist") == 1
    assert (tmp_path / "bad" / "__main__.log").read_text().count("does not exist") == 1
    good = cli(*tiny_overrides(tiny_checkpoint, image_folder, "technique=gradcam", "layers=[relu2]"),
               f"hydra.run.dir={tmp_path / 'good'}", cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    assert (good.stdout + good.stderr).count("done 7 inputs") == 1 and "done 7 inputs" in good.stdout
    assert (tmp_path / "good" / "__main__.log").read_text().count("done 7 inputs") == 1


# -- 7. Hydra manners ------------------------------------------------------------------------------
def test_help_is_the_apps_own(tmp_path):
    result = cli("--help", cwd=tmp_path)
    assert result.returncode == 0 and "powered by Hydra" not in result.stdout
    text = result.stdout
    assert text.startswith("pipeline: see what a convolutional network computes")
    groups = text.split("== Config groups ==")[1].split("==")[0]
    for group in ("model", "data", "technique"):
        options = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in groups  # every option, from conf/ (never stale)
    examples = text.split("== Examples ==")[1].split("==")[0]
    assert len([ln for ln in examples.splitlines() if ln.startswith("python -m pipeline")]) >= 5
    assert "schema/technique" not in text


def test_a_typo_inside_a_technique_list_names_the_known_ones(tmp_path):
    result = cli("technique=[saliency,gradcm]", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "'gradcm' is not a technique; closest: gradcam" in line and "known: ablationcam," in line
    assert group_override_errors(["technique=saliency,gradcm"])  # a sweep
    assert group_override_errors(["-m", "model=timm,torchvison", "technique.gradcam.relu=false"]) == [
        "model=timm,torchvison: 'torchvison' is not a model; closest: torchvision; known: checkpoint, "
        "efficientnet_lite0, timm, torchvision"]
    assert group_override_errors(["technique=[saliency,gradcam]", "layers=[a,b]", "hydra/launcher=submitit_local"]) == []


def test_a_run_dir_that_cannot_be_made_is_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = cli(f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "cannot be created" in line and "is a file, not a folder" in line
    sweep = cli("-m", "technique=gradcam,saliency", f"hydra.sweep.dir={tmp_path / 'a_file' / 'sweep'}", cwd=tmp_path)
    assert sweep.returncode == 2 and "hydra.sweep.dir=" in sweep.stderr and "Traceback" not in sweep.stderr


def test_a_read_only_folder_is_named(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        assert "is not writable (Read-only file system)" in unwritable(mount / "run")
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
    assert unwritable(tmp_path / "new" / "run") is None and not (tmp_path / "new").exists()

