"""python -m pipeline.leaderboard and the report's Leaderboard section: means, 95% Student t
intervals, best marks, NaN handling, CSV, errors — on synthetic maps.h5 files with hand-chosen
metric values and on a fake Hydra sweep of real tiny runs."""
import csv
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import leaderboard as lb
from pipeline import report
from pipeline.runner import run
from pipeline.store import MapsFile, open_run
from tests.conftest import PYTHON, subprocess_env, tiny_overrides
from tests.test_report import Parsed, browser_session, needs_chromium

# t_{0.975, df}: two-sided 95% critical values (printed tables, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836, 6: 2.446911851,
        9: 2.262157163, 10: 2.228138852, 30: 2.042272456, 100: 1.983971519, 1000: 1.962339081,
        5000: 1.960438}


def write_run(run_dir: Path, columns: dict, overrides=None) -> Path:
    """A maps.h5 with rows `id` and the given per-row columns; `.hydra/overrides.yaml` when given."""
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    f = MapsFile(run_dir / "maps.h5", {"test": str(run_dir)})
    f.append({"id": np.array([f"img{i}" for i in range(n)], dtype=object),
              **{k: np.asarray(v, dtype=np.float32) for k, v in columns.items()}})
    f.close()
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return run_dir


def write_multirun(sweep: Path, task) -> None:
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": list(task)}}}))


def hand_ci(values):
    """(mean, low, high, n) of the finite values, from the t table above."""
    v = [float(x) for x in values if not math.isnan(x)]
    n = len(v)
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


# gradcam: deletion_auc per input over 2 targets; input 2 has one NaN target, input 3 two (left out)
GC_DEL = [[0.2, 0.4], [0.1, 0.3], [0.5, math.nan], [math.nan, math.nan], [0.3, 0.3]]
SA_DEL = [[0.6, 0.4], [0.7, 0.5], [0.2, 0.4], [0.9, 0.7], [0.5, 0.5]]
GC_INS = [[0.9, 0.7], [0.8, 0.8], [0.6, 0.6], [0.7, 0.5], [0.9, 0.9]]
SA_INS = [[0.4, 0.2], [0.5, 0.5], [0.3, 0.3], [0.6, 0.4], [0.1, 0.3]]


def fake_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun"
    write_multirun(sweep, ["technique=gradcam,saliency", "evaluate.deletion=true"])
    curve = np.linspace(1, 0, 4)[None, None, :] * np.ones((5, 2, 1))
    sanity = np.array([0.9, 0.5, 0.1])[None, None, :] * np.ones((5, 2, 1))
    write_run(sweep / "0", {"gradcam/l1/cam.deletion_auc": GC_DEL, "gradcam/l1/cam.insertion_auc": GC_INS,
                            "gradcam/l1/cam.deletion": curve, "gradcam/l1/cam.sanity": sanity,
                            "gradcam/l1/cam.mystery": np.ones((5, 2)), "gradcam/l1/cam": np.zeros((5, 2, 3, 3))},
              ["technique=gradcam", "evaluate.deletion=true"])
    write_run(sweep / "1", {"saliency/l1/grad.deletion_auc": SA_DEL, "saliency/l1/grad.insertion_auc": SA_INS,
                            "saliency/l1/grad.deletion": curve * 0.5,
                            "saliency/l1/grad.road_lerf": np.ones((5, 2, 9))},  # a curve without its _auc
              ["technique=saliency", "evaluate.deletion=true"])
    return sweep


# -- statistics ------------------------------------------------------------------------------------
def test_t_quantile_matches_the_printed_table():
    for df, t in T975.items():
        assert lb.t_quantile(df) == pytest.approx(t, abs=1e-6), df
    assert lb.t_quantile(4, 0.9) == pytest.approx(2.131846786, abs=1e-6)
    with pytest.raises(ValueError):
        lb.t_quantile(0)


def test_t_quantile_agrees_with_scipy():
    from scipy import stats  # a dev dependency (the pipeline's own quantile needs no scipy)

    for df in (1, 2, 7, 8, 51, 250, 999, 1001, 20000):
        assert lb.t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9), df


def test_summarize_and_per_input_by_hand():
    rows = lb.per_input(np.array(GC_DEL), "deletion_auc")
    assert rows[:3].tolist() == pytest.approx([0.3, 0.2, 0.5]) and math.isnan(rows[3]) and rows[4] == pytest.approx(0.3)
    cell = lb.summarize(rows)
    mean, low, high, n = hand_ci([0.3, 0.2, 0.5, 0.3])
    assert (cell.mean, cell.ci_low, cell.ci_high) == pytest.approx((mean, low, high), rel=1e-9) and cell.n == n == 4
    one = lb.summarize(np.array([0.7, np.nan]))
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert lb.summarize(np.array([np.nan])) is None
    steps = lb.per_input(np.array([[[1.0, 0.0, 0.5], [np.nan, 1.0, 1.0]]]), "sanity")  # mean over steps first
    assert steps.tolist() == pytest.approx([(0.5 + 1.0) / 2])  # not 3.5 / 5


