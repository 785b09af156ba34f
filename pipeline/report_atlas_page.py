"""The atlas section's jump box, its CSS and its inline script (no external resource: the page
works offline).

The box takes, case-insensitively:
    `5` or `ch5`        channel 5 (in the first layer that has it; else class 5)
    `relu2 5`, `relu2:ch5`, `relu2/5`  channel 5 of layer relu2
    `class 5` or `#5`   class 5
    `tabby`             the class of that name, or of a name listing it ("tabby, tabby cat"),
                        else the first whose name starts with, then contains, the text
    `relu2`             the layer
and opens the block found (and the blocks around it), scrolls to it, outlines it and sets the
URL's #anchor; following a link to an anchor inside closed blocks opens them too. Opening a
class draws its table of top channels (report_atlas.class_html says from what).
"""
from __future__ import annotations

from typing import Sequence

from pipeline.report_html import esc


def find_form(prefix: str, names: Sequence[str]) -> str:
    """The jump box of one atlas, with the class names as suggestions."""
    options = "".join(f'<option value="{esc(n)}">' for n in names)
    return (f'<form class="atlas-find" role="search"><label>Jump to a channel or class: '
            f'<input type="search" name="q" list="{prefix}atlas-names" autocomplete="off" '
            f'placeholder="5, relu2 5, class 281, tabby"></label> <button type="submit">Go</button> '
            f'<output></output></form><datalist id="{prefix}atlas-names">{options}</datalist>')


THUMB = 48  # px: the height of a class's channel thumbnails (.atlas-thumb)

ATLAS_CSS = """
.atlas-find { margin: .6em 0 1em; } .atlas-find input { width: 22em; } .atlas-find output { margin-left: .6em; }
.atlas details { margin: .2em 0; } .atlas details details { margin-left: 1.2em; }
.atlas-layer > summary { font-size: 1.05em; padding: .3em 0; }
.atlas-patches { display: flex; flex-wrap: wrap; gap: .5em; align-items: flex-start; margin: .4em 0 .6em; }
.atlas-patches figure { width: var(--d); }
.atlas-patches img { width: var(--d); height: var(--d); max-width: none; object-fit: none; }
.atlas-patches figcaption { font-size: 12px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
img.atlas-thumb { height: THUMB_PX; max-width: none; object-fit: cover; object-position: 0 0; }
.atlas-hit { outline: 3px solid #f5a623; outline-offset: 2px; }
svg.atlas-hist { background: #f5f5f7; display: block; } svg.atlas-hist path { fill: #4670aa; }
svg.atlas-hist line { stroke: #f0961e; stroke-width: 1; } svg.atlas-hist line.q50 { stroke: #d72828; }
figure.atlas-histogram { margin: .3em 0 .8em; }
""".replace("THUMB_PX", f"{THUMB}px")

ATLAS_SCRIPT = """
(function () {
  function reveal(el) {
    for (var p = el; p; p = p.parentElement) { if (p.tagName === "DETAILS") { p.open = true; } }
    var old = document.querySelectorAll(".atlas-hit");
    for (var i = 0; i < old.length; i++) { old[i].classList.remove("atlas-hit"); }
    el.classList.add("atlas-hit");
    el.scrollIntoView({block: "start"});
  }
  function first(root, selector, test) {
    var found = root.querySelectorAll(selector);
    for (var i = 0; i < found.length; i++) { if (test(found[i])) { return found[i]; } }
    return null;
  }
  function channel(root, layer, c) {
    return first(root, ".atlas-ch", function (e) {
      return e.dataset.channel === c && (layer === null || e.dataset.layer.toLowerCase() === layer);
    });
  }
  function klass(root, test) { return first(root, ".atlas-class", test); }
  function lookup(root, text) {
    var q = text.trim().toLowerCase().replace(/\\s+/g, " "), m, found;
    if (!q) { return null; }
    if ((m = /^(?:class|#) ?(\\d+)$/.exec(q))) {
      return klass(root, function (e) { return e.dataset.class === String(+m[1]); });
    }
    if ((m = /^(?:ch(?:annel)? ?)?(\\d+)$/.exec(q))) {
      return channel(root, null, String(+m[1])) ||
        klass(root, function (e) { return e.dataset.class === String(+m[1]); });
    }
    if ((m = /^(.+?)[ :\\/]+(?:ch(?:annel)? ?)?(\\d+)$/.exec(q)) && (found = channel(root, m[1], String(+m[2])))) {
      return found;
    }
    var name = function (e) { return e.dataset.name.toLowerCase(); };
    return klass(root, function (e) { return name(e) === q; }) ||
      klass(root, function (e) { return name(e).split(/, */).indexOf(q) >= 0; }) ||
      klass(root, function (e) { return name(e).indexOf(q) === 0; }) ||
      klass(root, function (e) { return name(e).indexOf(q) >= 0; }) ||
      first(root, ".atlas-layer", function (e) { return e.dataset.layer.toLowerCase() === q; });
  }
  function go(el) {
    reveal(el);
    if (location.hash !== "#" + el.id) { location.hash = el.id; }
  }
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.classList || !form.classList.contains("atlas-find")) { return; }
    event.preventDefault();
    var input = form.querySelector("input"), out = form.querySelector("output");
    var el = lookup(form.closest(".atlas"), input.value);
    out.className = el ? "" : "error";
    out.textContent = el ? "\\u2192 " + el.dataset.label : "no channel or class matches \\u201c" + input.value + "\\u201d";
    if (el) { go(el); }
  });
  function fromHash() {
    var id = decodeURIComponent(location.hash.slice(1));
    var el = id ? document.getElementById(id) : null;
    if (el && el.closest(".atlas")) { reveal(el); }
  }
  function link(href, child) {
    var a = document.createElement("a");
    a.href = href;
    a.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    return a;
  }
  function classTable(details) {  // drawn once, when the class is first opened
    var body = details.querySelector(".atlas-top");
    if (!body || body.firstChild) { return; }
    var layers = JSON.parse(details.closest(".atlas-classes").dataset.layers);
    var table = document.createElement("table"), head = table.createTHead().insertRow();
    ["layer", "channel", "mean contribution", "top examples"].forEach(function (h) {
      head.appendChild(document.createElement("th")).textContent = h;
    });
    var rows = table.createTBody();
    body.dataset.top.split(" ").forEach(function (entry) {
      var part = entry.split(":"), layer = layers[+part[0]], c = +part[1], tr = rows.insertRow();
      var linked = layer.channels.indexOf(c) >= 0, anchor = "#" + layer.anchor + "-ch" + c;
      tr.insertCell().textContent = layer.name;
      var cell = tr.insertCell();
      if (linked) { cell.appendChild(link(anchor, "ch " + c)); } else { cell.textContent = "ch " + c; }
      var value = tr.insertCell();
      value.className = "num";
      value.textContent = part[2];
      var thumbs = tr.insertCell();
      if (linked && layer.strips && layer.thumb) {
        var img = document.createElement("img");
        img.className = "atlas-thumb";
        img.loading = "lazy";
        img.alt = layer.name + " ch" + c;
        img.style.width = layer.thumb + "px";
        img.src = layer.strips + "ch" + c + ".png";
        thumbs.appendChild(link(anchor, img));
      }
    });
    body.appendChild(table);
  }
  document.addEventListener("toggle", function (event) {
    var el = event.target;
    if (el.classList && el.classList.contains("atlas-class") && el.open) { classTable(el); }
  }, true);
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""
