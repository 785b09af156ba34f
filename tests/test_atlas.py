"""The atlas: png/atlas/<layer>.png drawn from a dataset_examples summary (rows, tiles, cached
filter images, pages), and the report's atlas section read as text."""
import html
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import cv2
import numpy as np
import pytest

from pipeline import report
from pipeline.io import atlas
from pipeline.io.render import write_png
from pipeline.report_atlas import MARKER
from pipeline.store import open_run
from tests.atlas_data import examples_summary, relevance_summary, write_run
from tests.test_report import Browser, Parsed, browser_session, needs_chromium

CFG = SimpleNamespace(tile=160)  # render.tile: atlas tiles are capped at ATLAS_TILE (128)
PAD = 2


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def tile_at(image: np.ndarray, row: int, col: int, size: int) -> np.ndarray:
    y, x = PAD + row * (size + PAD), PAD + col * (size + PAD)
    return image[y:y + size, x:x + size]


# -- png/atlas/<layer>.png ----------------------------------------------------------------------------
def test_atlas_has_a_row_per_channel_with_its_patches_and_histogram(tmp_path):
    summary = examples_summary({"relu1": [0, 1, 2, 3, 4]}, k=3, P=16)
    written = atlas.render_atlas(tmp_path, summary, CFG)
    assert written == [tmp_path / "png" / "atlas" / "relu1.png"]
    image = read_rgb(written[0])
    size = atlas.ATLAS_TILE
    assert image.shape == (5 * (size + PAD) + PAD, (1 + 3 + 1) * (size + PAD) + PAD, 3)
    patches = summary["relu1", "top_patches"]
    for i, c in enumerate(range(5)):
        header = tile_at(image, i, 0, size)
        assert np.median(header[size // 3:]) == 235  # no filter image: the grey tile
        for j in range(3):  # the patch, scaled up, under its title strip: red = 10 c + j
            tile = tile_at(image, i, 1 + j, size)
            below = tile[size // 3:, :, 0]
            assert np.all(np.abs(below.astype(int) - (10 * c + j)) <= 1)
            assert np.abs(tile[size // 3:].astype(int) - cv2.resize(
                patches[i, j].transpose(1, 2, 0), (size, size), interpolation=cv2.INTER_LINEAR)[size // 3:]).max() <= 1
            assert tile[:8].mean() < below.mean() + 60  # the darkened title strip
        hist = tile_at(image, i, 4, size)
        blue = np.all(hist == (70, 110, 170), axis=2)
        red = np.all(hist == (215, 40, 40), axis=2)
        assert blue.sum() > 100 and red.any()  # bars, and the median line


def test_bottom_examples_extend_the_row_and_titles_fit_small_tiles(tmp_path):
    summary = examples_summary({"blocks.4": [7, 9]}, k=2, P=24, bottom=3)
    (path,) = atlas.render_atlas(tmp_path, summary, SimpleNamespace(tile=64))
    image = read_rgb(path)
    assert path.name == "blocks.4.png"
    assert image.shape == (2 * (64 + PAD) + PAD, (1 + 2 + 3 + 1) * (64 + PAD) + PAD, 3)
    low = tile_at(image, 1, 3, 64)
    assert np.median(low[30:]) == 40  # the bottom patches (filled with 40)


def test_a_cached_filter_image_heads_its_row(tmp_path):
    cache = tmp_path / "cache" / "0123456789abcdef0123" / "relu1"
    write_png(cache / "2.png", np.full((48, 48, 3), (200, 30, 90), np.uint8))
    (cache / "3.png").write_bytes(b"not a png")
    assert atlas.cached_filter(None, 2) is None and atlas.cached_filter(cache, 1) is None
    assert atlas.cached_filter(cache, 3) is None  # undecodable: as if absent
    assert atlas.cached_filter(cache, 2).shape == (48, 48, 3)
    summary = examples_summary({"relu1": [1, 2, 3], "relu2": [2]}, k=2, P=16)
    images = atlas.filter_cache({"relu1": cache})  # relu2: no folder
    written = atlas.render_atlas(tmp_path / "run", summary, CFG, images)
    first, second = read_rgb(written[0]), read_rgb(written[1])
    size = atlas.ATLAS_TILE
    assert np.all(tile_at(first, 1, 0, size)[size // 2:] == (200, 30, 90))  # relu1 ch2: from the cache
    for row in (0, 2):
        assert np.median(tile_at(first, row, 0, size)[size // 3:]) == 235
    assert np.median(tile_at(second, 0, 0, size)[size // 3:]) == 235
    assert len(list(cache.iterdir())) == 2  # nothing computed or written there


def test_large_layers_are_split_into_pages_and_stale_pages_removed(tmp_path):
    summary = examples_summary({"features.10": range(70), "relu-1": [0]}, k=4, P=16)
    written = atlas.render_atlas(tmp_path, summary, SimpleNamespace(tile=1024))
    folder = tmp_path / "png" / "atlas"
    assert [p.name for p in written] == ["features.10-1.png", "features.10-2.png", "features.10-3.png", "relu-1.png"]
    size = atlas.ATLAS_TILE  # render.tile 1024 is capped
    heights = [read_rgb(p).shape[0] for p in written[:3]]
    assert heights == [32 * (size + PAD) + PAD] * 2 + [6 * (size + PAD) + PAD]
    assert {read_rgb(p).shape[1] for p in written} == {6 * (size + PAD) + PAD}
    assert atlas.atlas_pages(tmp_path, "features.10") == written[:3]
    # redrawn with fewer channels: one page, the old parts removed, another layer's file kept
    again = atlas.render_atlas(tmp_path, examples_summary({"features.10": range(10)}, k=4, P=16), CFG)
    assert again == [folder / "features.10.png"]
    assert sorted(p.name for p in folder.iterdir()) == ["features.10.png", "relu-1.png"]
    assert atlas.atlas_pages(tmp_path, "features.10") == again
    assert atlas.render_atlas(tmp_path, examples_summary({"x": range(5)}), CFG, per_page=2)[-1].name == "x-3.png"
    assert atlas.page_names("a b/c", 3) == ["a_b_c.png"]


def test_histogram_window_handles_infinite_edges_and_empty_histograms():
    edges = np.array([-np.inf, 0.0, 1.0, 2.0, np.inf])
    first, last, finite = atlas.hist_window(np.array([0, 3, 0, 1]), edges)
    assert (first, last) == (1, 4) and finite.tolist() == [-1.0, 0.0, 1.0, 2.0, 3.0]
    assert atlas.hist_window(np.zeros(4), edges)[:2] == (0, 4)
    tile = atlas.histogram_tile(np.zeros(4), edges, None, None, 64)
    assert tile.shape == (64, 64, 3)
    assert atlas.short_id("a" * 30) == ".." + "a" * 22 and atlas.short_id("cat.jpg") == "cat.jpg"


# -- the report's atlas section -----------------------------------------------------------------------
CLASSES = ["tabby, tabby cat", "dog", "car", "tiger cat"]


def atlas_run(tmp_path: Path, name: str = "run", bottom: int = 2, classes=CLASSES) -> Path:
    """A run dir with both summaries (relu1 channels 0-4, relu2 channels 1, 3, 5; class 2 without
    inputs) and the atlas PNGs it would draw."""
    examples = examples_summary({"relu1": range(5), "relu2": [1, 3, 5]}, k=3, P=16, bottom=bottom)
    relevance = relevance_summary({"relu1": 8, "relu2": 6}, classes=4, empty=[2])
    run_dir = write_run(tmp_path / name, examples, relevance, classes)
    atlas.render_atlas(run_dir, examples, CFG)
    return run_dir


def atlas_imgs(page: Parsed) -> list:
    return [img for img in page.imgs if img.get("loading") == "lazy"]


def test_report_has_an_atlas_section_with_anchors_and_lazy_images(tmp_path):
    run_dir = atlas_run(tmp_path)
    path = report.write_report(run_dir)
    text = path.read_text()
    page = Parsed(text)
    assert "Atlas" in page.text and 'class="atlas-find"' in text and text.count("<script>") == 1
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing external
    channels = {f"atlas-relu1-ch{c}" for c in range(5)} | {f"atlas-relu2-ch{c}" for c in (1, 3, 5)}
    assert channels | {"atlas-relu1", "atlas-relu2", "atlas-class-0", "atlas-class-1", "atlas-class-3"} <= page.ids
    assert "atlas-class-2" not in page.ids and "1 without inputs" in page.text  # class 2 has no inputs
    # class 0's top channels: relu1 0, 1, 2 and relu2 0, 1, 2 (mean 1.0 - 0.1 j), drawn by the script
    # from data-top, linked where the layer's data-layers lists the channel among its examples
    block = re.search(r'<details class="atlas-class" id="atlas-class-0"[^>]*>.*?</details>', text).group(0)
    assert 'data-name="tabby, tabby cat"' in block and "5 inputs" in block
    assert re.search(r'data-top="([^"]*)"', block).group(1) == "0:0:1 0:1:0.9 0:2:0.8 1:0:1 1:1:0.9 1:2:0.8"
    layers = json.loads(html.unescape(re.search(r'class="atlas-classes"[^>]*data-layers="([^"]*)"', text).group(1)))
    assert layers == [{"name": "relu1", "anchor": "atlas-relu1", "channels": [0, 1, 2, 3, 4],
                       "strips": "report-atlas/run/relu1/", "thumb": 3 * 48},
                      {"name": "relu2", "anchor": "atlas-relu2", "channels": [1, 3, 5],
                       "strips": "report-atlas/run/relu2/", "thumb": 3 * 48}]
    assert {link[1:] for link in page.links if link.startswith("#atlas")} <= page.ids
    # each channel links to the classes listing it, by mean contribution: relu1 ch0..4, then relu2 ch1, 3, 5
    drives = [[0], [1, 0], [1, 0], [3, 1], [3], [1, 0], [3, 1], [3]]
    assert re.findall(r'href="#atlas-class-(\d)"', text) == [str(i) for d in drives for i in d]
    assert '<option value="tiger cat">' in text and '<option value="car">' not in text

    with open_run(run_dir) as r:  # [C, k] strings read back as they were written
        stored = r.summary("dataset_examples")
    assert stored["relu2", "top_ids"].tolist() == [[f"img_{(7 * c) % 40 + j:03d}.png" for j in range(3)] for c in range(3)]
    for j in range(3):  # relu2 ch3 (row 1): each patch's score and id
        score = report.fmt(float(stored["relu2", "top_scores"][1, j]))
        assert f"<figcaption>{score}<br>img_{7 + j:03d}.png</figcaption>" in text
    lazy = atlas_imgs(page)
    assert len(lazy) == 8 * (3 + 2) + 2  # 8 channels x (3 top + 2 bottom) patches, the 2 atlas PNGs
    assert all(img["alt"] for img in lazy) and not [img for img in page.imgs if img.get("loading") != "lazy"]
    for img in lazy:
        assert not re.match(r"^[a-z]+:|^/", img["src"]) and (path.parent / unquote(img["src"])).is_file()
    strips = sorted((run_dir / "report-atlas" / "run").rglob("*.png"))
    assert len(strips) == 8 and (run_dir / "report-atlas" / MARKER).is_file()
    strip = read_rgb(run_dir / "report-atlas" / "run" / "relu2" / "ch5.png")
    assert strip.shape == (64, 5 * 64, 3)  # P = 16 shown at 64 px: 3 top, 2 bottom patches
    assert [int(np.median(strip[:, 64 * j:64 * (j + 1), 0])) for j in range(3)] == [50, 51, 52]
    offsets = re.findall(r'relu2/ch5\.png" alt="[^"]*" style="object-position:-(\d+)px', text)
    assert offsets == ["0", "64", "128", "192", "256"]
    assert "png/atlas/relu1.png" in text and "<h4>atlas" not in text  # the atlas PNGs: not per-input images


def test_report_atlas_is_rewritten_and_refuses_a_foreign_folder(tmp_path):
    run_dir = atlas_run(tmp_path, bottom=0)
    report.write_report(run_dir)
    stale = run_dir / "report-atlas" / "run" / "relu1" / "ch99.png"
    stale.write_bytes(b"old")
    report.write_report(run_dir)
    assert not stale.exists() and len(list((run_dir / "report-atlas").rglob("*.png"))) == 8

    other = tmp_path / "elsewhere" / "page.html"
    (other.parent / "page-atlas").mkdir(parents=True)
    (other.parent / "page-atlas" / "mine.txt").write_text("keep")
    assert report.main([str(run_dir), "--out", str(other)]) == 2  # not a report's folder: never deleted
    assert (other.parent / "page-atlas" / "mine.txt").is_file() and not other.exists()


def test_a_run_without_examples_or_without_class_names(tmp_path):
    run_dir = write_run(tmp_path / "rel", None, relevance_summary({"relu1": 8}, classes=3))
    text = report.write_report(run_dir).read_text()
    page = Parsed(text)
    assert {"atlas-class-0", "atlas-class-1", "atlas-class-2"} <= page.ids and "class 1" in page.text
    assert "no dataset_examples summary" in page.text and not atlas_imgs(page)
    assert not re.search(r'href="#atlas-relu1-ch', text)  # nothing to link to

    run_dir = write_run(tmp_path / "ex", examples_summary({"relu1": [4]}, k=0))
    page = Parsed(report.write_report(run_dir).read_text())
    assert "atlas-relu1-ch4" in page.ids and "no examples" in page.text and not atlas_imgs(page)


def test_a_sweep_gets_one_atlas_per_run_with_distinct_anchors(tmp_path):
    for job in ("0", "1"):
        atlas_run(tmp_path, job)
    path = report.write_report(tmp_path)
    page = Parsed(path.read_text())
    assert {"run-0-atlas-relu1-ch0", "run-1-atlas-relu1-ch0", "run-0-atlas-class-3", "run-1-atlas-class-3"} <= page.ids
    assert len({img["src"].split("/")[1] for img in atlas_imgs(page) if "report-atlas" in img["src"]}) == 2
    for img in atlas_imgs(page):
        assert (path.parent / unquote(img["src"])).is_file()


def test_the_report_of_a_large_layer_stays_small(tmp_path):
    """320 channels x 16 patches: the page holds references to 320 strips, not pixels."""
    examples = examples_summary({"layer4": range(320)}, k=16, P=16, bins=32)
    run_dir = write_run(tmp_path / "run", examples)
    text = report.write_report(run_dir).read_text()
    assert len(text) < 3_000_000 and "base64" not in text
    assert text.count('loading="lazy"') == 320 * 16 and text.count("<details") == 2 + 320


# -- in headless Chromium ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    yield from browser_session(tmp_path_factory, network=True)  # requests are events: what a page fetches, and when


def wait_for(browser: Browser, expression: str, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while not (value := browser.evaluate(expression)):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)
    return value


def fetched(browser: Browser) -> set:
    """The files the page has requested since it was opened."""
    browser.evaluate("1")  # take in the events sent so far
    return {Path(unquote(urlparse(e["params"]["request"]["url"]).path))
            for e in browser.events if e["method"] == "Network.requestWillBeSent"}


def find(browser: Browser, text: str) -> dict:
    """Type `text` into the jump box and press Enter, as a reader would; what the page shows then."""
    browser.evaluate("(() => { const i = document.querySelector('.atlas-find input'); i.value = ''; i.focus(); })()")
    browser.send("Input.insertText", text=text)
    for kind in ("keyDown", "keyUp"):
        browser.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                     **({"text": "\r"} if kind == "keyDown" else {}))
    time.sleep(0.2)
    return browser.evaluate(
        "(() => { const hit = document.querySelector('.atlas-hit'), out = document.querySelector('.atlas-find output');"
        " const r = hit ? hit.getBoundingClientRect() : null; return {hash: location.hash, output: out.textContent,"
        " hit: hit ? hit.id : null, open: hit ? hit.open : null, top: r ? r.top : null, height: innerHeight}; })()")


@needs_chromium
def test_atlas_in_chromium_shows_every_image_and_jumps_to_a_class(browser, tmp_path):
    run_dir = atlas_run(tmp_path)
    page = report.write_report(run_dir)
    seen = browser.open(page)
    assert seen["errors"] == [] and seen["status"] == "0 of 0 images loaded; 42 more load when shown"
    assert fetched(browser) == {page.resolve()}  # closed blocks fetch nothing

    for text, anchor in (("tiger", "atlas-class-3"), ("Tabby Cat", "atlas-class-0"), ("class 1", "atlas-class-1"),
                         ("relu2 ch5", "atlas-relu2-ch5"), ("3", "atlas-relu1-ch3"), ("relu2", "atlas-relu2")):
        shown = find(browser, text)
        assert shown["hit"] == anchor and shown["hash"] == f"#{anchor}" and shown["open"], (text, shown)
        assert -2 <= shown["top"] < shown["height"] - 20, (text, shown)  # scrolled to it
    assert "tiger cat" in find(browser, "tiger")["output"]
    missing = find(browser, "class 2")  # no inputs of class 2: not listed
    assert missing["hit"] == "atlas-class-3" and "no channel or class matches" in missing["output"]
    # an opened class shows its table: layer, channel (linked when it has examples), mean contribution, thumbnails
    rows = browser.evaluate("Array.from(document.querySelectorAll('#atlas-class-1 tbody tr')).map(r => "
                            "[...r.cells].map(c => c.textContent).concat([r.querySelectorAll('a').length]))")
    assert rows == [["relu1", "ch 1", "1.01", "", 2], ["relu1", "ch 2", "0.91", "", 2], ["relu1", "ch 3", "0.81", "", 2],
                    ["relu2", "ch 1", "1.01", "", 2], ["relu2", "ch 2", "0.91", "", 0], ["relu2", "ch 3", "0.81", "", 2]]
    # a class's link to a channel opens that channel's closed block
    browser.evaluate("document.querySelector('#atlas-class-1 a[href=\"#atlas-relu2-ch3\"]').click()")
    assert wait_for(browser, "document.getElementById('atlas-relu2-ch3').open && location.hash === '#atlas-relu2-ch3'")

    # every image, once its block is open and it is scrolled into view, is decoded
    browser.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    n = wait_for(browser, "document.images.length === 55 && 55")  # + a thumbnail per linked class channel (13)
    for i in range(n):
        browser.evaluate(f"document.images[{i}].scrollIntoView()")
        wait_for(browser, f"document.images[{i}].complete")
    broken = browser.evaluate("Array.from(document.images).filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
    strips = {p.resolve() for p in (run_dir / "report-atlas").rglob("*.png")}
    pages = {p.resolve() for p in (run_dir / "png" / "atlas").glob("*.png")}
    assert broken == [] and fetched(browser) == {page.resolve()} | strips | pages
    errors = [e for e in browser.events if e["method"] in ("Runtime.exceptionThrown", "Log.entryAdded")
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")]
    assert errors == []
    # a patch shows its own part of the strip: relu2 ch5's third patch has red 10 * 5 + 2
    box = browser.evaluate("(() => { const img = document.querySelector('#atlas-relu2-ch5 figure.top:nth-child(3) img');"
                           " img.scrollIntoView(); const r = img.getBoundingClientRect(); return {x: r.x + scrollX,"
                           " y: r.y + scrollY, width: r.width, height: r.height, scale: 1}; })()")
    patch = browser.screenshot(clip=box, captureBeyondViewport=True)
    assert box["width"] == 64 and abs(float(np.median(patch[8:-8, 8:-8, 2])) - 52) <= 3  # BGR: red is last
    box = browser.evaluate("(() => { const img = document.querySelector('#atlas-class-3 img[alt=\"relu2 ch5\"]');"
                           " img.scrollIntoView(); const r = img.getBoundingClientRect(); return {x: r.x + scrollX,"
                           " y: r.y + scrollY, width: r.width, height: r.height, scale: 1}; })()")
    thumbs = browser.screenshot(clip=box, captureBeyondViewport=True)  # its first 3 patches, scaled to 48 px
    assert (box["width"], box["height"]) == (144, 48)
    assert [abs(float(np.median(thumbs[6:-6, 48 * j + 6:48 * (j + 1) - 6, 2])) - (50 + j)) <= 3 for j in range(3)] == [True] * 3


@needs_chromium
def test_chromium_status_names_a_missing_strip_once_it_is_shown(browser, tmp_path):
    run_dir = atlas_run(tmp_path, bottom=0)
    path = report.write_report(run_dir)
    (run_dir / "report-atlas" / "run" / "relu1" / "ch2.png").unlink()
    seen = browser.open(path)
    assert seen["errors"] == [] and "not loaded" not in seen["status"]
    browser.evaluate("document.getElementById('atlas-relu1-ch2').open = true")
    browser.evaluate("document.querySelector('#atlas-relu1-ch2 img').scrollIntoView()")
    status = wait_for(browser, "(s => s.className === 'bad' && s.textContent)(document.getElementById('image-status'))")
    assert status.endswith("not loaded (moved or deleted?): report-atlas/run/relu1/ch2.png")