# -- the table -------------------------------------------------------------------------------------
def test_board_means_cis_best_and_nan(tmp_path):
    board = lb.build_board(lb.find_run_dirs([fake_sweep(tmp_path)]))
    assert board.metrics == ["deletion_auc", "insertion_auc", "sanity", "mystery"]  # curves are not columns
    assert [(e.technique, e.layer, e.output, e.tag) for e in board.entries] == [
        ("gradcam", "l1", "cam", ""), ("saliency", "l1", "grad", "")]  # one run each: no tag
    gc, sa = board.entries
    for entry, data, metric in ((gc, GC_DEL, "deletion_auc"), (sa, SA_DEL, "deletion_auc"),
                                (gc, GC_INS, "insertion_auc"), (sa, SA_INS, "insertion_auc")):
        rows = [np.nanmean(r) if not all(math.isnan(x) for x in r) else math.nan for r in data]
        c = entry.cells[metric]
        assert (c.mean, c.ci_low, c.ci_high, c.n) == pytest.approx(hand_ci(rows), rel=1e-6), (entry.technique, metric)
    assert gc.cells["deletion_auc"].n == 4 and sa.cells["deletion_auc"].n == 5
    # deletion: lower is better (gradcam 0.325 < saliency 0.54); insertion: higher (gradcam)
    assert gc.cells["deletion_auc"].best and not sa.cells["deletion_auc"].best
    assert gc.cells["insertion_auc"].best and not sa.cells["insertion_auc"].best
    assert gc.cells["sanity"].mean == pytest.approx(0.5) and gc.cells["sanity"].best  # the only one: best
    assert not gc.cells["mystery"].best and "mystery" not in lb.DIRECTIONS  # direction unknown: no mark
    assert "deletion" in gc.curves and "road_lerf" in sa.curves and "deletion" not in gc.cells
    x, y = sa.curves["deletion"]
    assert x.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1]) and y.tolist() == pytest.approx([0.5, 1 / 3, 1 / 6, 0])
    assert sa.curves["road_lerf"][0].tolist() == pytest.approx([p / 100 for p in range(10, 100, 10)])


def test_every_contract_metric_has_a_direction():
    lower = {"deletion_auc", "road_morf_auc", "avg_drop", "sanity"}
    higher = {"insertion_auc", "road_lerf_auc", "road_combined", "increase", "pointing", "energy_pointing", "gini"}
    assert {m for m, d in lb.DIRECTIONS.items() if d == "lower"} == lower
    assert {m for m, d in lb.DIRECTIONS.items() if d == "higher"} == higher


def test_same_method_in_several_runs_is_tagged_with_its_distinguishing_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    write_multirun(sweep, ["seed=0,1", "technique=gradcam"])
    for job, values in enumerate(([[0.5], [0.7]], [[0.2], [0.4]])):
        write_run(sweep / str(job), {"gradcam/l1/cam.gini": values}, [f"seed={job}", "technique=gradcam"])
    other = write_run(tmp_path / "other", {"gradcam/l1/cam.gini": [[0.1], [0.1]]})  # no overrides recorded
    board = lb.build_board(lb.find_run_dirs([sweep]))
    assert [e.method for e in board.entries] == ["gradcam [seed=0]", "gradcam [seed=1]"]
    assert [e.cells["gini"].best for e in board.entries] == [True, False]  # gini: higher is better
    board = lb.build_board(lb.find_run_dirs([sweep, other]))  # several dirs: run names tell them apart
    assert [e.tag for e in board.entries] == ["sweep/0", "sweep/1", "other"]


