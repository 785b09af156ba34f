"""Issue 10, faults and bad input: every key checked before work (7), reproduce's --trust-code (11b),
merge's --out naming a directory (11c). Each refusal is a ConfigError / exit code 2 with one
`error:` line, and nothing is written."""
import os
import pickle
import subprocess

import h5py
import pytest
import torch

from pipeline import merge as merge_module
from pipeline import reproduce as reproduce_module
from pipeline.config import SEED_MAX, ConfigError, colormap_names, validate
from pipeline.merge import MergeError, merge
from pipeline.reproduce import code_imports, recorded_config
from pipeline.runner import run
from pipeline.targets import TargetSpec
from tests.conftest import PYTHON, subprocess_env, tiny_overrides
from tests.tinymodels import tiny_net

FAST = ("technique=gradcam", "layers=[relu2]")  # one cheap technique, one layer


def refused(make_cfg, out, overrides, fragment):
    """run() raises ConfigError matching `fragment` and writes no maps.h5; returns the message."""
    with pytest.raises(ConfigError, match=fragment) as err:
        run(make_cfg(*overrides), out)
    assert not (out / "maps.h5").exists()
    assert "\n" not in str(err.value)  # one line
    return str(err.value)


# -- (7) every key checked before work ---------------------------------------------------------
ISSUE_CASES = [  # the bad values of issue 10 (7), as written
    ("render.colormap=nope", r"render\.colormap='nope'.*known: .*viridis"),
    ("render.tile=0", r"render\.tile=0.*32\.\.1024"),
    ("render.channels=-3", r"render\.channels=-3.*1\.\.64"),
    ("render.max_inputs=-1", r"render\.max_inputs=-1.*0 or more"),
    ("render.alpha=7", r"render\.alpha=7.*\[0, 1\]"),
    ("seed=-1", r"seed=-1.*0\.\.4294967295"),
    ("seed=4294967296", r"seed=4294967296.*0\.\.4294967295"),
    ("target=-1", r"target=-1.*0\.\.N-1.*negative indices are not classes"),
]


@pytest.mark.parametrize("override, fragment", ISSUE_CASES, ids=[c[0] for c in ISSUE_CASES])
def test_issue_keys_fail_before_work(make_cfg, image_folder, tiny_checkpoint, tmp_path, override, fragment):
    message = refused(make_cfg, tmp_path / "run", tiny_overrides(tiny_checkpoint, image_folder, *FAST, override),
                      fragment)
    assert "is not a class name" not in message


OTHER_CASES = [  # other keys whose bad values would fail only after work started
    ("render.tile=31", r"render\.tile=31"),
    ("render.tile=1025", r"render\.tile=1025"),
    ("render.channels=0", r"render\.channels=0"),
    ("render.channels=65", r"render\.channels=65.*sane size"),
    ("render.alpha=-0.1", r"render\.alpha=-0\.1"),
    ("render.alpha=nan", r"render\.alpha=nan"),
    ("render.frames=0", r"render\.frames=0"),
    ("render.gallery_columns=0", r"render\.gallery_columns=0"),
    ("target=-7", r"target=-7"),
    ("model.num_classes=0", r"model\.num_classes=0"),
    ("model.num_classes=-2", r"model\.num_classes=-2"),
    ("model.std=[nan,1,1]", r"model\.std=.*finite"),
    ("model.mean=[inf,0,0]", r"model\.mean=.*finite"),
    ("model.resize=4", r"model\.resize=4"),
]


@pytest.mark.parametrize("override, fragment", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_validate_ranges_of_other_keys(make_cfg, tiny_checkpoint, override, fragment):
    cfg = make_cfg("model=checkpoint", f"model.path={tiny_checkpoint}", "model.arch=tests.tinymodels:TinyNet",
                   override)  # model.input_size and model.resize null: the model's own
    with pytest.raises(ConfigError, match=fragment):
        validate(cfg)


@pytest.mark.parametrize("override", [
    "render.tile=32", "render.tile=1024", "render.channels=1", "render.channels=64", "render.alpha=0",
    "render.alpha=1", "render.max_inputs=0", "render.max_inputs=null", "render.colormap=VIRIDIS",
    "render.colormap=twilight_shifted", "seed=0", f"seed={SEED_MAX}", "target=0", "target=topk:2",
    "model.num_classes=1", "render.frames=1", "render.gallery_columns=1",
])
def test_validate_accepts_the_edges(make_cfg, override):
    validate(make_cfg(override))


def test_colormap_names_are_opencvs():
    names = colormap_names()
    assert {"jet", "viridis", "inferno", "turbo"} <= set(names) and "nope" not in names


def test_device_index_past_the_last_gpu(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    validate(make_cfg("device=cuda:1"))
    with pytest.raises(ConfigError, match=r"device='cuda:2'.*2 CUDA device\(s\): cuda:0\.\.cuda:1"):
        validate(make_cfg("device=cuda:2"))


def test_edge_values_run(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    """The largest seed and the smallest tile really run (numpy and torch both take the seed)."""
    summary = run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, "technique=[gradcam,activations]",
                                           "layers=[relu2]", f"seed={SEED_MAX}", "render.tile=32",
                                           "render.channels=64", "render.max_inputs=1", "data.limit=2")),
                  tmp_path / "run")
    assert summary.rows == 2 and summary.pngs == 2


