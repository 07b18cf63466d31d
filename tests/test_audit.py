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


def test_intervals_over_seeds_known_answer():
    """Student's t-interval with n - 1 = 2 degrees of freedom, derived by hand: the t CDF with 2
    degrees of freedom is 1/2 + t / (2 sqrt(2 + t^2)), so its 97.5 % quantile solves
    t / sqrt(2 + t^2) = 0.95, i.e. t^2 = 2 * 0.9025 / 0.0975 (t = 4.3027). Accuracies 0.6, 0.7,
    0.8 (mean 0.7, sd 0.1) give 0.7 -+ t * 0.1 / sqrt(3). The study-minus-corrected difference is
    paired by seed: against 0.5, 0.5, 0.5 it is 0.1, 0.2, 0.3, the same half-width around 0.2."""
    t975 = np.sqrt(2 * 0.9025 / 0.0975)
    half = t975 * 0.1 / np.sqrt(3)
    runs = []
    for k, (study, corrected) in enumerate(zip((0.6, 0.7, 0.8), (0.5, 0.5, 0.5))):
        for protocol, acc in (("study", study), ("corrected", corrected)):
            runs.append({"protocol": protocol, "seed": k, "accuracy": acc, "macro_f1": acc,
                         "leak": {}, "by_leak": {"shared": {"accuracy": acc},
                                                 "unshared": {"accuracy": acc - 0.2}}})
    s = audit._summarise(audit.AuditConfig(), runs, "manifest:thesis")
    study = s["protocols"]["study"]["accuracy"]
    assert study["mean"] == pytest.approx(0.7)
    assert (study["low"], study["high"]) == pytest.approx((0.7 - half, 0.7 + half), abs=1e-12)
    diff = s["difference_study_minus_corrected"]["accuracy"]
    assert (diff["mean"], diff["low"], diff["high"]) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    corrected = s["protocols"]["corrected"]["accuracy"]
    assert (corrected["low"], corrected["high"]) == pytest.approx((0.5, 0.5))   # no spread
    gap = s["study_shared_vs_unshared"]["difference"]
    assert (gap["mean"], gap["low"], gap["high"]) == pytest.approx((0.2, 0.2, 0.2))
    assert audit._t_interval([0.4]) == {"mean": 0.4, "low": None, "high": None, "n": 1}
    assert audit._t_interval([None])["mean"] is None


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
