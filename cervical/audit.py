"""``audit``: how much of a reported accuracy is the study's protocol, and how much is the leak?

The study reported 97.29 % on a test set of which 745 of 812 cells came from cluster images that
also gave cells to training or validation (docs/study.md §1). Its protocol differs from a sound one
in several ways at once: the split (cell level), the preparation (stretch, nearest, raw-crop BGR
augmentation with black gaps, JPEG), and the training procedure (its model variant with raw 0-255
input, the last epoch kept, no re-estimated BatchNorm statistics, early stopping on a leaky
validation set, test-label class weights). Comparing "study" with "ours" bundles all of them, and
the test cells differ too. So the audit asks three separate questions, each with an interval:

1. **The leak, isolated** (randomised-leak design, ``data.randomise_leak``): a grouped K-fold
   split in which, class by class, half the test cluster images (chosen by coin within pairs of
   equal size) give ``leak_cells`` of their cells to training and the other half set as many
   aside. One model sees both kinds; its accuracy on the remaining test cells of leaked against
   held-out clusters, Mantel-Haenszel-adjusted for class, is the leak. Each fold is also run
   crossed (the other half leaks, the same cells moved or set aside), so every remaining test
   cell is scored once leaked and once held out and the cluster bootstrap keeps the two paired:
   differences in difficulty between cluster images cancel. Same model, preparation,
   procedure, cluster sizes and class mix on both sides. What a leak is worth depends on how far
   training memorises the training cluster images, so the design trains with the study's
   procedure by default, validation split at cell level included (``leak_procedure="ours"``: a
   grouped validation split and our best validation epoch).
2. **The protocol gap, decomposed**: arms that move one factor at a time from our protocol to the
   study's (split; preparation; procedure), the study's full protocol, and with ``factorial`` all
   eight combinations. Effects are differences of class-balanced accuracy (mean per-class
   recall, so a test set's class mix cannot pose as an effect), every arm pooled over its seeds.
3. **Inside the study's protocol**, test cells whose cluster image also gave training or
   validation cells ("shared") against the others, adjusted for class (Mantel-Haenszel over the
   classes that have both kinds: under the study's split every Parabasal and
   Superficial-Intermediate test cell is shared, so a raw comparison mostly measures class mix).
   The study's test cells are fixed: their interval resamples cluster images, not seeds.

Controls: the randomised-leak design is also run on a **negative-control** set (the synthetic hard
classes with every cluster image under the same imaging conditions, ``synthetic.Difficulty``
"hard-uniform", where knowing a cluster image teaches nothing about its other cells): its
interval must cover 0. On the synthetic hard set the leak exists by construction, so its interval
above 0 is the **positive control** (the design has the power to see a leak). A failed control is
reported in audit.md and ``run_audit`` returns with ``result["controls"]["passed"]`` False (the
command line then exits with status 1).

Also tested: whether re-estimating the BatchNorm statistics of the study-procedure runs on their
final weights (``fitting.PreciseBatchNorm``) changes their accuracy (same cells, before vs after).

Every interval is a percentile cluster bootstrap (``metrics``), resampling cluster images within
classes jointly across runs, so the same cell tested by several seeds or arms stays paired.
Training randomness enters through the pooled seeds and folds but is not itself resampled; the
per-run numbers are in audit.json to show its size. Finished steps are kept, so an interrupted
audit resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import data, files, metrics, options, protocol

__all__ = ["AuditError", "AuditConfig", "Arm", "ARMS", "QUICK", "run_audit", "leak_stats",
           "format_audit", "plan_arms", "departures", "THESIS_SPLIT_CSV"]

#: The study's exact split membership (one home: cervical.data).
THESIS_SPLIT_CSV = data.THESIS_SPLIT_CSV

#: The small settings of ``--quick`` (the test suite's smoke run).
QUICK = {"per_class": 24, "size": 32, "augment": 0, "epochs": 2, "seeds": 1, "folds": 2,
         "n_boot": 100}


class AuditError(ValueError):
    """Bad input to ``audit``; the message is one line naming the input and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of preparing and training: which split, whose preparation, whose procedure.

    Attributes:
        name: folder-safe id.
        title: what the arm is, in words.
        split: "study" (its exact membership, cell level), "grouped" (no cluster image in two
            splits) or "leak" (grouped K-fold with the randomised-leak design).
        preparation: "study" (prepare --variant thesis: stretch, nearest, raw-crop BGR
            augmentation with black gaps, JPEG 95) or "ours".
        procedure: "study" (train --variant thesis: its model variant with raw input, the last
            epoch, no PreciseBN, its callbacks, test-label class weights) or "ours".
        negative: trained on the negative-control data.
    """

    name: str
    title: str
    split: str
    preparation: str = "ours"
    procedure: str = "ours"
    negative: bool = False


def _factor_arm(split: bool, prep: bool, proc: bool) -> Arm:
    parts = [w for w, on in (("split", split), ("prep", prep), ("procedure", proc)) if on]
    name = "ours" if not parts else "study" if len(parts) == 3 else "study-" + "+".join(parts)
    words = {"split": "split", "prep": "preparation", "procedure": "procedure"}
    title = ("our protocol" if not parts else "the study's protocol" if len(parts) == 3
             else "ours with the study's " + " and ".join(words[p] for p in parts))
    return Arm(name, title, "study" if split else "grouped", "study" if prep else "ours",
               "study" if proc else "ours")


#: Every arm the audit knows: the 2 x 2 x 2 factorial of (split, preparation, procedure), the
#: randomised-leak design, and the same design on the negative-control data.
ARMS: Dict[str, Arm] = {a.name: a for a in (
    [_factor_arm(s, p, q) for s in (False, True) for p in (False, True) for q in (False, True)]
    + [Arm("leak", "randomised leak (grouped K-fold, half the test clusters leak)", "leak"),
       Arm("negative", "randomised leak on the negative-control data", "leak", negative=True)])}

ONE_AT_A_TIME = ("ours", "study-split", "study-prep", "study-procedure", "study")

#: An arm's "study" / "ours" factor levels are the two protocols of cervical.protocol.
PROTOCOL_OF = {"study": protocol.STUDY, "ours": protocol.OURS}


#: The arguments of one audit, each declared once with its flag, help and range
#: (cervical.options.AuditConfig): ``cli.py audit`` is built from it.
AuditConfig = options.AuditConfig


# ------------------------------------------------------------------------------------------------
# The leak, from a prepared dataset's manifest
# ------------------------------------------------------------------------------------------------

def _originals(rows: Sequence[dict]) -> List[dict]:
    """Rows of original cells (augmented copies are the training cell again)."""
    return [r for r in rows if str(r.get("augmented", "0")) in ("0", "False", "false", "")]


def leak_stats(rows: Sequence[dict]) -> dict:
    """How much of the test split shares cluster images with training or validation.

    Args:
        rows: manifest rows with "split", "group" and (optionally) "augmented" columns.
    Returns:
        {"test_cells", "shared_test_cells", "shared_fraction", "groups",
         "groups_in_several_splits"}: a test cell is shared when its group (cluster image) also
        has a training or validation cell.
    """
    originals = _originals(rows)
    seen: Dict[str, set] = {}
    for r in originals:
        seen.setdefault(r["group"], set()).add(r["split"])
    test = [r for r in originals if r["split"] == "test"]
    shared = sum(1 for r in test if seen[r["group"]] & {"train", "val"})
    return {"test_cells": len(test), "shared_test_cells": shared,
            "shared_fraction": shared / len(test) if test else None, "groups": len(seen),
            "groups_in_several_splits": sum(1 for s in seen.values() if len(s) > 1)}


def _exposure(prepared: Path, rows: Sequence[dict]) -> Dict[str, str]:
    """{test image path: "leaked" / "held_out" (leak design), "shared" / "unshared" (others)}."""
    design = data.read_info(prepared).get("leak_design")
    originals = _originals(rows)
    if design:
        kind = {**{g: "held_out" for g in design["held_out"]},
                **{g: "leaked" for g in design["leaked"]}}
        return {r["path"]: kind.get(r["group"], "") for r in originals if r["split"] == "test"}
    held = {r["group"] for r in originals if r["split"] in ("train", "val")}
    return {r["path"]: "shared" if r["group"] in held else "unshared"
            for r in originals if r["split"] == "test"}


# ------------------------------------------------------------------------------------------------
# The plan: which arms, which units (seeds or folds)
# ------------------------------------------------------------------------------------------------

def plan_arms(cfg: AuditConfig) -> List[Arm]:
    """The arms an audit trains, in order."""
    names = [n for n in ARMS if n not in ("leak", "negative")] if cfg.factorial \
        else list(ONE_AT_A_TIME)
    names = names if cfg.decompose else []
    names.append("leak")
    if cfg.controls:
        names.append("negative")
    return [dataclasses.replace(ARMS[n], procedure=cfg.leak_procedure) if ARMS[n].split == "leak"
            else ARMS[n] for n in names]


def _units(cfg: AuditConfig, arm: Arm) -> int:
    """Runs of an arm: seeds, or 2 K for the leak design (K folds, then the K crossed folds)."""
    return 2 * cfg.folds if arm.split == "leak" else cfg.seeds


def run_audit(config: AuditConfig, progress: Optional[files.Progress] = None,
              say: Callable[[str], None] = lambda line: None) -> dict:
    """Run (or resume) an audit and write OUT/audit.json, audit.md, audit.png and cells.csv.

    Returns:
        the audit.json content.
    Raises:
        AuditError: bad arguments, or data without cluster groups (nothing to leak).
        cervical.data.DataError, cervical.train.TrainError: from the steps.
    """
    cfg = _check(config)
    with files.output_lock(cfg.out):
        return _run(cfg, progress, say)


def _run(cfg: AuditConfig, progress, say) -> dict:
    out = Path(cfg.out)
    raw, study_split = _raw_data(cfg, out, say)          # refuses bad data before writing
    out.mkdir(parents=True, exist_ok=True)
    negative_raw = _negative_data(cfg, out, say) if cfg.controls else None
    arms = plan_arms(cfg)
    total = sum(_units(cfg, a) for a in arms)
    runs: List[dict] = []
    cells: List[dict] = []
    for arm in arms:
        for k in range(_units(cfg, arm)):
            files.report_progress(progress, "audit: runs", len(runs), total)
            source = negative_raw if arm.negative else raw
            prepared = _prepare(cfg, source, arm, k, study_split, out, say)
            run = _train(cfg, prepared, arm, k, out, say)
            record, rows = _evaluate(cfg, run, prepared, arm, k)
            runs.append(record)
            cells.extend(rows)
    files.report_progress(progress, "audit: runs", len(runs), total)
    result = _summarise(cfg, runs, cells, study_split)
    files.write_csv(out / "cells.csv", CELL_COLUMNS, [[c[k] for k in CELL_COLUMNS] for c in cells])
    files.write_json(out / "audit.json", result)
    files.write_text(out / "audit.md", format_audit(result))
    files.save_figure(_forest(result), out / "audit.png", dpi=120)
    return result


def _check(config: AuditConfig) -> AuditConfig:
    cfg = dataclasses.replace(config)
    if cfg.dataset not in ("sipakmed", "synthetic"):
        raise AuditError(f"--dataset {cfg.dataset}: audit needs SIPaKMeD-layout data (cluster "
                         f"images in the file names); choose sipakmed or synthetic")
    if cfg.dataset == "sipakmed" and not cfg.data_dir:
        raise AuditError("--data-dir: required with --dataset sipakmed (the unpacked SIPaKMeD)")
    options.check(cfg, AuditError)             # every declared choice and range
    return cfg


def _raw_data(cfg: AuditConfig, out: Path, say) -> tuple:
    """(raw folder, the study's split spec): generated synthetic cells or --data-dir."""
    if cfg.data_dir:
        raw = Path(cfg.data_dir)
        records = data.READERS[cfg.dataset](raw)
    else:
        raw = _generate(cfg, out / "raw", cfg.synthetic, say)
        records = data.READERS["synthetic"](raw)
    groups = {r.group for r in records}
    if len(groups) == len(records):
        raise AuditError(f"--data-dir {raw}: no two cells share a cluster image (no NNN_MM "
                         f"names), so a cell-level split cannot leak; audit needs SIPaKMeD-layout "
                         f"data")
    study_split = "manifest:thesis" if _has_study_names(records) else "thesis"
    return raw, study_split


def _generate(cfg: AuditConfig, raw: Path, setting: str, say) -> Path:
    """The synthetic raw set of ``setting`` in ``raw`` (kept when already there)."""
    from cervical import synthetic

    if not (raw / "synthetic.json").is_file():
        say(f"generating the synthetic set ({setting} setting) in {raw}")
        if cfg.per_class == 0:
            synthetic.generate(raw, stems=synthetic.stems_from_csv(THESIS_SPLIT_CSV),
                               difficulty=setting, overwrite=True, seed=cfg.seed)
        else:
            synthetic.generate(raw, per_class=cfg.per_class, difficulty=setting, overwrite=True,
                               seed=cfg.seed)
    return raw


def _negative_data(cfg: AuditConfig, out: Path, say) -> Path:
    """The negative-control set: the synthetic hard classes, one imaging condition for all."""
    return _generate(cfg, out / "raw-negative", "hard-uniform", say)


def _has_study_names(records) -> bool:
    """True when every cell of the study's split file is among the raw files (its exact split)."""
    have = {(r.source_class, r.stem) for r in records}
    with open(THESIS_SPLIT_CSV, newline="") as fh:
        want = {(row["class"], row["stem"]) for row in csv.DictReader(fh)}
    return want <= have


def _prepare(cfg: AuditConfig, raw: Path, arm: Arm, k: int, study_split: str, out: Path,
             say) -> Path:
    """The prepared dataset of one (arm, seed or fold); shared by arms that prepare alike."""
    variant = PROTOCOL_OF[arm.preparation].variant
    if arm.split == "leak":            # the study's procedure validates on a cell-level split
        val = "cells" if arm.procedure == "study" else "grouped"
        swap = k >= cfg.folds                       # the crossover: the other half leaks
        target = out / "prepared" / (f"{'negative-' if arm.negative else ''}leak-val-{val}"
                                     f"{'-crossed' if swap else ''}")
        kwargs = dict(split="grouped", folds=cfg.folds, seed=cfg.seed, leak_cells=cfg.leak_cells,
                      leak_val=val, leak_swap=swap)
        prepared = target / f"fold_{k % cfg.folds}"
    elif arm.split == "study":           # fixed membership: the seed only moves augmentation
        seed = k if cfg.augment else 0
        target = prepared = out / "prepared" / f"study-split-{variant}-seed{seed}"
        kwargs = dict(split=study_split, seed=seed)
    else:
        target = prepared = out / "prepared" / f"grouped-{variant}-seed{k}"
        kwargs = dict(split="grouped", seed=k)
    if not (prepared / "dataset.json").is_file():
        say(f"prepare {target.name}")
        data.prepare(dataset="sipakmed" if cfg.data_dir and not arm.negative else "synthetic",
                     data_dir=raw, out=target, size=cfg.size, augment=cfg.augment,
                     variant=variant, save_images=False, overwrite=target.exists(), **kwargs)
    return prepared


def _train(cfg: AuditConfig, prepared: Path, arm: Arm, k: int, out: Path, say) -> Path:
    """The arm's run (cost-sensitive: a fine-tuned run first, continued as the study did)."""
    name = f"{arm.name}-{arm.procedure}" if arm.split == "leak" else arm.name
    run = _train_one(cfg, prepared, arm, k, out / "runs" / f"{name}_{k}", "finetune", None, say)
    if cfg.regime == "cost-sensitive":
        run = _train_one(cfg, prepared, arm, k, out / "runs" / f"{name}_{k}_cs",
                         "cost-sensitive", run, say)
    elif cfg.regime != "finetune":
        run = _train_one(cfg, prepared, arm, k, out / "runs" / f"{name}_{k}_{cfg.regime}",
                         cfg.regime, None, say)
    return run


def _train_one(cfg: AuditConfig, prepared: Path, arm: Arm, k: int, run: Path, regime: str,
               init: Optional[Path], say) -> Path:
    """Train one run (resuming an interrupted one; a finished one is kept)."""
    from cervical import train

    if (run / "summary.json").is_file() and (run / "model.keras").is_file():
        return run
    variant = PROTOCOL_OF[arm.procedure].variant
    options = PROTOCOL_OF[arm.procedure].train_options(cfg.model, regime)
    say(f"train {run.name} ({cfg.model}, {regime}, {arm.title})")
    train.train(train.TrainConfig(
        data=str(prepared), out=str(run), model=cfg.model, regime=regime, variant=variant,
        epochs=cfg.epochs, batch_size=cfg.batch_size, seed=k, weights=cfg.weights,
        init=None if init is None else str(init), resume=(run / "config.json").is_file(),
        **options))
    return run


# ------------------------------------------------------------------------------------------------
# Evaluation: per run, and per test cell
# ------------------------------------------------------------------------------------------------

CELL_COLUMNS = ("arm", "unit", "path", "class", "group", "exposure", "correct", "correct_bn")


def _evaluate(cfg: AuditConfig, run: Path, prepared: Path, arm: Arm, k: int
              ) -> Tuple[dict, List[dict]]:
    """(the run's record, one row per test cell) of one run."""
    from cervical import report

    f = run / "eval" / "test" / "metrics.json"
    summary = (json.loads(f.read_text()) if f.is_file() else
               report.evaluate_run(run, split="test", n_boot=cfg.n_boot, seed=k))
    rows = data.read_manifest(prepared)
    group = {r["path"]: r["group"] for r in rows}
    exposure = _exposure(prepared, rows)
    with open(run / "eval" / "test" / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    bn = (_bn_reestimated(run, prepared, preds, k)
          if arm.procedure == "study" and arm.split != "leak" else None)
    cells = [{"arm": arm.name, "unit": k, "path": p["path"], "class": p["true"],
              "group": group[p["path"]], "exposure": exposure.get(p["path"], ""),
              "correct": int(p["true"] == p["predicted"]),
              "correct_bn": "" if bn is None else int(bn[i])} for i, p in enumerate(preds)]
    record = {"arm": arm.name, "unit": k, "run": str(run), "prepared": str(prepared),
              "n": summary["n"], "accuracy": summary["accuracy"],
              "balanced_accuracy": summary["balanced_accuracy"], "macro_f1": summary["macro_f1"],
              "ci": summary.get("ci"), "leak": leak_stats(rows),
              "by_exposure": _by_exposure(cells)}
    if bn is not None:
        record["accuracy_bn_reestimated"] = float(np.mean(bn))
    return record, cells


def _by_exposure(cells: Sequence[dict]) -> dict:
    """Crude accuracy of a run's test cells per exposure (for the per-run table)."""
    out = {}
    for kind in sorted({c["exposure"] for c in cells} - {""}):
        hit = [c["correct"] for c in cells if c["exposure"] == kind]
        out[kind] = {"n": len(hit), "accuracy": float(np.mean(hit))}
    return out


def _bn_reestimated(run: Path, prepared: Path, preds: Sequence[dict], seed: int) -> np.ndarray:
    """Whether each test cell is right once BatchNorm statistics are re-estimated on 1024
    training images under the run's final weights (fitting.PreciseBatchNorm)."""
    from cervical import fitting, models, train

    model = models.load_model_file(run / "model.keras", "--run")
    tr = data.load_split(prepared, "train")
    pbn = fitting.PreciseBatchNorm(fitting.precise_bn_images(tr.x, train.PRECISE_BN_IMAGES, seed),
                                   batch_size=64)
    pbn.set_model(model)
    pbn.recalibrate()
    test = data.load_split(prepared, "test")
    order = {p: i for i, p in enumerate(test.paths)}
    idx = np.array([order[p["path"]] for p in preds])
    pred = models.predict_proba(model, test.x[idx]).argmax(axis=1)
    names = test.class_names
    return np.array([names[j] == p["true"] for j, p in zip(pred, preds)])


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------

def _cells_of(cells: Sequence[dict], arm: str, kinds: Sequence[str] = ()) -> List[dict]:
    return [c for c in cells if c["arm"] == arm and (not kinds or c["exposure"] in kinds)]


def _exposure_contrast(cells: Sequence[dict], exposed: str, other: str, n_boot: int
                       ) -> Optional[dict]:
    """Mantel-Haenszel difference (exposed - other) over classes, clusters resampled."""
    rows = [c for c in cells if c["exposure"] in (exposed, other)]
    if not rows or n_boot < 1:
        return None
    return metrics.class_adjusted_difference(
        [c["correct"] for c in rows], [c["exposure"] == exposed for c in rows],
        [c["class"] for c in rows], [c["group"] for c in rows], weights="mh", n=n_boot, seed=0)


def _effects(cfg: AuditConfig, cells: Sequence[dict]) -> Optional[dict]:
    """Class-balanced accuracy of every protocol arm and the effects between them."""
    protocol = [c for c in cells if ARMS[c["arm"]].split != "leak"]
    if not protocol or cfg.n_boot < 1:
        return None
    have = {c["arm"] for c in protocol}
    contrasts = {"total (study - ours)": {"study": 1, "ours": -1}}
    if cfg.factorial:
        for factor, field in (("split", "split"), ("preparation", "preparation"),
                              ("procedure", "procedure")):
            on = [a for a in have if getattr(ARMS[a], field) == "study"]
            off = [a for a in have if a not in on]
            contrasts[f"{factor} (main effect)"] = {**{a: 1 / len(on) for a in on},
                                                    **{a: -1 / len(off) for a in off}}
    else:
        singles = {"split": "study-split", "preparation": "study-prep",
                   "procedure": "study-procedure"}
        for factor, arm in singles.items():
            contrasts[f"{factor} alone"] = {arm: 1, "ours": -1}
        contrasts["interaction (total - sum of the three)"] = {
            "study": 1, "ours": 2, **{arm: -1 for arm in singles.values()}}
    return metrics.balanced_contrasts(
        [c["correct"] for c in protocol], [c["arm"] for c in protocol],
        [c["class"] for c in protocol], contrasts, groups=[c["group"] for c in protocol],
        n=cfg.n_boot, seed=0)


def _batchnorm(cfg: AuditConfig, cells: Sequence[dict]) -> dict:
    """Per study-procedure arm: accuracy before and after re-estimating BatchNorm statistics."""
    out = {}
    for arm in sorted({c["arm"] for c in cells if c["correct_bn"] != ""}):
        rows = [c for c in cells if c["arm"] == arm]
        diff = [c["correct_bn"] - c["correct"] for c in rows]
        out[arm] = {"before": float(np.mean([c["correct"] for c in rows])),
                    "after": float(np.mean([c["correct_bn"] for c in rows])),
                    "difference": metrics.cluster_mean_ci(diff, [c["group"] for c in rows],
                                                          n=max(cfg.n_boot, 1), seed=0)}
    return out


def _controls(cfg: AuditConfig, leak: Optional[dict], negative: Optional[dict]) -> dict:
    """Did the design see the leak where it exists by construction, and none where it cannot?"""
    synthetic_hard = not cfg.data_dir and cfg.synthetic == "hard"
    positive = None
    if synthetic_hard and leak is not None:
        positive = {"setting": "synthetic hard", "passed": bool(leak["low"] is not None
                                                               and leak["low"] > 0)}
    neg = None
    if negative is not None:
        ok = negative["low"] is not None and negative["low"] <= 0 <= negative["high"]
        neg = {"setting": "synthetic hard-uniform", "passed": bool(ok)}
    judged = [c["passed"] for c in (positive, neg) if c is not None]
    return {"positive": positive, "negative": neg,
            "passed": all(judged) if judged else None}


def _summarise(cfg: AuditConfig, runs: List[dict], cells: List[dict], study_split: str) -> dict:
    n = cfg.n_boot
    leak = _exposure_contrast(_cells_of(cells, "leak"), "leaked", "held_out", n)
    negative = _exposure_contrast(_cells_of(cells, "negative"), "leaked", "held_out", n)
    inside = _exposure_contrast(_cells_of(cells, "study"), "shared", "unshared", n)
    return {
        "config": dataclasses.asdict(cfg), "study_split": study_split,
        "synthetic": None if cfg.data_dir else cfg.synthetic,
        "versions": files.library_versions(),
        "arms": {a.name: dataclasses.asdict(a) for a in plan_arms(cfg)},
        "runs": runs,
        "leak": leak, "negative_control": negative,
        "controls": _controls(cfg, leak, negative),
        "effects": _effects(cfg, cells),
        "study_shared_vs_unshared": inside,
        "batchnorm": _batchnorm(cfg, cells),
        "leak_counts": {r["arm"]: r["leak"] for r in runs if r["unit"] == 0},
        "departures": departures(cfg),
    }


def departures(cfg: AuditConfig) -> List[str]:
    """Every way the audit's "study" arm still differs from what the study's code did."""
    out = []
    if not cfg.data_dir:
        out.append(f"synthetic cells ({cfg.synthetic} setting) instead of SIPaKMeD")
    if cfg.model == "tiny":
        out.append("model tiny (a small CNN from random weights) instead of the study's five "
                   "ImageNet backbones")
    elif cfg.weights == "none":
        out.append(f"{cfg.model} from random weights instead of ImageNet weights")
    else:
        out.append(f"one backbone ({cfg.model}) instead of the study's five")
    if cfg.epochs != 50:
        out.append(f"at most {cfg.epochs} epochs instead of 50")
    if cfg.size != 110:
        out.append(f"{cfg.size} px instead of 110 px")
    if cfg.augment != 6:
        out.append(f"{cfg.augment} augmented copies per training image instead of 6 (x7)")
    if cfg.regime == "cost-sensitive":
        out.append("cost-sensitive runs continue the same seed's fine-tuned run (the study "
                   "continued runs whose earlier epochs its logs do not show)")
    out += ["augmentation and training seeded, file lists sorted, TensorFlow's deterministic ops "
            "on (the study set no seed and globbed unsorted)",
            "every run is reported; the study compared many variants on its test set and "
            "reported the best (selection on the test set is not reproduced)",
            "images are read from the prepared cache (lossless PNG pixels after the study's "
            "JPEG step), not from the study's .npy arrays"]
    return out


# ------------------------------------------------------------------------------------------------
# audit.md and the forest plot
# ------------------------------------------------------------------------------------------------

def _pts(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _ival(s: Optional[dict]) -> str:
    """'+3.2 [+0.4, +6.1] points' from an estimate dict."""
    if not s or s.get("estimate") is None:
        return "n/a"
    if s.get("low") is None:
        return f"{_pts(s['estimate'])} points"
    return f"{_pts(s['estimate'])} [{_pts(s['low'])}, {_pts(s['high'])}] points"


def _pct_ival(s: dict) -> str:
    if s.get("estimate") is None:
        return "n/a"
    text = f"{100 * s['estimate']:.1f} %"
    return text + ("" if s.get("low") is None else f" [{100 * s['low']:.1f}, {100 * s['high']:.1f}]")


def _reading(s: Optional[dict]) -> str:
    """What an interval of a difference says, in words."""
    if not s or s.get("low") is None:
        return "no interval"
    if s["low"] > 0:
        return "interval above 0"
    if s["high"] < 0:
        return "interval below 0"
    return "interval covers 0: no difference shown"


def forest_rows(result: dict) -> List[Tuple[str, Optional[dict]]]:
    """(label, estimate dict) of every effect, in the order of the forest plot."""
    rows: List[Tuple[str, Optional[dict]]] = [
        ("leak (randomised, class-adjusted)", result["leak"]),
        ("negative control (nothing shared within cluster images)", result["negative_control"]),
        ("study protocol: shared - unshared (class-adjusted)",
         result["study_shared_vs_unshared"])]
    effects = result.get("effects") or {}
    for name, s in (effects.get("contrasts") or {}).items():
        rows.append((f"protocol: {name}", s))
    for arm, b in result.get("batchnorm", {}).items():
        rows.append((f"{arm}: BatchNorm re-estimated - as trained", b["difference"]))
    return rows


def format_audit(result: dict) -> str:
    """audit.md: the leak, the decomposed protocol gap, the controls, every run."""
    cfg = result["config"]
    what = (f"synthetic SIPaKMeD-like cells ({result['synthetic']} setting)" if result["synthetic"]
            else f"{cfg['dataset']} from {cfg['data_dir']}")
    lines = ["# Audit: how much of the accuracy is the protocol, and how much is the leak?", "",
             f"Data: {what}. Model {cfg['model']}, regime {cfg['regime']}, {cfg['size']} px, "
             f"x{cfg['augment'] + 1} augmentation, at most {cfg['epochs']} epochs; protocol arms "
             f"{cfg['seeds']} seed(s) each, the leak design {cfg['folds']} grouped folds, each "
             f"run also crossed, with {cfg['leak_cells']} cells moved per leaked cluster. Study split: "
             f"`{result['study_split']}`. Intervals: 95 % cluster bootstrap ({cfg['n_boot']} "
             f"resamples of the cluster images within each class, jointly over runs); training "
             f"randomness is pooled over runs, not resampled (per-run numbers below).", ""]
    lines += _controls_lines(result)
    lines += ["## Effects", "", "| effect | estimate [95 % interval] | reading |", "|---|---|---|"]
    lines += [f"| {label} | {_ival(s)} | {_reading(s)} |" for label, s in forest_rows(result)]
    lines += ["", "![Every effect with its 95 % interval on one axis](audit.png)", "",
              "The leak estimate compares test cells of randomly chosen leaked and held-out "
              "cluster images inside the same runs (Mantel-Haenszel over classes). The protocol "
              "effects are differences of class-balanced accuracy (mean per-class recall) between "
              "arms that differ in the named factor only. 'shared - unshared' inside the study's "
              "protocol compares fixed test cells (the study's split) over the classes that have "
              "both kinds; its interval resamples those cells' cluster images.", ""]
    lines += _arms_lines(result)
    lines += ["## Remaining departures from the study's code", ""]
    lines += [f"- {d}" for d in result["departures"]] + [""]
    lines += _runs_lines(result)
    return "\n".join(lines) + "\n"


def _controls_lines(result: dict) -> List[str]:
    c = result["controls"]
    lines = ["## Controls", ""]
    if c["positive"] is None and c["negative"] is None:
        return lines + ["No control was run (`--no-controls`): nothing below is checked against "
                        "one.", ""]
    if c["positive"] is not None:
        state = "passed" if c["positive"]["passed"] else "**FAILED**"
        lines.append(f"- Positive control ({c['positive']['setting']}: the leak exists by "
                     f"construction): {state}; leak {_ival(result['leak'])}.")
    if c["negative"] is not None:
        state = "passed" if c["negative"]["passed"] else "**FAILED**"
        lines.append(f"- Negative control ({c['negative']['setting']}: a leak cannot help): "
                     f"{state}; {_ival(result['negative_control'])}.")
    if c["passed"] is False:
        lines.append("- **A control failed, so the estimates below are not to be trusted**: a "
                     "failed positive control means the design lacks the power to see a leak "
                     "that is there; a failed negative control means it reports one that "
                     "cannot be.")
    return lines + [""]


def _arms_lines(result: dict) -> List[str]:
    effects = result.get("effects")
    if not effects:
        return []
    lines = ["## Protocol arms", "",
             "| arm | split | preparation | procedure | balanced accuracy [95 %] | runs |",
             "|---|---|---|---|---|---|"]
    for name, s in effects["arms"].items():
        a = ARMS[name]
        n_runs = sum(1 for r in result["runs"] if r["arm"] == name)
        lines.append(f"| {a.title} | {a.split} | {a.preparation} | {a.procedure} | "
                     f"{_pct_ival(s)} | {n_runs} |")
    return lines + [""]


def _runs_lines(result: dict) -> List[str]:
    lines = ["## Every run", "",
             "| run | arm | accuracy | balanced accuracy | test cells by exposure (crude) | "
             "after BatchNorm re-estimate |", "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        by = "; ".join(f"{k} {100 * v['accuracy']:.1f} % (n {v['n']})"
                       for k, v in r["by_exposure"].items()) or "-"
        bn = r.get("accuracy_bn_reestimated")
        lines.append(f"| {Path(r['run']).name} | {r['arm']} | {100 * r['accuracy']:.1f} % | "
                     f"{100 * (r['balanced_accuracy'] or 0):.1f} % | {by} | "
                     f"{'-' if bn is None else f'{100 * bn:.1f} %'} |")
    return lines


def _forest(result: dict):
    """Every effect with its 95 % interval on one axis (points of accuracy)."""
    from matplotlib.figure import Figure

    rows = [(label, s) for label, s in forest_rows(result) if s and s.get("estimate") is not None]
    fig = Figure(figsize=(8, 0.45 * max(len(rows), 1) + 1.2))
    ax = fig.subplots()
    for i, (label, s) in enumerate(rows):
        y = len(rows) - 1 - i
        if s.get("low") is not None:
            ax.plot([100 * s["low"], 100 * s["high"]], [y, y], color="#4c72b0", lw=2)
        ax.plot([100 * s["estimate"]], [y], "o", color="#c44e52" if i == 1 else "#4c72b0")
    ax.axvline(0.0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("difference in accuracy (points), 95 % cluster-bootstrap interval")
    ax.set_title("Audit: every effect on one axis", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
