"""Shared fixtures: small prepared datasets built from arrays, fast enough for every test file."""

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest

#: The Herlev sample of real cells (docs/study.md §8), read in place, never copied: the folder named
#: by $CERVICAL_HERLEV_SAMPLE, else ../shared/data/herlev_sample beside the checkout.
HERLEV = Path(os.environ.get("CERVICAL_HERLEV_SAMPLE")
              or Path(__file__).resolve().parents[2] / "shared" / "data" / "herlev_sample")

#: Mark for the tests that need the Herlev sample (skipped, with the reason, when it is absent).
requires_herlev = pytest.mark.skipif(not HERLEV.is_dir(), reason=f"Herlev sample not found at {HERLEV} "
                                     f"(set CERVICAL_HERLEV_SAMPLE)")


def make_blob_cells(n_per_class=(12, 12, 12), size=32, seed=0):
    """Toy cells: a pale disc (cytoplasm) with a dark nucleus whose radius and shape set the class.

    Class 0: small round nucleus; class 1: large round nucleus; class 2: two small nuclei.
    Returns (x uint8 (N,size,size,3), y int64 (N,), masks uint8 (N,size,size) 0/1/2).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    xs, ys, ms = [], [], []
    for c, n in enumerate(n_per_class):
        for _ in range(n):
            cy, cx = size / 2 + rng.uniform(-2, 2, 2)
            r_cell = size * rng.uniform(0.36, 0.44)
            cell = (yy - cy) ** 2 + (xx - cx) ** 2 <= r_cell ** 2
            if c == 2:
                nuc = np.zeros_like(cell)
                for dx in (-0.16, 0.16):
                    nuc |= (yy - cy) ** 2 + (xx - cx - dx * size) ** 2 <= (size * 0.08) ** 2
            else:
                r_nuc = size * (0.09 if c == 0 else 0.2) * rng.uniform(0.9, 1.1)
                nuc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r_nuc ** 2
            img = np.full((size, size, 3), 225.0) + rng.normal(0, 6, (size, size, 3))
            img[cell] = np.array([200.0, 160.0, 190.0]) + rng.normal(0, 6, (int(cell.sum()), 3))
            img[nuc] = np.array([70.0, 40.0, 110.0]) + rng.normal(0, 6, (int(nuc.sum()), 3))
            mask = np.zeros((size, size), np.uint8)
            mask[cell] = 1
            mask[nuc] = 2
            xs.append(np.clip(img, 0, 255).astype(np.uint8))
            ys.append(c)
            ms.append(mask)
    return np.stack(xs), np.array(ys, np.int64), np.stack(ms)


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """A prepared folder (cervical.data layout) of 32x32 toy cells, 3 classes, with masks."""
    from cervical import data

    out = tmp_path_factory.mktemp("tiny_prepared")
    splits = {}
    for i, (split, n) in enumerate((("train", 16), ("val", 6), ("test", 6))):
        x, y, m = make_blob_cells((n, n, n), seed=i)
        splits[split] = dict(x=x, y=y, masks=m,
                             groups=[f"{split}-{j // 2}" for j in range(len(y))])
    data.write_prepared(out, splits, ["small_nucleus", "big_nucleus", "two_nuclei"],
                        info={"dataset": "toy", "task": "toy3", "split": "grouped", "seed": 0,
                              "fingerprint": "toy"})
    return out


# ------------------------------------------------------------------------------------------------
# Suite-level guard: with TensorFlow installed (a dependency), no test file may be skipped wholesale
# ------------------------------------------------------------------------------------------------
_OUTCOMES: dict = {}
_SKIPPED_FILES: list = []


def pytest_collectreport(report):
    """A test file skipped at import (a module-level skip or importorskip)."""
    if report.skipped and report.nodeid.endswith(".py"):
        _SKIPPED_FILES.append(report.nodeid)


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        path = report.nodeid.split("::")[0]
        _OUTCOMES.setdefault(path, set()).add(report.outcome)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a test file ran nothing but skips (or was skipped at import) although
    TensorFlow is installed: a silent skip of a module that always exists hides failures."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        return
    filtered = session.config.option.keyword or session.config.option.markexpr
    wholesale = sorted(set(_SKIPPED_FILES) | {f for f, o in _OUTCOMES.items() if o == {"skipped"}})
    if wholesale and not filtered:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"ERROR: test files skipped wholesale with TensorFlow installed: {', '.join(wholesale)}",
            red=True)
        session.exitstatus = 1
