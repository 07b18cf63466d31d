"""Offline HTML pages: the explanation gallery of ``explain`` and the page of ``report``.

``explain`` writes ``index.html`` beside its overlays: every explained cell with its image, true
and predicted class and confidence, each method's overlay and LIME's pros and cons; filters by
class and by correct / misclassified, sorting by confidence; a click on a cell shows all its maps
side by side with their raw values (the map downsampled to 16 x 16, each square's value on
hover); and, when the run was evaluated, the XAI metrics, the paired verdicts against the control
maps and the sanity check beside the cells. ``report`` writes ``report.html`` from report.md.

The pages are self-contained and offline: one HTML file with its CSS and JavaScript inline, the
cards drawn from the page's data 120 at a time (more as you scroll; 7000 <img> tags took 2 s to
parse for 1000 cells), their images read lazily from the folder beside it, and each cell's
raw-value grids from ``grids/<cell>.js`` when the cell is clicked (inline, 200 cells made a 6.4 MB
page that took 1 s to open; one file for all still took 0.6 s on the first click of 100 cells), no
network request, no library. ``markdown_html`` converts the package's own Markdown (headings, tables,
images, emphasis, code, lists) and nothing more.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from cervical import files

__all__ = ["markdown_html", "write_explain_gallery", "write_report_page", "map_grid"]

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:17px;margin-top:24px} h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
.bar{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin:8px 0}
.cells{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:10px}
.cell{border:1px solid #bbb;border-radius:6px;padding:6px;cursor:pointer;background:#fafafa}
.cell.wrong{border-color:#c44e52;background:#fff4f4}
.cell img{width:64px;height:64px;image-rendering:pixelated;margin:1px}
.meta{font-size:12px;margin-bottom:4px}
#detail{position:fixed;inset:5%;background:#fff;border:2px solid #444;overflow:auto;padding:12px;
display:none;z-index:5;box-shadow:0 0 20px #0006}
#detail img{width:160px;height:160px;image-rendering:pixelated}
.grid td{width:14px;height:14px;padding:0;border:0}
.maps{display:flex;gap:16px;flex-wrap:wrap}
"""

_JS = """
const cells = JSON.parse(document.getElementById('cells-data').textContent);
const box = document.getElementById('cells');
const PAGE = 120;                 // cards drawn at a time: opening does not grow with the cells
const esc = v => String(v).replace(/[&<>"']/g, ch => ({'&': '&amp;', '<': '&lt;', '>': '&gt;',
                                                       '"': '&quot;', "'": '&#39;'}[ch]));
let shown = [], drawn = 0;
function card(c){
  let imgs = c.image ? '<img src="' + esc(c.image) + '" alt="cell" loading="lazy">' : '';
  for (const m of c.methods) imgs += '<img src="' + esc(m.file) + '" alt="' + esc(m.name)
                                     + '" title="' + esc(m.name) + '" loading="lazy">';
  const label = {correct: 'correct', wrong: 'misclassified'}[c.kind] || c.kind;
  return '<div class="cell ' + esc(c.kind) + '" id="cell-' + c.id + '" onclick="detail(' + c.id
    + ')"><div class="meta">true <b>' + esc(c.true_name || '?') + '</b>, predicted <b>'
    + esc(c.pred_name) + '</b> (' + (100 * c.confidence).toFixed(1) + ' %), ' + esc(label)
    + '</div>' + imgs + '</div>';
}
function more(){
  const next = shown.slice(drawn, drawn + PAGE);
  box.insertAdjacentHTML('beforeend', next.map(card).join(''));
  drawn += next.length;
  document.getElementById('more').style.display = drawn < shown.length ? '' : 'none';
}
function show(){
  const cls = document.getElementById('f-class').value;
  const kind = document.getElementById('f-kind').value;
  const order = document.getElementById('f-sort').value;
  shown = cells.filter(c => (cls === 'all' || c.true_name === cls)
                         && (kind === 'all' || c.kind === kind));
  shown.sort((a, b) => order === 'asc' ? a.confidence - b.confidence : b.confidence - a.confidence);
  box.innerHTML = ''; drawn = 0; more();
  document.getElementById('count').textContent = shown.length + ' of ' + cells.length + ' cells';
}
new IntersectionObserver(es => { if (es.some(e => e.isIntersecting) && drawn < shown.length) more(); })
  .observe(document.getElementById('more'));
function detail(id){
  const c = cells.find(x => x.id === id);
  window.CERVICAL_GRIDS = window.CERVICAL_GRIDS || {};
  if (!(id in CERVICAL_GRIDS) && c.methods.some(m => m.grid)){
    const s = document.createElement('script');       // this cell's raw-value grids, read now
    s.src = 'grids/' + id + '.js'; s.onload = () => detail(id);
    s.onerror = () => { CERVICAL_GRIDS[id] = {}; detail(id); };
    document.head.appendChild(s); return; }
  const grids = CERVICAL_GRIDS;
  const d = document.getElementById('detail');
  let s = '<button onclick="closeDetail()">close</button><h3>' + esc(c.title) + '</h3><div class="maps">';
  for (const method of c.methods){
    const m = Object.assign({}, method, (grids[c.id] || {})[method.name] || {grid: null});
    s += '<div><b>' + esc(m.name) + '</b><br><img src="' + esc(m.file) + '" alt="' + esc(m.name) + '">';
    if (m.grid){ s += '<table class="grid">';
      for (const row of m.grid){ s += '<tr>';
        for (const v of row){ const g = Math.round(255 * (1 - v));
          s += '<td title="' + v.toFixed(3) + '" style="background:rgb(255,' + g + ',' + g + ')"></td>'; }
        s += '</tr>'; }
      s += '</table><small>max ' + m.max.toFixed(3) + ', mean ' + m.mean.toFixed(3) + '</small>'; }
    s += '</div>'; }
  d.innerHTML = s + '</div>'; d.style.display = 'block';
}
function closeDetail(){ document.getElementById('detail').style.display = 'none'; }
for (const el of document.querySelectorAll('select')) el.addEventListener('change', show);
show();
"""


