"""python -m pipeline.report: the HTML page of a run and of a sweep, read as text, and loaded in
headless Chromium over the DevTools protocol (skipped only where no chromium binary is found)."""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import cv2
import h5py
import numpy as np
import pytest
import yaml

from pipeline import report
from pipeline.runner import run
from tests.conftest import PYTHON, subprocess_env, tiny_overrides


class Parsed(HTMLParser):
    """Tags of interest in a page: img/a attributes, element ids, table headers, and the text."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.links, self.ids, self.tables, self.sections = [], [], set(), [], {}
        self._th, self._section, self._text = None, None, []
        self.feed(text)
        self.text = "".join(self._text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.imgs.append(attrs)
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "th":
            self._th = []
        elif tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []

    def handle_endtag(self, tag):
        if tag == "th":
            self.tables[-1].append("".join(self._th))
            self._th = None

    def handle_data(self, data):
        self._text.append(data)
        if self._th is not None:
            self._th.append(data)
        if self._section is not None:
            self.sections[self._section].append(data)


def assert_images_exist(page: Parsed, html_path: Path) -> list:
    """Every img src is a relative path to an existing PNG beside the page; returns the files."""
    files = []
    for img in page.imgs:
        src = img["src"]
        assert not re.match(r"^[a-z]+:|^/", src), src  # relative, no scheme
        path = (html_path.parent / unquote(src)).resolve()
        assert path.is_file() and path.suffix == ".png", src
        assert img["loading"] == "eager" and img["alt"]
        files.append(path)
    return files


def make_run(make_cfg, image_folder, tiny_checkpoint, out: Path, technique="[activations,gradcam]",
             deletion=True) -> list:
    """A tiny run with one corrupt input (a skipped record), deletion plots (run-level PNGs) and
    the .hydra/overrides.yaml Hydra would write; returns the overrides."""
    (image_folder / "corrupt.png").write_bytes(b"not an image at all")
    overrides = list(tiny_overrides(tiny_checkpoint, image_folder, "layers=[relu1,relu2]", f"technique={technique}",
                                    f"evaluate.deletion={str(deletion).lower()}", "evaluate.steps=4"))
    run(make_cfg(*overrides), out)
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return overrides


# -- the page as text -----------------------------------------------------------------------------
def test_run_report_shows_provenance_skips_stats_and_images(make_cfg, image_folder, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = make_run(make_cfg, image_folder, tiny_checkpoint, out)
    assert report.main([str(out), "--max-images", "3"]) == 0
    html_path = out / "report.html"
    assert capsys.readouterr().out.strip() == str(html_path)
    text = html_path.read_text()
    page = Parsed(text)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing external
    assert "<style>" in text and '<p id="image-status">' in text and "<script>" in text

    with h5py.File(out / "maps.h5", "r") as f:
        attrs = dict(f.attrs)
        rows = int(attrs["rows"])
        cam = f["gradcam/relu2/cam"][:rows].astype(np.float64)
        reason = f["skipped/reason"][0].decode()
    for o in overrides:
        assert o in page.text
    assert attrs["git_commit"] in page.text
    assert ("dirty (uncommitted changes)" in page.text) == bool(attrs["git_dirty"])
    assert ("clean" in page.text) == (not attrs["git_dirty"])
    versions = json.loads(attrs["versions"])
    assert f"torch{versions['torch']}" in page.text.replace("\n", "") and "h5py" in page.text
    assert attrs["device"] in page.text and attrs["host"] in page.text and attrs["command"] in page.text
    assert "resolved config" in page.text.lower() and "relu2" in page.text and "<details>" in text
    assert "corrupt.png" in page.text and "decode" in reason and reason in page.text
    assert "finished" in page.text  # the attempt's status
    # statistics: the exact values, and only map datasets (not ids, targets, topk indices)
    for value in (cam.mean(), cam.std(), cam.min(), cam.max()):
        assert report.fmt(value) in page.text
    assert "gradcam/relu2/cam" in page.text and "activations/relu1/maps" in page.text
    assert "activations/relu1/topk" not in page.text and "receptive_fields" not in page.text

    files = assert_images_exist(page, html_path)
    rel = [f.relative_to(out).as_posix() for f in files]
    assert rel[0].startswith("plots/") and "plots/deletion.png" in rel  # run-level images first
    per_input = [r for r in rel if r.startswith("png/gradcam/")]
    assert len(per_input) == 3 and rows == 7 and "4 more not shown" in page.text
    assert len([r for r in rel if r.startswith("png/activations/")]) == 3
    assert len(re.findall(r"<figure>.*?<figcaption>.+?</figcaption></figure>", text)) == len(files)

    elsewhere = tmp_path / "elsewhere" / "page.html"  # --out elsewhere: paths relative to it
    assert report.main([str(out), "--out", str(elsewhere)]) == 0
    moved = Parsed(elsewhere.read_text())
    assert len(assert_images_exist(moved, elsewhere)) == 1 + 2 * 7
    assert all(img["src"].startswith("../run/") for img in moved.imgs)


def test_escaping_and_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "not a directory" in err and "no maps.h5" in err
    assert not (tmp_path / "empty" / "report.html").exists()

    bad = tmp_path / "bad run"
    bad.mkdir()
    (bad / "maps.h5").write_bytes(b"not hdf5")
    assert report.main([str(bad)]) == 2 and "cannot read" in capsys.readouterr().err

    odd = tmp_path / "odd run"  # text from the file is escaped; paths with spaces are URL-encoded
    (odd / "png" / "gradcam").mkdir(parents=True)
    with h5py.File(odd / "maps.h5", "w") as f:
        f.attrs.update(rows=0, command="python -m pipeline 'target=<b>cat</b>'", config="a: <script>")
    cv2.imwrite(str(odd / "png" / "gradcam" / "a b#1.png"), np.zeros((4, 4, 3), np.uint8))
    path = report.write_report(odd)
    text = path.read_text()
    assert "<b>cat</b>" not in text and "&lt;b&gt;cat&lt;/b&gt;" in text and "&lt;script&gt;" in text
    assert text.count("<script>") == 1 and "(none recorded)" in text
    assert 'src="png/gradcam/a%20b%231.png"' in text
    assert_images_exist(Parsed(text), path)


def test_sweep_order_anchors_and_a_broken_run(tmp_path):
    """Runs found at any depth, in natural order (10 after 9); an unreadable run is shown, not fatal;
    a job dir without maps.h5 is named."""
    for name in ("10", "9", "b/1", "broken"):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(f"- seed={name.count('1')}\n")
        if name == "broken":
            (tmp_path / name / "maps.h5").write_bytes(b"truncated")
        else:
            with h5py.File(tmp_path / name / "maps.h5", "w") as f:
                f.attrs.update(rows=0, skipped_rows=0)
    (tmp_path / "failed" / ".hydra").mkdir(parents=True)
    (tmp_path / "failed" / ".hydra" / "overrides.yaml").write_text("- seed=7\n")
    assert sorted(["10", "9", "b/1", "a10", "a9"], key=report.natural_key) == ["9", "10", "a9", "a10", "b/1"]
    path = report.write_report(tmp_path)
    page = Parsed(path.read_text())
    assert [h for h in page.links if h.startswith("#")] == ["#run-9", "#run-10", "#run-b-1", "#run-broken"]
    assert {"run-9", "run-10", "run-b-1", "run-broken"} <= page.ids
    assert page.tables[0] == ["run", "seed", "rows", "skipped", "images/s", "maps (mean)"]
    assert "cannot read" in "".join(page.sections["run-broken"]) and "without maps.h5" in page.text
    assert "failed" in page.text


def test_stats_are_chunked_nan_safe_and_use_valid_rows_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.normal(3.0, 2.0, size=(50, 4, 5)).astype(np.float32)
    data[3, 1, 2] = np.nan
    data[40, 0, 0] = np.inf
    with h5py.File(tmp_path / "m.h5", "w") as f:
        ds = f.create_dataset("x/l/o", data=np.concatenate([data, np.full((5, 4, 5), 1e9, np.float32)]),
                              maxshape=(None, 4, 5), chunks=(3, 4, 5))
        monkeypatch.setattr(report, "BLOCK_BYTES", 7 * 4 * 5 * 4)  # blocks of 6 rows (whole chunks)
        stats = report.dataset_stats(ds, rows=50)
    finite = data[np.isfinite(data)].astype(np.float64)
    assert stats.shape == (50, 4, 5) and stats.count == finite.size and stats.nonfinite == 2
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-12)
    assert stats.std == pytest.approx(finite.std(), rel=1e-12)
    assert (stats.min, stats.max) == (finite.min(), finite.max())


# -- a sweep ----------------------------------------------------------------------------------------
def test_sweep_report_has_a_column_per_swept_key_and_links_to_each_run(image_folder, tiny_checkpoint, tmp_path):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [PYTHON, "-m", "pipeline", "-m", *tiny_overrides(tiny_checkpoint, image_folder), "technique=gradcam",
         "layers=[relu1],[relu2]", "render.max_inputs=2", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([PYTHON, "-m", "pipeline.report", str(sweep)], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    html_path = Path(result.stdout.strip())
    assert html_path == sweep / "report.html"
    page = Parsed(html_path.read_text())

    overrides = [yaml.safe_load((sweep / str(job) / ".hydra" / "overrides.yaml").read_text()) for job in (0, 1)]
    swept = [o.split("=", 1)[0] for o in overrides[0] if o not in overrides[1]]
    assert swept == ["layers"]  # one column per key whose value differs between the runs
    assert page.tables[0] == ["run", "layers", "rows", "skipped", "images/s", "maps (mean)"]
    for o in overrides[0]:
        if not o.startswith("layers="):
            assert o in page.text  # the keys set alike in every run are listed above the table
    anchors = [href for href in page.links if href.startswith("#")]
    assert anchors == ["#run-0", "#run-1"]
    for job, anchor in enumerate(anchors):
        assert anchor[1:] in page.ids
        section = "".join(page.sections[anchor[1:]])
        assert str(sweep / str(job)) in section and f"layers=[relu{job + 1}]" in section
    assert "gradcam/relu1/cam=" in page.text.replace("\n", "") and "gradcam/relu2/cam=" in page.text
    assert len(assert_images_exist(page, html_path)) == 4


# -- headless Chromium over the DevTools protocol ---------------------------------------------------
# PIPELINE_TEST_CHROMIUM names the binary ("none": as on a machine without Chromium); else it is looked up.
CHROMIUM = (os.environ.get("PIPELINE_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser"))
CHROMIUM = None if CHROMIUM == "none" else CHROMIUM
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary: the report's browser checks need Debian's chromium "
                             "(apt-get update && apt-get install -y chromium), which .ci/run installs")


class Browser:
    """Headless Chromium driven over the Chrome DevTools Protocol (one page, flat session)."""

    def __init__(self, binary: str, profile: Path):
        import websocket  # websocket-client, a dev extra

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,1024", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.events, self._id = [], 0
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 120
        while True:
            lines = port_file.read_text().split() if port_file.exists() else []
            if len(lines) >= 2:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            time.sleep(0.05)
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{lines[0]}{lines[1]}", timeout=30,
                                              suppress_origin=True)
        self.session = None
        page = next(t for t in self.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def _receive(self) -> dict:
        message = json.loads(self.ws.recv())
        if "id" not in message:
            self.events.append(message)
        return message

    def send(self, method: str, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        while True:
            reply = self._receive()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, path: Path) -> dict:
        """Load a file and return what a reader would see: console errors, images, status, screenshot."""
        self.events.clear()
        self.send("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + 120
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, "no load event"
            self._receive()
        status = ""
        while not re.match(r"\d+ of \d+ images loaded", status) and time.monotonic() < deadline:
            status = self.evaluate("document.getElementById('image-status').textContent")
            time.sleep(0.05)
        images = self.evaluate("Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
                               "complete: i.complete, naturalWidth: i.naturalWidth}))")
        shot = self.screenshot()
        first = None
        if images:  # the first image's box on the page, captured wherever it is
            box = self.evaluate("(() => { const r = document.images[0].getBoundingClientRect(); return "
                                "{x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height, scale: 1}; })()")
            first = self.screenshot(clip=box, captureBeyondViewport=True) if box["width"] and box["height"] else None
        errors = [e for e in self.events
                  if (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                  or e["method"] == "Runtime.exceptionThrown"
                  or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        return {"errors": errors, "images": images, "status": status,
                "broken": [i["src"] for i in images if not (i["complete"] and i["naturalWidth"] > 0)],
                "screenshot": shot, "first_image": first}

    def screenshot(self, **params) -> np.ndarray:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png", **params)["data"])
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and its helper processes
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


def browser_session(tmp_path_factory, network: bool = False):
    """A headless Chromium for a module's tests (skipped where there is none); `network`: its
    requests are recorded as events."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary")
    b = None
    try:
        b = Browser(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
        if network:
            b.send("Network.enable")
        yield b
    finally:
        if b is not None:
            b.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    yield from browser_session(tmp_path_factory)


@needs_chromium
def test_report_renders_in_chromium_with_every_image(browser, make_cfg, image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    make_run(make_cfg, image_folder, tiny_checkpoint, out)
    seen = browser.open(report.write_report(out))
    assert seen["errors"] == []
    n = len(seen["images"])
    assert n == 1 + 2 * 7 and seen["broken"] == []
    assert seen["status"] == f"{n} of {n} images loaded"
    shot = seen["screenshot"]
    assert shot is not None and shot.shape[0] > 100 and shot.shape[1] > 100
    assert float(shot.std()) > 10  # the viewport shows text and tables: not a blank page
    first = seen["first_image"]  # and an image draws its pixels (plots/deletion.png: axes and curves)
    assert first is not None and min(first.shape[:2]) > 50 and float(first.std()) > 5


@needs_chromium
def test_chromium_check_detects_a_broken_image(browser, make_cfg, image_folder, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    make_run(make_cfg, image_folder, tiny_checkpoint, out, technique="gradcam", deletion=False)
    path = report.write_report(out)
    missing = sorted((out / "png" / "gradcam").glob("*.png"))[1]
    missing.unlink()
    seen = browser.open(path)
    rel = missing.relative_to(out).as_posix()
    n = len(seen["images"])
    assert n == 7 and seen["broken"] == [rel]
    assert seen["status"].startswith(f"{n - 1} of {n} images loaded") and rel in seen["status"]
    assert any(e["method"] == "Log.entryAdded" and e["params"]["entry"].get("url", "").endswith(rel)
               for e in seen["errors"])
