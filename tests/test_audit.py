"""cervical.audit: the leak statistics and the leak design by hand, the decomposition's algebra,
the controls' verdicts, the study's own split, refusal, and a quick run."""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cervical import audit, data, metrics

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


def test_the_study_split_confounds_sharing_with_class():
    """Why the shared-vs-unshared contrast must be class-adjusted: under the study's split every
    unshared test cell is Dyskeratotic (20), Koilocytotic (22) or Metaplastic (25); every
    Parabasal and Superficial-Intermediate test cell is shared."""
    with open(audit.THESIS_SPLIT_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    held = {(r["class"], r["stem"].split("_")[0]) for r in rows if r["split"] != "test"}
    unshared = {}
    for r in rows:
        if r["split"] == "test" and (r["class"], r["stem"].split("_")[0]) not in held:
            unshared[r["class"]] = unshared.get(r["class"], 0) + 1
    assert unshared == {"Dyskeratotic": 20, "Koilocytotic": 22, "Metaplastic": 25}


def _toy_grouped_split():
    """Class 0: test clusters a (3 cells), b (3), c (5), d (5), e (2); class 1: f (4), g (4), h (3).
    Plus train clusters t0 (class 0) and t1 (class 1)."""
    sizes = {"a": (0, 3), "b": (0, 3), "c": (0, 5), "d": (0, 5), "e": (0, 2),
             "f": (1, 4), "g": (1, 4), "h": (1, 3)}
    labels, groups, assign = [], [], []
    for g, (c, n) in sizes.items():
        labels += [c] * n
        groups += [g] * n
        assign += ["test"] * n
    for g, c in (("t0", 0), ("t1", 1)):
        labels += [c] * 4
        groups += [g] * 4
        assign += ["train"] * 4
    return np.array(assign, dtype=object), np.array(labels), np.array(groups)


def test_randomise_leak_pairs_by_size_balanced_and_seeded():
    """With 2 cells moved, clusters need >= 3 test cells: e (2 cells) is ineligible. Class 0's
    eligible clusters sorted by size are (a, b | c, d): each pair gives one leaked and one held-out
    cluster, so class 0 has 2 + 2. Class 1 has f, g (size 4) paired, and h alone gets its own
    coin: 2 in one arm, 1 in the other. A leaked cluster has exactly 2 cells moved to train, a
    held-out one exactly 2 set aside (""), so both keep n - 2 test cells. Same seed, same design."""
    assign, labels, groups = _toy_grouped_split()
    out, design = data.randomise_leak(assign, labels, groups, moved=2, seed=5)
    leaked, held = set(design["leaked"]), set(design["held_out"])
    assert not leaked & held and "e" not in leaked | held
    assert len(leaked & set("abcd")) == 2 and len(held & set("abcd")) == 2
    assert len(leaked & {"a", "b"}) == 1 and len(leaked & {"c", "d"}) == 1   # pairs of equal size
    assert {len(leaked & set("fgh")), len(held & set("fgh"))} == {1, 2}
    assert len(leaked & {"f", "g"}) == 1
    for g in leaked:
        assert np.sum((groups == g) & (out == "train")) == 2
    for g in held:
        assert np.sum((groups == g) & (out == "")) == 2
        assert not np.any((groups == g) & (out == "train"))
    n_test = {g: int(np.sum((groups == g) & (out == "test"))) for g in leaked | held}
    assert n_test == {g: int(np.sum(groups == g)) - 2 for g in leaked | held}
    assert design["moved_cells"] == 2 * len(leaked) and design["set_aside_cells"] == 2 * len(held)
    again, design2 = data.randomise_leak(assign, labels, groups, moved=2, seed=5)
    assert design2 == design and list(again) == list(out)
    designs = {tuple(data.randomise_leak(assign, labels, groups, 2, seed=s)[1]["leaked"])
               for s in range(20)}
    assert len(designs) > 4                               # the coin really moves with the seed


def test_randomise_leak_refuses_a_cell_level_split():
    assign, labels, groups = _toy_grouped_split()
    assign[0] = "train"                                   # cluster a now spans train and test
    with pytest.raises(data.DataError, match="grouped split"):
        data.randomise_leak(assign, labels, groups, moved=2)
    with pytest.raises(data.DataError, match="--leak-cells 0"):
        data.randomise_leak(*_toy_grouped_split(), moved=0)


def _cells(arm, per_class):
    """Cells of one arm: {class: (right, total)}, one cluster per cell, cluster ids shared by arm
    index so that arms test the same cells."""
    out = []
    for c, (right, total) in per_class.items():
        out += [{"arm": arm, "class": c, "group": f"{c}{i}", "correct": int(i < right),
                 "exposure": "", "correct_bn": ""} for i in range(total)]
    return out


def test_decomposition_algebra_known_answer():
    """Balanced accuracies by hand (two classes of 4 cells): ours (2/4, 2/4) = 0.5; split alone
    (4/4, 2/4) = 0.75; preparation alone (2/4, 2/4) = 0.5; procedure alone (3/4, 2/4) = 0.625;
    study (4/4, 4/4) = 1. Effects: split +0.25, preparation 0, procedure +0.125, total +0.5, and
    the interaction total - sum of the three = 0.5 - 0.375 = +0.125. The preparation arm scores
    exactly ours' cells, so its interval is [0, 0]."""
    cells = (_cells("ours", {"A": (2, 4), "B": (2, 4)})
             + _cells("study-split", {"A": (4, 4), "B": (2, 4)})
             + _cells("study-prep", {"A": (2, 4), "B": (2, 4)})
             + _cells("study-procedure", {"A": (3, 4), "B": (2, 4)})
             + _cells("study", {"A": (4, 4), "B": (4, 4)}))
    e = audit._effects(audit.AuditConfig(n_boot=200), cells)["contrasts"]
    assert e["split alone"]["estimate"] == pytest.approx(0.25)
    assert e["procedure alone"]["estimate"] == pytest.approx(0.125)
    assert e["total (study - ours)"]["estimate"] == pytest.approx(0.5)
    assert e["interaction (total - sum of the three)"]["estimate"] == pytest.approx(0.125)
    prep = e["preparation alone"]
    assert (prep["estimate"], prep["low"], prep["high"]) == pytest.approx((0.0, 0.0, 0.0))


def test_leak_estimate_is_the_class_adjusted_contrast():
    """The audit's leak number is metrics.class_adjusted_difference (Mantel-Haenszel) of leaked
    vs held-out cells: class A leaked 3/4 vs held 1/4, class B leaked 1/2 vs held 1/2 -> MH weights
    4*4/8 = 2 and 2*2/4 = 1, estimate (2 * 0.5 + 1 * 0) / 3 = 1/3."""
    cells = []
    for c, kind, right, total in (("A", "leaked", 3, 4), ("A", "held_out", 1, 4),
                                  ("B", "leaked", 1, 2), ("B", "held_out", 1, 2)):
        cells += [{"arm": "leak", "class": c, "group": f"{c}{kind}{i}", "exposure": kind,
                   "correct": int(i < right), "correct_bn": ""} for i in range(total)]
    r = audit._exposure_contrast(cells, "leaked", "held_out", 300)
    assert r["estimate"] == pytest.approx(1 / 3)
    assert r["low"] <= r["estimate"] <= r["high"]


@pytest.mark.parametrize("leak, negative, expect", [
    ((0.02, 0.09), (-0.03, 0.04), (True, True, True)),
    ((-0.01, 0.09), (-0.03, 0.04), (False, True, False)),    # positive control not seen
    ((0.02, 0.09), (0.01, 0.04), (True, False, False)),      # a 'leak' where none can be
])
def test_control_verdicts(leak, negative, expect):
    cfg = audit.AuditConfig(synthetic="hard")
    c = audit._controls(cfg, {"low": leak[0], "high": leak[1]},
                        {"low": negative[0], "high": negative[1]})
    assert (c["positive"]["passed"], c["negative"]["passed"], c["passed"]) == expect
    real = audit._controls(audit.AuditConfig(data_dir="x", dataset="sipakmed"),
                           {"low": -0.1, "high": 0.2}, None)
    assert real == {"positive": None, "negative": None, "passed": None}


def test_plan_arms_one_at_a_time_and_factorial():
    names = [a.name for a in audit.plan_arms(audit.AuditConfig())]
    assert names == ["ours", "study-split", "study-prep", "study-procedure", "study", "leak",
                     "negative"]
    full = audit.plan_arms(audit.AuditConfig(factorial=True, controls=False))
    factors = {(a.split, a.preparation, a.procedure) for a in full if a.split != "leak"}
    assert len(factors) == 8 and [a.name for a in full][-1] == "leak"


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


def test_cli_exits_1_when_a_control_fails(tmp_path, monkeypatch, capsys):
    """A failed control is not bad input (2) but a result the reader must not trust: status 1,
    one line on stderr naming the report."""
    sys.path.insert(0, str(ROOT))
    import cli

    fake = {"controls": {"passed": False}}
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: fake)
    monkeypatch.setattr(audit, "format_audit", lambda r: "report")
    code = cli.main(["audit", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "control failed" in err[0]


#: The small audit the suite runs: 50 cells per class (about 60 cluster images per setting),
#: 24 px, at most 20 epochs, one seed per protocol arm, the leak design on 2 folds crossed.
SMALL = dict(per_class=50, size=24, augment=0, epochs=20, seeds=1, folds=2, n_boot=1000)


@pytest.mark.slow
def test_small_audit_controls_files_and_resume(tmp_path):
    """The whole audit at small scale: both controls, every file, the leak design's invariants,
    and a resume that trains nothing.

    Controls, measured with the leak design alone at this size (``decompose=False``), seeds 0-4
    of the generated cells and coins (2 CPU cores, tested versions):
        leak (positive control)   +53.1 [+36.4, +67.6], +34.5 [+19.7, +49.3], +50.7 [+33.6, +67.8],
                                  +36.6 [+21.3, +53.7], +35.6 [+21.2, +50.4] points
        negative control          -8.3 [-21.2, +5.6], +0.7 [-11.7, +12.0], +7.0 [-7.1, +19.0],
                                  -4.2 [-19.5, +12.7], +10.3 [-7.4, +27.1] points
    Asserted at seed 1: the leak's lower bound > 0 (lowest over the five seeds +19.7: margin 19.7
    points) and the negative interval covering 0 (over the five seeds its nearest bound was 5.6
    points from 0; at seed 1, 11.7). At this size the leak is large (few cells are easy to
    memorise) and the intervals wide; the full-size figures are in docs/audit.md."""
    cfg = audit.AuditConfig(out=str(tmp_path / "audit"), seed=1, **SMALL)
    result = audit.run_audit(cfg)
    assert result["leak"]["low"] > 0
    neg = result["negative_control"]
    assert neg["low"] <= 0 <= neg["high"]
    assert result["controls"]["passed"] is True
    out = tmp_path / "audit"
    for name in ("audit.json", "audit.md", "audit.png", "cells.csv"):
        assert (out / name).is_file()
    assert json.loads((out / "audit.json").read_text())["runs"] == json.loads(
        json.dumps(result["runs"]))
    assert result["study_split"] == "thesis"              # 50 cells per class: not the 4049 names
    counts = result["leak_counts"]
    assert counts["ours"]["shared_test_cells"] == 0       # grouped: no cluster image shared
    assert counts["study"]["shared_test_cells"] > 0
    with open(out / "cells.csv", newline="") as fh:
        cells = list(csv.DictReader(fh))
    for r in result["runs"]:
        assert r["leak"] == audit.leak_stats(data.read_manifest(r["prepared"]))
        assert sum(1 for c in cells if c["arm"] == r["arm"] and int(c["unit"]) == r["unit"]) == r["n"]
        design = data.read_info(r["prepared"]).get("leak_design")
        if r["arm"] in ("leak", "negative"):             # leaked clusters have train cells now
            rows = data.read_manifest(r["prepared"])
            train_groups = {x["group"] for x in rows if x["split"] == "train"}
            assert set(design["leaked"]) <= train_groups
            assert not set(design["held_out"]) & train_groups
            assert design["swapped"] == (r["unit"] >= cfg.folds)
        else:
            assert design is None
    # crossed: every leak-arm test cell scored once leaked and once held out
    leak_cells = [c for c in cells if c["arm"] == "leak" and c["exposure"]]
    kinds = {}
    for c in leak_cells:
        kinds.setdefault(c["path"].split("/", 1)[-1], []).append(c["exposure"])
    assert all(sorted(v) == ["held_out", "leaked"] for v in kinds.values())
    # the study-procedure protocol runs were re-scored with re-estimated BatchNorm statistics
    assert all(c["correct_bn"] != "" for c in cells if c["arm"] in ("study", "study-procedure"))
    assert all(c["correct_bn"] == "" for c in cells if c["arm"] in ("ours", "leak"))
    # the leak number is the class-adjusted contrast of the leak runs' cells
    direct = metrics.class_adjusted_difference(
        [int(c["correct"]) for c in leak_cells], [c["exposure"] == "leaked" for c in leak_cells],
        [c["class"] for c in leak_cells], [c["group"] for c in leak_cells], n=cfg.n_boot, seed=0)
    assert result["leak"]["estimate"] == pytest.approx(direct["estimate"])
    # a second call trains nothing again: it reuses the finished runs
    stamp = {r["run"]: (Path(r["run"]) / "model.keras").stat().st_mtime_ns for r in result["runs"]}
    again = audit.run_audit(cfg)
    assert {r["run"]: (Path(r["run"]) / "model.keras").stat().st_mtime_ns
            for r in again["runs"]} == stamp
    assert again["effects"] == result["effects"] and again["leak"] == result["leak"]
