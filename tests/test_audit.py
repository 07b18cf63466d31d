"""cervical.audit: the leak statistics by hand, the study's own split, refusal, and a quick run."""

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cervical import audit, data

ROOT = Path(__file__).resolve().parents[1]


def _row(split, group, augmented="0"):
    return {"split": split, "group": group, "augmented": augmented}


def test_leak_stats_known_answer():
    """Groups A (train+test), B (val+test), C (test only), D (train only): test cells of A and B
    share a cluster image with train/val, C's do not; an augmented copy counts for nothing."""
    rows = [_row("train", "A"), _row("test", "A"), _row("test", "A"),
            _row("val", "B"), _row("test", "B"),
            _row("test", "C"), _row("test", "C"),
            _row("train", "D"), _row("train", "C", augmented="1")]
    s = audit.leak_stats(rows)
    assert s == {"test_cells": 5, "shared_test_cells": 3, "shared_fraction": 3 / 5, "groups": 4,
                 "groups_in_several_splits": 2}


def test_the_study_split_leaks_745_of_812_test_cells():
    """The study's exact membership (data/splits/thesis_split.csv): a cluster image is a (class,
    NNN) pair; 745 of its 812 test cells share one with train or val, 566 of 966 images span
    several splits (the counts read off the study's file lists, docs/study.md §1)."""
    with open(audit.THESIS_SPLIT_CSV, newline="") as fh:
        rows = [_row(r["split"], f"{r['class']}/{r['stem'].split('_')[0]}")
                for r in csv.DictReader(fh)]
    s = audit.leak_stats(rows)
    assert (s["test_cells"], s["shared_test_cells"]) == (812, 745)
    assert (s["groups"], s["groups_in_several_splits"]) == (966, 566)


def _sipakmed_without_clusters(root: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in data.SIPAKMED_CLASSES:
        folder = root / f"im_{c}"
        folder.mkdir(parents=True)
        for i in range(3):                                   # every cell its own cluster image
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                folder / f"{100 + i:03d}_01.bmp")


def test_refuses_data_without_cluster_groups(tmp_path, capsys):
    _sipakmed_without_clusters(tmp_path / "raw")
    with pytest.raises(audit.AuditError, match="no two cells share a cluster image"):
        audit.run_audit(audit.AuditConfig(data_dir=str(tmp_path / "raw"), dataset="sipakmed",
                                          out=str(tmp_path / "a"), **audit.QUICK))
    sys.path.insert(0, str(ROOT))
    import cli

    code = cli.main(["audit", "--dataset", "sipakmed", "--data-dir", str(tmp_path / "raw"),
                     "--out", str(tmp_path / "b"), "--quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--data-dir" in err[0]
    with pytest.raises(audit.AuditError, match="--folds"):
        audit.run_audit(audit.AuditConfig(folds=1, out=str(tmp_path / "c")))


@pytest.mark.slow
def test_quick_audit_writes_everything_and_resumes(tmp_path):
    cfg = audit.AuditConfig(out=str(tmp_path / "audit"), **audit.QUICK)
    result = audit.run_audit(cfg)
    out = tmp_path / "audit"
    for name in ("audit.json", "audit.md", "audit.png"):
        assert (out / name).is_file()
    assert json.loads((out / "audit.json").read_text())["runs"] == json.loads(
        json.dumps(result["runs"]))
    assert result["study_split"] == "thesis"              # 24 cells per class: not the 4049 names
    study, corrected = result["leak"]["study"], result["leak"]["corrected"]
    assert corrected["shared_test_cells"] == 0            # grouped: no cluster image shared
    assert study["shared_test_cells"] > 0
    # the leak counts are those of the prepared manifests
    for r in result["runs"]:
        assert r["leak"] == audit.leak_stats(data.read_manifest(r["prepared"]))
        assert r["by_leak"]["shared"]["n"] + r["by_leak"]["unshared"]["n"] == r["n"]
    # a second call trains nothing again: it reuses the finished runs
    stamp = {r["run"]: (Path(r["run"]) / "model.keras").stat().st_mtime_ns for r in result["runs"]}
    t0 = time.time()
    again = audit.run_audit(cfg)
    assert time.time() - t0 < 20
    assert {r["run"]: (Path(r["run"]) / "model.keras").stat().st_mtime_ns
            for r in again["runs"]} == stamp
    assert again["protocols"] == result["protocols"]
