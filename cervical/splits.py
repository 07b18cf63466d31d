"""Splits: the study's cell-level rule, its exact membership, grouped splits and folds, and the
randomised-leak design of the audit.

Every function returns one "train" / "val" / "test" label per cell (or "" for a cell set aside),
so ``cervical.data.prepare`` can write any of them the same way.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical.readers import DataError, Record

SPLITS = ("train", "val", "test")
#: The study's exact split membership (docs/study.md §1): data/splits/thesis_split.csv in the
#: repository, shipped inside the package (a link to that file) so an installed copy has it too.
THESIS_SPLIT_CSV = Path(__file__).with_name("thesis_split.csv")

# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------

def split_thesis(labels: Sequence[int], seed: int = 42, train: float = 0.8) -> np.ndarray:
    """The study's split: per class, ``train_test_split`` 80/20, then 80/20 of the remainder.

    Cell level (cells of one cluster image can land in train and test: the study's leak).
    Rows are taken in the given order (pass records sorted by file name for a filesystem-
    independent result; the study used unsorted glob order). On SIPaKMeD's counts this gives
    exactly 2589/648/812 (scikit-learn rounds the test share up).

    Returns:
        array of "train"/"val"/"test", one per label.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    out = np.empty(len(y), dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        trval, test = train_test_split(idx, train_size=train, test_size=1 - train, random_state=seed)
        tr, val = train_test_split(trval, train_size=train, test_size=1 - train, random_state=seed)
        out[tr], out[val], out[test] = "train", "val", "test"
    return out


def _grouped_fold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, fold: int = 0,
                  step: str = "the split", needed: Optional[int] = None
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """One fold of a stratified grouped K-fold of (y, groups): (other indices, fold indices).

    ``step`` names what is being cut (the test split, or the validation split of what the test
    split left) and ``needed`` the cells per class the whole dataset must have for it, so that the
    error says what is short where."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    smallest = int(np.unique(y, return_counts=True)[1].min())
    if n_groups < n_splits or smallest < n_splits:
        need = needed or n_splits
        raise DataError(f"--split grouped: {step} is a grouped {n_splits}-fold cut and needs at "
                        f"least {n_splits} groups and {n_splits} cells per class; it has {n_groups} "
                        f"groups and {smallest} cells in its smallest class. Use at least {need} "
                        f"images per class (and as many groups), or --split thesis")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (a, b) in enumerate(sgkf.split(np.zeros(len(y)), y, groups)):
        if k == fold:
            return a, b
    raise AssertionError("unreachable")


def _cell_level_val(labels: Sequence[int], seed: int, val: float = 0.2) -> np.ndarray:
    """Per class, ``train_test_split`` into train and val (val share ``val``), at cell level."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    out = np.full(len(y), "train", dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) >= 2:
            out[train_test_split(idx, test_size=val, random_state=seed)[1]] = "val"
    return out


def split_grouped(labels: Sequence[int], groups: Sequence[str], seed: int = 42,
                  test: float = 0.2, val: float = 0.2) -> np.ndarray:
    """Stratified split with no group (cluster image) in two splits.

    Test = one fold of a StratifiedGroupKFold with round(1/test) folds; val = one fold of the
    same on the remainder, so the shares approach the study's 64/16/20.
    """
    y, g = np.asarray(labels), np.asarray(groups)
    out = np.empty(len(y), dtype=object)
    k_test, k_val = int(round(1 / test)), int(round(1 / val))
    need = max(k_test, int(np.ceil(k_val / (1 - test))))       # the validation cut comes last
    rest, te = _grouped_fold(y, g, k_test, seed, step="the test split", needed=need)
    tr, va = _grouped_fold(y[rest], g[rest], k_val, seed, needed=need,
                           step="the validation split (of the cells the test split left)")
    out[te], out[rest[va]], out[rest[tr]] = "test", "val", "train"
    return out


def split_folds(labels: Sequence[int], groups: Sequence[str], k: int, seed: int = 42,
                val: float = 0.2) -> List[np.ndarray]:
    """Grouped stratified K-fold: fold i tests on group-fold i, validates on a grouped 20 % of the rest."""
    if k < 2:
        raise DataError(f"--folds {k}: need at least 2 folds (or 0 for a single split)")
    y, g = np.asarray(labels), np.asarray(groups)
    out = []
    k_val = int(round(1 / val))
    need = max(k, int(np.ceil(k_val / (1 - 1 / k))))
    for i in range(k):
        rest, te = _grouped_fold(y, g, k, seed, fold=i, step=f"the {k}-fold split", needed=need)
        tr, va = _grouped_fold(y[rest], g[rest], k_val, seed, needed=need,
                               step=f"fold {i}'s validation split (of its training cells)")
        s = np.empty(len(y), dtype=object)
        s[te], s[rest[va]], s[rest[tr]] = "test", "val", "train"
        out.append(s)
    return out


def randomise_leak(assign: np.ndarray, labels: Sequence[int], groups: Sequence[str], moved: int,
                   seed: int = 42, fold: int = 0, swap: bool = False) -> Tuple[np.ndarray, dict]:
    """The randomised-leak design: a grouped split in which half the test cluster images leak.

    The question it answers: how much more accurate is a model on cells whose cluster image gave
    it training cells (the study's leak), everything else equal? Starting from a grouped split
    (no cluster image in two splits), in every class the test cluster images with more than
    ``moved`` test cells are sorted by size and taken in pairs of neighbours; a coin decides which
    of each pair is "leaked" (``moved`` of its cells, drawn at random, move to train) and which is
    "held out" (``moved`` of its cells are set aside, in no split, so both arms keep the same
    number of test cells per cluster). An odd cluster left over gets its own coin. One model
    then sees both kinds, and the accuracy on the remaining test cells of leaked against held-out
    clusters, class by class, is the leak: same model, same procedure, same preparation, same
    cluster sizes and class mix on both sides, only the leak differs. Test clusters with too few
    cells stay in test outside both arms.

    ``swap=True`` gives the crossover: the same draw (pairs, coins, and which cells of each cluster
    move or are set aside) with the two arms exchanged. A model trained on the swapped design sees
    the other half leak, so every remaining test cell is scored once leaked and once held out,
    and cluster-to-cluster differences in difficulty cancel from the paired comparison.

    Args:
        assign: (N,) "train" / "val" / "test" of a grouped split (no group in two splits).
        labels: (N,) class labels.
        groups: (N,) cluster-image ids.
        moved: cells per leaked cluster moved to train (and per held-out cluster set aside), >= 1.
        seed, fold: the draw is ``default_rng([seed, 7, fold])``: same arguments, same design.
        swap: exchange the leaked and held-out clusters of that draw (the crossover).
    Returns:
        (new assignment with "" for cells set aside, {"moved", "leaked": [group, ...],
        "held_out": [group, ...], "moved_cells": n, "set_aside_cells": n}).
    Raises:
        DataError: moved < 1, or a group in two splits (not a grouped split).
    """
    if moved < 1:
        raise DataError(f"--leak-cells {moved}: must be 1 or more (0 = no leak design)")
    y, g = np.asarray(labels), np.asarray(groups)
    out = np.asarray(assign, dtype=object).copy()
    splits_of: Dict[str, set] = {}
    for gi, si in zip(g.tolist(), out.tolist()):
        splits_of.setdefault(gi, set()).add(si)
    if any(len(v) > 1 for v in splits_of.values()):
        raise DataError("--leak-cells: needs a grouped split (a cluster image is in two splits); "
                        "use --split grouped")
    rng = np.random.default_rng([seed, 7, fold])
    leaked, held = [], []
    for c in np.unique(y):
        test_groups, sizes = np.unique(g[(out == "test") & (y == c)], return_counts=True)
        eligible = test_groups[sizes > moved]
        size = sizes[sizes > moved]
        order = rng.permutation(len(eligible))              # random tie order, then by size
        order = order[np.argsort(size[order], kind="stable")]
        for i in range(0, len(order), 2):
            pair = [eligible[j] for j in order[i:i + 2]]
            if len(pair) == 2 and rng.random() < 0.5:
                pair.reverse()
            if len(pair) == 1 and rng.random() < 0.5:
                held.append(pair[0])
                continue
            leaked.append(pair[0])
            held.extend(pair[1:])
    chosen = {grp: rng.choice(np.flatnonzero((g == grp) & (out == "test")), size=moved,
                              replace=False) for grp in sorted(leaked + held)}
    if swap:
        leaked, held = held, leaked
    for group_list, target in ((leaked, "train"), (held, "")):
        for grp in group_list:
            out[chosen[grp]] = target
    design = {"moved": int(moved), "leaked": sorted(map(str, leaked)),
              "held_out": sorted(map(str, held)), "moved_cells": int(moved * len(leaked)),
              "set_aside_cells": int(moved * len(held)), "swapped": bool(swap)}
    return out, design


#: A class or stem name in a split manifest: no path separators, no "..", nothing hidden.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*")


def split_from_manifest(records: Sequence[Record], csv_path: os.PathLike) -> np.ndarray:
    """Exact split membership from a CSV with columns ``split,class,stem`` (the study's own:
    data/splits/thesis_split.csv). Class is the folder class (SIPaKMeD name without "im_").

    Raises:
        DataError: unreadable CSV, missing columns, an image the CSV does not list, or CSV rows
            without an image.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataError(f"--split manifest:{csv_path}: cannot read ({type(exc).__name__}); "
                        f"check the path") from None
    if not rows or not {"split", "class", "stem"} <= set(rows[0]):
        raise DataError(f"--split manifest:{csv_path}: needs columns split,class,stem")
    table: Dict[Tuple[str, str], str] = {}
    for lineno, r in enumerate(rows, 2):
        key = (r["class"], r["stem"])
        if not _SAFE_NAME.fullmatch(str(r["stem"])) or not _SAFE_NAME.fullmatch(str(r["class"])):
            raise DataError(f"--split manifest:{csv_path}:{lineno}: {r['class']}/{r['stem']!r} is "
                            f"not a plain class and file stem (no paths); fix the CSV")
        if key in table:
            raise DataError(f"--split manifest:{csv_path}:{lineno}: duplicate row for "
                            f"{key[0]}/{key[1]}; list every cell once")
        table[key] = r["split"]
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise DataError(f"{csv_path}: unknown split value {bad[0]!r}; use train, val or test")
    out = np.empty(len(records), dtype=object)
    seen = set()
    for i, r in enumerate(records):
        key = (r.source_class, r.stem)
        if key not in table:
            raise DataError(f"--split manifest:{csv_path}: {r.path} is not listed; the CSV does not "
                            f"describe this dataset (use --split grouped or thesis)")
        out[i] = table[key]
        seen.add(key)
    missing = [k for k in table if k not in seen]
    if missing:
        raise DataError(f"--split manifest:{csv_path}: {len(missing)} listed cells have no image "
                        f"(first: {missing[0][0]}/{missing[0][1]}); point --data-dir at the full dataset")
    return out


def resolve_split_spec(spec: str) -> Tuple[str, Optional[Path]]:
    """'grouped' | 'thesis' | 'manifest:FILE' | 'manifest:thesis' -> (kind, csv path)."""
    if spec in ("grouped", "thesis"):
        return spec, None
    if spec.startswith("manifest:"):
        target = spec.split(":", 1)[1]
        if target == "thesis":
            return "manifest", THESIS_SPLIT_CSV
        if not Path(target).is_file():
            raise DataError(f"--split {spec}: file not found; give manifest:PATH.csv with columns "
                            f"split,class,stem")
        return "manifest", Path(target)
    raise DataError(f"--split {spec}: unknown; choose grouped, thesis or manifest:FILE.csv")