def map_grid(saliency: np.ndarray, side: int = 16) -> List[List[float]]:
    """A map averaged over a side x side grid of blocks (its raw values, for the page).

    Block (i, j) covers rows floor(i H / side) .. floor((i + 1) H / side) - 1 (columns alike), so
    every pixel falls in exactly one block.
    """
    a = np.asarray(saliency, dtype=np.float64)
    h, w = a.shape[:2]
    rows = np.linspace(0, h, min(side, h) + 1).astype(int)
    cols = np.linspace(0, w, min(side, w) + 1).astype(int)
    return [[float(a[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].mean())
             for j in range(len(cols) - 1)] for i in range(len(rows) - 1)]


def _inline(text: str) -> str:
    """Escape, then **bold**, `code`, ![alt](src) and [text](href)."""
    t = html.escape(text, quote=False)
    t = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img src="\2" alt="\1" loading="lazy">', t)
    t = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def markdown_html(text: str) -> str:
    """The package's Markdown as HTML: # headings, | tables |, images, paragraphs, - lists."""
    out: List[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def _table(rows: List[str]) -> str:
    cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows]
    body = [r for r in cells if not all(set(c) <= set("-: ") for c in r)]
    if not body:
        return ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in body[0])
    rest = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>"
                   for r in body[1:])
    return f"<table><tr>{head}</tr>{rest}</table>"


def _page(title: str, body: str, script: str = "") -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>{body}"
            + (f"<script>{script}</script>" if script else "") + "</body></html>\n")