def test_csv_text_and_metrics_option(tmp_path, capsys):
    sweep = fake_sweep(tmp_path)
    out = tmp_path / "board.csv"
    assert lb.main([str(sweep), "--csv", str(out), "--metrics", "insertion_auc,deletion_auc"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == list(lb.CSV_FIELDS)
    assert [(r["method"], r["metric"], r["best"]) for r in rows] == [
        ("gradcam", "insertion_auc", "1"), ("gradcam", "deletion_auc", "1"),
        ("saliency", "insertion_auc", "0"), ("saliency", "deletion_auc", "0")]
    mean, low, high, n = hand_ci([0.5, 0.6, 0.3, 0.8, 0.5])
    sa = rows[3]
    assert (sa["layer"], sa["output"], int(sa["n"])) == ("l1", "grad", n)
    assert (float(sa["mean"]), float(sa["ci_low"]), float(sa["ci_high"])) == pytest.approx((mean, low, high), rel=1e-6)

    assert lb.main([str(sweep)]) == 0
    text = capsys.readouterr().out
    head = text.splitlines()[0]
    assert "deletion_auc (lower is better)" in head and "insertion_auc (higher is better)" in head
    assert "mystery" in head and "mystery (" not in head
    line = next(x for x in text.splitlines() if x.startswith("saliency"))
    assert f"{mean:.4g} \u00b1 {(high - low) / 2:.4g} n=5" in line
    assert text.count(" *") == 3 + 1  # best of deletion_auc, insertion_auc, sanity (alone); the legend

    assert lb.main([str(sweep), "--metrics", "gini"]) == 2
    assert "gini" in capsys.readouterr().err


def test_errors_for_no_runs_and_no_metrics(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert lb.main([str(tmp_path / "empty")]) == 2
    assert "has no runs" in capsys.readouterr().err
    write_run(tmp_path / "plain" / "0", {"gradcam/l1/cam": np.zeros((2, 1, 3, 3))}, ["technique=gradcam"])
    assert lb.main([str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no metric columns") and "evaluate.deletion=true" in err
    assert "evaluate keys: deletion, insertion" in err and "sanity" in err
    assert lb.main([str(tmp_path / "missing")]) == 2 and "not a directory" in capsys.readouterr().err
    result = subprocess.run([PYTHON, "-m", "pipeline.leaderboard", str(tmp_path / "plain")], env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and result.stderr == err


# -- the report ------------------------------------------------------------------------------------
def test_report_has_the_leaderboard_table_and_charts(tmp_path):
    sweep = fake_sweep(tmp_path)
    text = report.write_report(sweep).read_text()
    page = Parsed(text)
    assert "leaderboard" in page.ids
    head = ["method", "layer", "output", "deletion_auc (lower is better)", "insertion_auc (higher is better)",
            "sanity (lower is better)", "mystery"]
    assert head in page.tables and page.tables[0][0] == "run"  # the runs' table stays first
    section = text[text.index('<section id="leaderboard">'):text.index("</section>", text.index('id="leaderboard"'))]
    mean, low, high, _ = hand_ci([0.3, 0.2, 0.5, 0.3])
    assert f'class="num best" title="95% interval [{report.fmt(low)}, {report.fmt(high)}]">{report.fmt(mean)} \u00b1' in section
    assert section.count('class="num best"') == 3 and section.count("<svg") == 4 + 2  # 4 metrics, 2 curves
    assert 'aria-label="mean deletion curve per method"' in section and "mean road_lerf curve" in section
    assert section.count('class="bar best"') == 3 and section.count("<polyline") == 3


def test_report_without_metrics_has_no_leaderboard(tmp_path):
    write_run(tmp_path / "run", {"gradcam/l1/cam": np.zeros((2, 1, 3, 3))})
    assert 'id="leaderboard"' not in report.write_report(tmp_path / "run").read_text()


# -- real tiny runs in a fake Hydra sweep ------------------------------------------------------------
@pytest.fixture
def tiny_sweep(make_cfg, image_folder, tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    write_multirun(sweep, ["technique=gradcam,saliency", "evaluate.deletion=true", "evaluate.insertion=true"])
    for job, technique in enumerate(("gradcam", "saliency")):
        overrides = list(tiny_overrides(tiny_checkpoint, image_folder, "layers=[relu2]", f"technique={technique}",
                                        "evaluate.deletion=true", "evaluate.insertion=true", "evaluate.steps=4",
                                        "render.max_inputs=1"))
        run(make_cfg(*overrides), sweep / str(job))
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return sweep


def test_real_runs_table_matches_the_stored_metrics(tiny_sweep, tmp_path):
    board = lb.build_board(lb.find_run_dirs([tiny_sweep]))
    assert board.metrics == ["deletion_auc", "insertion_auc"]
    assert [e.technique for e in board.entries] == ["gradcam", "saliency"]
    for entry, job in zip(board.entries, (0, 1)):
        with open_run(tiny_sweep / str(job)) as f:
            (key, col), = [(k, c) for k, c in f.metrics().items() if k[3] == "deletion_auc"]
            values = col[:].astype(np.float64).mean(axis=1)
        assert (entry.technique, entry.layer, entry.output) == key[:3]
        assert (entry.cells["deletion_auc"].mean, entry.cells["deletion_auc"].ci_low) == pytest.approx(
            hand_ci(values)[:2], rel=1e-5)
        assert set(entry.curves) == {"deletion", "insertion"} and len(entry.curves["deletion"][1]) == 5
    best = min(board.entries, key=lambda e: e.cells["deletion_auc"].mean)
    assert [e.cells["deletion_auc"].best for e in board.entries] == [e is best for e in board.entries]
    assert lb.main([str(tiny_sweep), "--csv", str(tmp_path / "b.csv")]) == 0
    assert len(list(csv.DictReader((tmp_path / "b.csv").open()))) == 4


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    yield from browser_session(tmp_path_factory)


@needs_chromium
def test_leaderboard_section_renders_in_chromium(browser, tiny_sweep):
    path = report.write_report(tiny_sweep)
    seen = browser.open(path)
    assert seen["errors"] == [] and seen["broken"] == []
    sizes = browser.evaluate("Array.from(document.querySelectorAll('#leaderboard svg')).map(s => "
                             "{ const r = s.getBoundingClientRect(); return [r.width, r.height]; })")
    assert len(sizes) == 2 + 2 and all(w > 100 and h > 50 for w, h in sizes)
    bars = browser.evaluate("Array.from(document.querySelectorAll('#leaderboard rect.bar')).map(r => "
                            "r.getBoundingClientRect().width)")
    assert len(bars) == 4 and all(w > 0 for w in bars)
    assert browser.evaluate("document.querySelectorAll('#leaderboard td.best').length") == 2
