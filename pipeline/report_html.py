"""HTML building blocks for the report: escaping, tables, figures and image grids, the page."""
from __future__ import annotations

import html
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np


@dataclass
class Image:
    path: Path
    caption: str
    alt: str


class Raw(str):
    """HTML already escaped (or built from escaped parts): inserted as is."""


def esc(value) -> str:
    return value if isinstance(value, Raw) else html.escape("" if value is None else str(value))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; padding: 1em 1.5em;
       max-width: 1400px; color: #1d1d1f; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 2px solid #ddd; }
h3 { margin-top: 1.4em; } h4 { margin: 1em 0 .3em; }
code, pre { font: 13px/1.35 ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f5f5f7; padding: .8em; overflow-x: auto; max-height: 40em; }
table { border-collapse: collapse; margin: .4em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f5f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-width: 100%; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; word-break: break-all; }
.dirty { color: #b00020; font-weight: 600; } .muted { color: #6e6e73; } .error { color: #b00020; }
#image-status { padding: .3em .6em; background: #eef6ee; display: inline-block; }
#image-status.bad { background: #fdecea; color: #b00020; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 0; }
figure figcaption { font-size: 13px; color: #6e6e73; margin-top: .2em; word-break: break-all; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1em; }
.wide figure { margin-bottom: 1em; }
details > summary { cursor: pointer; }
"""

SCRIPT = """
(function () {
  var lazyMissing = [], shown = null;
  function show() {
    var all = Array.prototype.slice.call(document.images);
    var images = all.filter(function (img) { return img.loading !== "lazy"; });
    var ok = function (img) { return img.complete && img.naturalWidth > 0; };
    var loaded = images.filter(ok);
    var missing = images.filter(function (img) { return !ok(img); })
      .map(function (img) { return img.getAttribute("src"); }).concat(lazyMissing);
    var status = document.getElementById("image-status");
    var text = loaded.length + " of " + images.length + " images loaded";
    if (all.length > images.length) {
      text += "; " + (all.length - images.length) + " more load when shown";
    }
    if (missing.length) {
      text += "; not loaded (moved or deleted?): " + missing.join(", ");
      status.className = "bad";
    }
    status.textContent = text;
  }
  document.addEventListener("error", function (event) {  // a lazy image that fails once shown
    var img = event.target;
    if (img.tagName === "IMG" && img.loading === "lazy" && lazyMissing.indexOf(img.getAttribute("src")) < 0) {
      lazyMissing.push(img.getAttribute("src"));
      if (shown) { show(); }
    }
  }, true);
  window.addEventListener("load", function () { shown = true; show(); });
})();
"""


def table(headers: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def src(path: Path, base: Path) -> str:
    """URL of `path` relative to the page's dir `base`, percent-encoded (spaces, '#', '%', ...)."""
    rel = Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    return quote(rel, safe="/-._~")


def png_size(path: Path) -> Optional[Tuple[int, int]]:
    """(width, height) from a PNG's IHDR chunk, without decoding it; None if it is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def figure(image: Image, base: Path) -> str:
    """The image (a link to it at full size) and its caption; width/height reserve its space."""
    url = esc(src(image.path, base))
    size = png_size(image.path)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (f'<figure><a href="{url}"><img loading="eager" src="{url}"{dims} alt="{esc(image.alt)}"></a>'
            f"<figcaption>{esc(image.caption)}</figcaption></figure>")


def grid(images: Sequence[Image], base: Path) -> str:
    """A grid whose columns fit the widest image (up to 700 px), so wide grids get a row each."""
    widths = [size[0] for size in map(png_size, (i.path for i in images)) if size]
    column = min(max(widths, default=300), 700)
    return (f'<div class="grid" style="grid-template-columns: repeat(auto-fill, minmax(min({column}px, 100%), 1fr))">'
            + "".join(figure(i, base) for i in images) + "</div>")


def facts(pairs: Sequence[Tuple[str, object]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def page(title: str, intro: str, body: str, css: str = "", script: str = "") -> str:
    """The whole document; `css` and `script` are added to its one style and one script element."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{CSS}{css}</style>
</head>
<body>
<header>
<h1>{esc(title)}</h1>
{intro}
<p id="image-status">Checking images (needs JavaScript)&hellip;</p>
</header>
{body}
<script>{SCRIPT}{script}</script>
</body>
</html>
"""


def fmt(value) -> str:
    """Numbers for a table cell: 4 significant digits, '' for None."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{float(value):.4g}"
    return str(value)
