#!/usr/bin/env python
"""How fast the explanation gallery opens and filters with hundreds of cells, in headless Chromium.

For each N, an explain folder of N cells is written the way ``explain`` writes one (cells.json,
the cell and six method overlays per cell as 110 px PNGs, maps.npz with a 110 x 110 map per cell
and method), ``gallery.write_explain_gallery`` builds its index.html, and the system Chromium
(driven by Selenium, as the test suite does) measures, inside the page:

    open      navigation start -> load event (the page, its script, the images in view)
    filter    a class filter applied (change event -> every tile shown or hidden)
    sort      the order switched to least confident first
    detail    a click on a cell (1 s after the page opened) until its detail view shows every map with its 16 x 16 raw-value
              grid (the cell's grids/<cell>.js, read on the click, included)

Each time is the median of 5 repetitions; the last column is open time at N ÷ open time at the
smallest N (lazy images keep it near 1 while N grows). Target: open and filter under one second for
the demo's whole test split (100 cells) and for 1000 cells.

    python benchmarks/gallery_bench.py [--cells 100,500,1000,2000] [--out outputs/gallery_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "lime_pros", "lime_pros_cons")
CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")


def explain_folder(root: Path, n: int, seed: int = 0) -> Path:
    """An explain output folder of n cells (random pixels; the page does not look at them)."""
    from cervical import files, gallery

    rng = np.random.default_rng(seed)
    (root / "overlays").mkdir(parents=True)
    records = []
    for i in range(n):
        names = {}
        for m in ("image",) + METHODS:
            names[m] = f"overlays/cell{i:05d}_{m.replace('+', 'p')}.png"
            files.save_png(root / names[m], rng.integers(0, 255, (110, 110, 3), dtype=np.uint8),
                           compress_level=1)
        t, p = rng.integers(0, len(CLASSES), 2)
        records.append({"kind": "correct" if t == p else "wrong", "index": i,
                        "confidence": float(rng.uniform(0.2, 1.0)), "name": f"cell{i:05d}.png",
                        "true_name": CLASSES[t], "pred_name": CLASSES[p], "files": names})
    (root / "cells.json").write_text(json.dumps({"context": "benchmark", "layer": "feat",
                                                 "cells": records}))
    maps = rng.random((n, 110, 110)).astype(np.float32)
    np.savez(root / "maps.npz", map_gradcam=maps, map_gradcam_pp=maps, map_layercam=maps,
             map_scorecam=maps, map_lime=maps)
    return gallery.write_explain_gallery(root, f"Explanations: {n} cells")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        raise SystemExit("needs Chromium and ChromeDriver (apt-get install chromium "
                         "chromium-driver) and selenium (pip install -e '.[test]')")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='cervical-bench-')}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=opts)


_TIME_CHANGE = """
const [id, value] = arguments;
const el = document.getElementById(id);
el.value = value;
const t = performance.now();
el.dispatchEvent(new Event('change'));
document.body.offsetHeight;                 // force the layout the change causes
return performance.now() - t;
"""

_TIME_DETAIL = """
const [id, done] = arguments;
const t = performance.now();
detail(id);                                 // reads grids/<id>.js
(function wait(){
  if (!document.querySelector('#detail table.grid')) return setTimeout(wait, 1);
  const ms = performance.now() - t;
  closeDetail();
  document.getElementById('detail').innerHTML = '';
  done(ms);
})();
"""


def measure(driver, page: Path, reps: int = 5) -> dict:
    opened, filtered, sorted_, detail = [], [], [], []
    for r in range(reps):
        driver.get(page.as_uri())
        opened.append(driver.execute_script(
            "const t = performance.timing; return t.loadEventEnd - t.navigationStart"))
        filtered.append(driver.execute_script(_TIME_CHANGE, "f-class", CLASSES[r % len(CLASSES)]))
        driver.execute_script(_TIME_CHANGE, "f-class", "all")
        sorted_.append(driver.execute_script(_TIME_CHANGE, "f-sort", "asc"))
        time.sleep(1.0)                        # a user clicks once the page has settled
        detail.append(driver.execute_async_script(_TIME_DETAIL, r))
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    if errors:
        raise SystemExit(f"console errors: {errors[:3]}")
    return {k: statistics.median(v) for k, v in
            (("open", opened), ("filter", filtered), ("sort", sorted_), ("detail", detail))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="100,500,1000,2000")
    p.add_argument("--out", default="outputs/gallery_bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sizes = [int(s) for s in args.cells.split(",")]
    pages = {n: explain_folder(out / f"cells_{n}", n) for n in sizes}
    driver = browser()
    try:
        print("| cells | index.html KB | open ms | filter ms | sort ms | detail ms | open ÷ open at "
              f"{sizes[0]} |")
        print("|---|---|---|---|---|---|---|")
        first = None
        for n in sizes:
            r = measure(driver, pages[n])
            first = first or r["open"]
            print(f"| {n} | {pages[n].stat().st_size / 1024:.0f} | {r['open']:.0f} | "
                  f"{r['filter']:.1f} | {r['sort']:.1f} | {r['detail']:.1f} | "
                  f"{r['open'] / first:.2f} |", flush=True)
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
