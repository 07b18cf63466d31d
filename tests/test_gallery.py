"""cervical.gallery: the raw-map grid and the Markdown by hand, and the explanation gallery in a
real headless browser (Chromium from the system, driven by Selenium).

The browser test builds a gallery from hand-made explain output (no model): 7 cells whose true
classes and kinds are known, so every filter's count is known. It runs wherever Chromium,
ChromeDriver and Selenium are installed (.ci/run installs them) and skips with one line elsewhere.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cervical import files, gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def test_map_grid_block_means_by_hand():
    """A 4 x 4 map in 2 x 2 blocks: each value is its block's mean."""
    a = np.arange(16, dtype=float).reshape(4, 4)
    assert gallery.map_grid(a, side=2) == [[2.5, 4.5], [10.5, 12.5]]
    assert gallery.map_grid(np.ones((3, 5)), side=16) == [[1.0] * 5] * 3   # smaller than the grid


def test_markdown_html_known_output():
    md = "# Title\n\n| a | b |\n|---|---|\n| **1** | `x` |\n\n- one\n- two\n\n![fig](f.png)"
    out = gallery.markdown_html(md)
    assert "<h1>Title</h1>" in out
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td><b>1</b></td><td><code>x</code></td></tr></table>" in out
    assert "<ul><li>one</li><li>two</li></ul>" in out
    assert '<img src="f.png" alt="fig" loading="lazy">' in out
    assert "<p>a &lt;b&gt;</p>" in gallery.markdown_html("a <b>")               # escaped


#: The hand-made cells: (true class, predicted class, kind, confidence).
CELLS = [("A", "A", "correct", 0.99), ("A", "B", "wrong", 0.70), ("B", "B", "correct", 0.95),
         ("B", "B", "correct", 0.60), ("B", "A", "wrong", 0.55), ("C", "C", "correct", 0.90),
         ("C", "A", "wrong", 0.80)]
METHODS = ("gradcam", "gradcam++", "lime_pros_cons")