def test_negative_target_index_is_not_a_class_name():
    names = ["cat", "dog", "-1 things"]
    with pytest.raises(ValueError, match=r"target=-1: a class index is 0\.\.2; negative indices are not classes"):
        TargetSpec.parse("-1", names)
    with pytest.raises(ValueError, match=r"0\.\.N-1"):
        TargetSpec.parse(" -3 ")
    assert TargetSpec.parse("+2", names) == TargetSpec("index", 2)
    with pytest.raises(ValueError, match=r"outside the model's 3 classes \(indices 0\.\.2\)"):
        TargetSpec.parse("3", names).check(3)


# -- (7) checkpoints that are not a state dict for model.arch ----------------------------------
def _torchscript(path):
    torch.jit.script(tiny_net()).save(str(path))


def _whole_module(path):
    torch.save(tiny_net(), path)  # a pickled nn.Module: weights_only refuses its class


def _code_pickle(path):  # unpickling this would call open(marker, "w"): it must never run
    class Evil:
        def __reduce__(self):
            return open, (str(path.parent / "unpickled.marker"), "w")
    path.write_bytes(pickle.dumps(Evil(), protocol=2))


def _random(path):
    path.write_bytes(bytes(range(256)) * 16)


def _empty(path):
    path.write_bytes(b"")


def _truncated(path):
    torch.save(tiny_net().state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])


def _tensor_list(path):
    torch.save([t for t in tiny_net().state_dict().values()], path)


def _no_tensors(path):
    torch.save({"epoch": 3, "model": {"fc.bias": 1.0}}, path)


@pytest.mark.parametrize("make, fragment", [
    (_torchscript, r"is a TorchScript archive, not a state dict.*drop model\.arch"),
    (_whole_module, r"holds Python objects other than tensors \(e\.g\. tests\.tinymodels\.TinyNet"),
    (_code_pickle, r"holds Python objects other than tensors \(e\.g\. (builtins|io)\.open"),
    (_random, r"cannot be read as a state dict with weights_only=True"),
    (_empty, r"is not a readable PyTorch checkpoint.*EOFError"),
    (_truncated, r"is not a readable PyTorch checkpoint.*RuntimeError"),
    (_tensor_list, r"holds a list, not a state dict"),
    (_no_tensors, r"holds a dict that is not a state dict \(keys: 'epoch', 'model'\)"),
], ids=["torchscript", "whole_module", "code_pickle", "random_bytes", "empty", "truncated", "tensor_list",
        "no_tensors"])
def test_unreadable_checkpoint_is_a_config_error(make_cfg, image_folder, tmp_path, make, fragment):
    bad = tmp_path / "bad.pt"
    make(bad)
    message = refused(make_cfg, tmp_path / "run", tiny_overrides(bad, image_folder, *FAST), fragment)
    assert f"model.path={str(bad)!r}" in message
    assert not (tmp_path / "unpickled.marker").exists()  # nothing but tensors was unpickled


@pytest.mark.parametrize("arch, fragment", [
    ("tests.tinymodels:Boom", r"calling Boom\(num_classes=10\) failed \(TypeError"),
    ("tests.tinymodels:tiny_net", None),  # a factory function is fine
    ("tests.conftest:subprocess_env", r"made a dict, not a torch\.nn\.Module"),
], ids=["class_without_num_classes", "factory_function", "not_a_module"])
def test_arch_factory_errors_are_config_errors(make_cfg, image_folder, tiny_checkpoint, tmp_path, arch, fragment):
    overrides = (*tiny_overrides(tiny_checkpoint, image_folder, *FAST, "render.png=false", "data.limit=1"),
                 f"model.arch={arch}")
    if arch.endswith("subprocess_env"):
        overrides += ("model.num_classes=null",)
    if fragment is None:
        assert run(make_cfg(*overrides), tmp_path / "run").rows == 1
    else:
        refused(make_cfg, tmp_path / "run", overrides, fragment)