def _cell_entries(cells_json: dict, maps: Optional[Dict[str, np.ndarray]]
                  ) -> Tuple[List[dict], Dict[int, dict]]:
    """One JSON-ready entry per explained cell (names, files; ``grid`` true where the method has
    a raw map), and the grids apart: {cell id: {method: {grid, max, mean}}}, values to 4
    significant digits (the page shows 3 decimals), for grids/<cell id>.js."""
    out, grids = [], {}
    shown = [c for c in cells_json["cells"] if c.get("index", -1) >= 0]
    for j, c in enumerate(shown):
        methods = []
        for name, file in c["files"].items():
            if name == "image":
                continue
            m = {"name": name, "file": file, "grid": False}
            key = "lime" if name.startswith("lime") else name     # both LIME renders, one map
            raw = None if maps is None else maps.get("map_" + re.sub(r"[^a-z0-9]+", "_",
                                                                     key.replace("++", "_pp")))
            if raw is not None and j < len(raw):
                m["grid"] = True
                grids.setdefault(j, {})[name] = {
                    "grid": [[_short(v) for v in row] for row in map_grid(raw[j])],
                    "max": _short(np.max(raw[j])), "mean": _short(np.mean(raw[j]))}
            methods.append(m)
        out.append({"id": j, "kind": c["kind"], "true_name": c.get("true_name") or "",
                    "pred_name": c.get("pred_name") or "", "confidence": float(c["confidence"]),
                    "image": c["files"].get("image", ""), "methods": methods,
                    "title": f"{c.get('name', '')}: true {c.get('true_name') or '?'}, predicted "
                             f"{c.get('pred_name')} ({100 * float(c['confidence']):.1f} %)"})
    return out, grids


def _short(v) -> float:
    """A map value to 4 significant digits (what the detail view can show, at a fifth the bytes)."""
    return float(f"{float(v):.4g}")


def write_explain_gallery(folder: Path, title: str) -> Path:
    """index.html for an explain output folder (cells.json, overlays/, maps.npz, xai_metrics.md)."""
    folder = Path(folder)
    cells_json = json.loads((folder / "cells.json").read_text())
    maps = None
    if (folder / "maps.npz").is_file():
        with np.load(folder / "maps.npz", allow_pickle=False) as z:
            maps = {k: z[k] for k in z.files if k.startswith("map_")}
    entries, grids = _cell_entries(cells_json, maps)
    classes = sorted({e["true_name"] for e in entries if e["true_name"]})
    options = "".join(f"<option value='{html.escape(c)}'>{html.escape(c)}</option>"
                      for c in classes)
    legend = ", ".join(["the cell"] + [html.escape(m["name"]) for m in
                                       (entries[0]["methods"] if entries else [])])
    data = json.dumps(entries).replace("</", "<\\/")         # no early end of the script tag
    metrics = ""
    if (folder / "xai_metrics.md").is_file():
        metrics = ("<h2>How the methods score (xai_metrics.md)</h2>"
                   + markdown_html((folder / "xai_metrics.md").read_text()))
    body = (f"<h1>{html.escape(title)}</h1><p>Explained: {html.escape(str(cells_json.get('context')))}; "
            f"CAM layer {html.escape(str(cells_json.get('layer')))}. Click a cell for all its maps "
            f"and their raw values.</p>"
            f"<div class='bar'><label>class <select id='f-class'><option value='all'>all</option>"
            f"{options}</select></label><label>cells <select id='f-kind'><option value='all'>all"
            f"</option><option value='correct'>correct</option><option value='wrong'>"
            f"misclassified</option><option value='image'>image files</option></select></label>"
            f"<label>sort <select id='f-sort'><option value='desc'>most confident first</option>"
            f"<option value='asc'>least confident first</option></select></label>"
            f"<span id='count'></span></div><p class='meta'>In each cell: {legend}.</p>"
            f"<div id='cells' class='cells'></div><button id='more' onclick='more()'>show more</button>"
            f"<div id='detail'></div>{metrics}"
            f"<script type='application/json' id='cells-data'>{data}</script>")
    _write_grids(folder / "grids", grids)
    return files.write_text(folder / "index.html", _page(title, body, _JS))


def _write_grids(folder: Path, grids: Dict[int, dict]) -> None:
    """grids/<cell id>.js: one small script per cell, read when the cell is clicked."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for j, methods in grids.items():
        folder.mkdir(exist_ok=True)
        files.write_text(folder / f"{j}.js", "window.CERVICAL_GRIDS = window.CERVICAL_GRIDS || {};"
                         f" CERVICAL_GRIDS[{j}] = " + json.dumps(methods, separators=(",", ":"))
                         + ";\n")


def write_report_page(folder: Path) -> Path:
    """report.html beside report.md (its tables and figures, offline)."""
    folder = Path(folder)
    text = (folder / "report.md").read_text()
    title = next((l.lstrip("# ").strip() for l in text.splitlines() if l.startswith("#")),
                 "report")
    return files.write_text(folder / "report.html", _page(title, markdown_html(text)))