def _explain_folder(root: Path, cells=None) -> Path:
    rng = np.random.default_rng(0)
    cells = CELLS if cells is None else cells
    (root / "overlays").mkdir(parents=True)
    records, maps = [], []
    for i, (t, p, kind, conf) in enumerate(cells):
        names = {}
        for m in ("image",) + METHODS:
            names[m] = f"overlays/cell{i}_{m}.png"
            files.save_png(root / names[m], rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        records.append({"kind": kind, "index": i, "confidence": conf, "name": f"img{i}.png",
                        "true_name": t, "pred_name": p, "files": names})
        maps.append(rng.random((32, 32)))
    (root / "cells.json").write_text(json.dumps({"context": "test split", "layer": "feat",
                                                 "cells": records}))
    np.savez(root / "maps.npz", map_gradcam=np.array(maps), map_gradcam_pp=np.array(maps),
             map_lime=np.array(maps))               # explain's keys: slugs, one LIME map
    (root / "xai_metrics.md").write_text("# XAI evaluation\n\n| method | score |\n|---|---|\n"
                                         "| gradcam | 0.5 |\n")
    gallery.write_explain_gallery(root, "Explanations: test")
    return root / "index.html"


def _missing(reason: str):
    """Skip with one line, except in CI (CERVICAL_REQUIRE_BROWSER=1), where the test must run."""
    if os.environ.get("CERVICAL_REQUIRE_BROWSER"):
        pytest.fail(f"CERVICAL_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    if not CHROMIUM or not CHROMEDRIVER:
        _missing("no Chromium/ChromeDriver on this machine (apt-get install chromium "
                 "chromium-driver); .ci/run installs them")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='cervical-chromium-')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _count(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('.cell')].filter(e => e.style.display !== 'none').length")


def test_gallery_in_a_real_browser(browser, tmp_path):
    """Loads with no console error; every image decodes (natural width > 0 once loaded);
    each filter shows exactly the cells it should; sorting orders by confidence; a click shows
    every map of the cell with its raw-value grid; a screenshot is written."""
    from selenium.webdriver.support.ui import Select, WebDriverWait

    page = _explain_folder(tmp_path / "explain")
    browser.get(page.as_uri())
    assert browser.title == "Explanations: test"
    assert _count(browser) == len(CELLS)
    browser.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager')")
    browser.execute_async_script(
        "const done = arguments[0]; const imgs = [...document.images];"
        "Promise.all(imgs.map(i => i.complete ? 0 : new Promise(r => {i.onload = i.onerror = r;})))"
        ".then(() => done())")
    widths = browser.execute_script("return [...document.images].map(i => i.naturalWidth)")
    assert len(widths) == len(CELLS) * (1 + len(METHODS)) and min(widths) > 0
    klass, kind = Select(browser.find_element("id", "f-class")), Select(browser.find_element("id", "f-kind"))
    for value, want in (("A", 2), ("B", 3), ("C", 2)):
        klass.select_by_value(value)
        assert _count(browser) == want, value
    klass.select_by_value("all")
    for value, want in (("correct", 4), ("wrong", 3)):
        kind.select_by_value(value)
        assert _count(browser) == want, value
    klass.select_by_value("B")
    assert _count(browser) == 1                                   # B and misclassified
    kind.select_by_value("all")
    klass.select_by_value("all")
    Select(browser.find_element("id", "f-sort")).select_by_value("asc")
    shown = browser.execute_script(
        "return [...document.querySelectorAll('.cell')].filter(e => e.style.display !== 'none')"
        ".map(e => e.id)")
    assert shown == [f"cell-{i}" for i in np.argsort([c[3] for c in CELLS], kind="stable")]
    assert '"grid":[[' not in page.read_text() and sorted(
        p.name for p in (page.parent / "grids").iterdir()) == [f"{i}.js" for i in range(len(CELLS))]
    browser.find_element("id", "cell-2").click()                 # grids/2.js is read now
    WebDriverWait(browser, 10).until(
        lambda d: d.find_elements("css selector", "#detail table.grid"))
    detail = browser.find_element("id", "detail")
    assert detail.is_displayed() and "img2.png" in detail.text
    assert len(detail.find_elements("css selector", "table.grid")) == len(METHODS)  # every map
    assert len(detail.find_elements("css selector", "table.grid td")) == len(METHODS) * 16 * 16
    with np.load(page.parent / "maps.npz") as z:                 # cell 2's Grad-CAM, block (0, 1)
        want = gallery.map_grid(z["map_gradcam"][2])[0][1]
    first = detail.find_elements("css selector", "table.grid")[0]
    assert first.find_elements("css selector", "td")[1].get_attribute("title") == f"{want:.3f}"
    assert "XAI evaluation" in browser.page_source
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    shot = tmp_path / "gallery.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_gallery_draws_cards_a_page_at_a_time(browser, tmp_path):
    """130 cells: the page draws the first 120 of the current order, says "130 of 130 cells",
    and "show more" draws the last 10; a filter starts again from its first page."""
    cells = [("A" if i % 2 else "B", "A", "correct" if i % 2 else "wrong", (i + 1) / 131)
             for i in range(130)]
    page = _explain_folder(tmp_path / "explain", cells)
    browser.get(page.as_uri())
    assert _count(browser) == 120
    assert browser.find_element("id", "count").text == "130 of 130 cells"
    first = browser.execute_script("return document.querySelector('.cell').id")
    assert first == "cell-129"                                    # most confident first
    browser.execute_script("document.getElementById('more').click()")
    assert _count(browser) == 130
    assert not browser.find_element("id", "more").is_displayed()
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element("id", "f-class")).select_by_value("A")
    assert _count(browser) == 65 and browser.find_element("id", "count").text == "65 of 130 cells"