# -- the CLI: exit code 2, one error: line, no traceback ----------------------------------------
@pytest.mark.parametrize("case", ["colormap", "torchscript_with_arch"])
def test_cli_prints_one_error_line(image_folder, tiny_checkpoint, torchscript_model, tmp_path, case):
    if case == "colormap":
        overrides = tiny_overrides(tiny_checkpoint, image_folder, *FAST, "render.colormap=nope")
        fragment = "render.colormap='nope'"
    else:
        overrides = tiny_overrides(torchscript_model, image_folder, *FAST)
        fragment = "is a TorchScript archive"
    run_dir = tmp_path / "run"
    result = subprocess.run([PYTHON, "-m", "pipeline", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "maps.h5").exists()


# -- (11b) reproduce imports no code from a received run file without --trust-code --------------
@pytest.fixture
def code_run(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    """A run whose recorded config names model.arch=tests.tinymodels:TinyNet."""
    original = tmp_path / "runs" / "run"
    run(make_cfg(*tiny_overrides(tiny_checkpoint, image_folder, *FAST, "render.png=false", "data.limit=2")),
        original)
    return original


def test_reproduce_refuses_a_recorded_import_without_trust_code(code_run, tmp_path, capsys):
    before = sorted(code_run.parent.iterdir())
    assert reproduce_module.main([str(code_run)]) == 2  # default --out: <run>.reproduce-<time>
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert ("model.arch='tests.tinymodels:TinyNet': import the Python module 'tests.tinymodels' and call its "
            "'TinyNet'") in lines[0] and "--trust-code" in lines[0]
    assert sorted(code_run.parent.iterdir()) == before  # no new run dir
    assert reproduce_module.main([str(code_run), "--out", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()

    assert reproduce_module.main([str(code_run), "--out", str(tmp_path / "again"), "--trust-code"]) == 0
    captured = capsys.readouterr()
    assert "--trust-code: model.arch='tests.tinymodels:TinyNet': import" in captured.err
    assert "DIFFERS" not in captured.out and (tmp_path / "again" / "maps.h5").exists()


def test_reproduce_names_a_tampered_import(code_run, tmp_path, capsys):
    with h5py.File(code_run / "maps.h5", "a") as f:
        f.attrs["config"] = f.attrs["config"].replace("tests.tinymodels:TinyNet", "os:system")
    assert reproduce_module.main([str(code_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "import the Python module 'os' and call its 'system'" in err and not (tmp_path / "x").exists()


def test_code_imports_only_for_checkpoint_arch_with_a_colon(code_run):
    cfg = recorded_config(code_run)
    assert len(code_imports(cfg)) == 1
    cfg.model.arch = "resnet18"  # a registry name: nothing imported
    assert code_imports(cfg) == []
    cfg.model.arch = "os:system"
    cfg.model.kind = "torchvision"  # arch is not used by other kinds
    assert code_imports(cfg) == []


# -- (11c) merge --out must name a file ------------------------------------------------------------
def test_merge_out_directory_is_an_error_before_reading_shards(tmp_path, capsys, monkeypatch):
    def no_reading(*args, **kwargs):
        raise AssertionError("a shard was read")

    monkeypatch.setattr(merge_module, "_open", no_reading)
    shards = [str(tmp_path / "shard0"), str(tmp_path / "shard1")]  # not even there: never looked at
    existing = tmp_path / "outdir"
    existing.mkdir()
    a_file = tmp_path / "file.h5"
    a_file.write_bytes(b"")
    cases = [
        ([str(existing)], "is a directory"),
        ([str(existing), "--force"], "is a directory"),
        ([str(tmp_path / "new") + os.sep], "is a directory"),
        ([str(a_file / "merged.h5")], "is a file, not a directory"),
    ]
    for out, fragment in cases:
        assert merge_module.main([*shards, "--out", *out]) == 2, out
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0] and "--out" in lines[0], err
    assert not (tmp_path / "new").exists() and list(existing.iterdir()) == []
    with pytest.raises(MergeError, match="is a directory"):
        merge(shards, existing, overwrite=True)
