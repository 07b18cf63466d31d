"""``audit``: how much of a reported accuracy is the protocol? The study's protocol against ours.

The study reported 97.29 % on a test set of which 745 of 812 cells came from cluster images that
also gave cells to training or validation (docs/study.md §1), with class weights from test labels,
the last epoch kept and many variants compared on that test set. ``run_audit`` measures what such
a protocol does to a number: it trains and evaluates the **same model and regime** twice on the
same raw cells, once per protocol, for several seeds (or grouped folds):

    study      the study's exact split membership (data/splits/thesis_split.csv when the files
               carry SIPaKMeD's names, else its per-class 80/20-then-80/20 rule), its resize and
               interpolation, augmentation of the raw crops in BGR order with black gaps, JPEG
               recompression, and its training procedure (last epoch kept, its callbacks,
               test-label class weights for the cost-sensitive regime, ...):
               ``prepare --variant thesis`` + ``train.protocol_options("thesis")``;
    corrected  a grouped split (no cluster image in two splits; ``--folds K``: grouped K-fold),
               our preparation and procedure (best validation epoch, train-label weights).

and reports accuracy and macro-F1 per protocol with 95 % intervals (over seeds, and cluster
bootstrap within each test set), the paired difference with its interval, and the leak itself:
how many test cells share a cluster image with training or validation cells under each protocol,
and, under the study's protocol, the accuracy on shared against unshared test cells (a contrast
inside one training run). Every step is a library call (prepare, train, eval); finished steps are
kept, so an interrupted audit resumes where it stopped.

With ``dataset="synthetic"`` and no data folder the full-size synthetic set is generated with the
study's own file names, in the "hard" setting (cervical.synthetic.Difficulty): the study's split
then has exactly SIPaKMeD's leak (745 of 812 test cells). The synthetic audit shows the mechanism;
the size of the effect on real SIPaKMeD can only be measured on real SIPaKMeD.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from cervical import data, files, metrics

__all__ = ["AuditError", "AuditConfig", "QUICK", "run_audit", "leak_stats", "format_audit",
           "THESIS_SPLIT_CSV"]

#: The study's exact split membership, shipped with the repository.
THESIS_SPLIT_CSV = Path(__file__).resolve().parents[1] / "data" / "splits" / "thesis_split.csv"

PROTOCOLS = ("study", "corrected")

#: The small settings of ``--quick`` (the test suite's smoke run).
QUICK = {"per_class": 24, "size": 40, "augment": 0, "epochs": 2, "seeds": 1, "n_boot": 100}


class AuditError(ValueError):
    """Bad input to ``audit``; the message is one line naming the input and the fix."""


@dataclasses.dataclass
class AuditConfig:
    """The arguments of one audit.

    Attributes:
        data_dir: raw SIPaKMeD-layout folder; None with dataset "synthetic" generates one.
        dataset: "sipakmed" or "synthetic".
        model, regime: what both protocols train (cervical.train).
        seeds: repeated runs per protocol (the corrected split changes with the seed).
        folds: K > 1: the corrected protocol is grouped K-fold (fold k paired with seed k).
        epochs: maximum epochs (the study's 50 by default).
        size, augment: image side and augmented copies per training image (the study: 110, 6).
        batch_size: images per step.
        out: the audit folder (prepared datasets, runs, audit.md / .json / .png).
        synthetic: the generator's difficulty for generated data ("hard" shows the mechanism).
        per_class: synthetic only: cells per class; 0 = SIPaKMeD's 4049 with its file names.
        weights: backbone weights ("none" offline); None = the train default.
        n_boot: bootstrap resamples of every interval.
    """

    data_dir: Optional[str] = None
    dataset: str = "synthetic"
    model: str = "tiny"
    regime: str = "finetune"
    seeds: int = 3
    folds: int = 0
    epochs: int = 50
    size: int = 110
    augment: int = 6
    batch_size: int = 32
    out: str = "outputs/audit"
    synthetic: str = "hard"
    per_class: int = 0
    weights: Optional[str] = None
    n_boot: int = 1000


# ------------------------------------------------------------------------------------------------
# The leak, from a prepared dataset's manifest
# ------------------------------------------------------------------------------------------------

def leak_stats(rows: Sequence[dict]) -> dict:
    """How much of the test split shares cluster images with training or validation.

    Only original cells count (augmented copies are the training cell again).

    Args:
        rows: manifest rows with "split", "group" and (optionally) "augmented" columns.
    Returns:
        {"test_cells", "shared_test_cells", "shared_fraction", "groups",
         "groups_in_several_splits"}: a test cell is shared when its group (cluster image) also
        has a training or validation cell.
    """
    originals = [r for r in rows if str(r.get("augmented", "0")) in ("0", "False", "false", "")]
    seen: Dict[str, set] = {}
    for r in originals:
        seen.setdefault(r["group"], set()).add(r["split"])
    test = [r for r in originals if r["split"] == "test"]
    shared = sum(1 for r in test if seen[r["group"]] & {"train", "val"})
    return {"test_cells": len(test), "shared_test_cells": shared,
            "shared_fraction": shared / len(test) if test else None, "groups": len(seen),
            "groups_in_several_splits": sum(1 for s in seen.values() if len(s) > 1)}


def _shared_flags(prepared: Path) -> Dict[str, bool]:
    """{test image path: whether its cluster image also supplied train or val cells}."""
    rows = data.read_manifest(prepared)
    originals = [r for r in rows if r["augmented"] == "0"]
    held = {r["group"] for r in originals if r["split"] in ("train", "val")}
    return {r["path"]: r["group"] in held for r in originals if r["split"] == "test"}


# ------------------------------------------------------------------------------------------------
# The audit, step by step
# ------------------------------------------------------------------------------------------------

def run_audit(config: AuditConfig, progress: Optional[files.Progress] = None,
              say: Callable[[str], None] = lambda line: None) -> dict:
    """Run (or resume) an audit and write OUT/audit.json, audit.md and audit.png.

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
    raw, study_split = _raw_data(cfg, out, say)         # refuses bad data before writing
    out.mkdir(parents=True, exist_ok=True)
    pairs = cfg.folds or cfg.seeds
    runs: List[dict] = []
    for k in range(pairs):
        for protocol in PROTOCOLS:
            files.report_progress(progress, "audit: runs", len(runs), 2 * pairs)
            prepared = _prepare(cfg, raw, protocol, k, study_split, out, say)
            run = _train(cfg, prepared, protocol, k, out, say)
            runs.append(_evaluate(cfg, run, prepared, protocol, k))
    files.report_progress(progress, "audit: runs", len(runs), 2 * pairs)
    result = _summarise(cfg, runs, study_split)
    files.write_json(out / "audit.json", result)
    files.write_text(out / "audit.md", format_audit(result))
    files.save_figure(_figure(result), out / "audit.png", dpi=120)
    return result


def _check(config: AuditConfig) -> AuditConfig:
    cfg = dataclasses.replace(config)
    if cfg.dataset not in ("sipakmed", "synthetic"):
        raise AuditError(f"--dataset {cfg.dataset}: audit needs SIPaKMeD-layout data (cluster "
                         f"images in the file names); choose sipakmed or synthetic")
    if cfg.dataset == "sipakmed" and not cfg.data_dir:
        raise AuditError("--data-dir: required with --dataset sipakmed (the unpacked SIPaKMeD)")
    from cervical import out_of_range

    for name, low in (("seeds", 1), ("folds", 0), ("epochs", 1), ("size", 8), ("augment", 0),
                      ("batch_size", 1), ("per_class", 0), ("n_boot", 0)):
        problem = out_of_range(f"--{name.replace('_', '-')}", getattr(cfg, name), low, name)
        if problem:
            raise AuditError(problem)
    if cfg.folds == 1:
        raise AuditError("--folds 1: a K-fold audit needs K >= 2 (or --folds 0 and --seeds N)")
    return cfg


def _raw_data(cfg: AuditConfig, out: Path, say) -> tuple:
    """(raw folder, the study's split spec): generated synthetic cells or --data-dir."""
    from cervical import synthetic

    if cfg.data_dir:
        raw = Path(cfg.data_dir)
        records = data.READERS[cfg.dataset](raw)
    else:
        raw = out / "raw"
        if not (raw / "synthetic.json").is_file():
            say(f"generating the synthetic set ({cfg.synthetic} setting) in {raw}")
            if cfg.per_class == 0:
                synthetic.generate(raw, stems=synthetic.stems_from_csv(THESIS_SPLIT_CSV),
                                   difficulty=cfg.synthetic, overwrite=True)
            else:
                synthetic.generate(raw, per_class=cfg.per_class, difficulty=cfg.synthetic,
                                   overwrite=True)
        records = data.READERS["synthetic"](raw)
    groups = {r.group for r in records}
    if len(groups) == len(records):
        raise AuditError(f"--data-dir {raw}: no two cells share a cluster image (no NNN_MM "
                         f"names), so a cell-level split cannot leak; audit needs SIPaKMeD-layout "
                         f"data")
    study_split = "manifest:thesis" if _has_study_names(records) else "thesis"
    return raw, study_split


def _has_study_names(records) -> bool:
    """True when every cell of the study's split file is among the raw files (its exact split)."""
    have = {(r.source_class, r.stem) for r in records}
    with open(THESIS_SPLIT_CSV, newline="") as fh:
        want = {(row["class"], row["stem"]) for row in csv.DictReader(fh)}
    return want <= have


def _prepare(cfg: AuditConfig, raw: Path, protocol: str, k: int, study_split: str, out: Path,
             say) -> Path:
    """The prepared dataset of one (protocol, seed or fold); kept when already complete."""
    if protocol == "corrected" and cfg.folds:
        target, kwargs = out / "prepared" / "corrected", dict(folds=cfg.folds, seed=0)
        prepared = target / f"fold_{k}"
    elif protocol == "corrected":
        target, kwargs = out / "prepared" / f"corrected_seed{k}", dict(split="grouped", seed=k)
        prepared = target
    else:                       # the study's membership is fixed; the seed only moves augmentation
        seed = k if cfg.augment else 0
        target = out / "prepared" / f"study_seed{seed}"
        kwargs = dict(variant="thesis", split=study_split, seed=seed)
        prepared = target
    if not (prepared / "dataset.json").is_file():
        say(f"prepare {protocol} ({target.name})")
        data.prepare(dataset=cfg.dataset, data_dir=raw, out=target, size=cfg.size,
                     augment=cfg.augment, save_images=False, overwrite=target.exists(), **kwargs)
    return prepared


def _train(cfg: AuditConfig, prepared: Path, protocol: str, k: int, out: Path, say) -> Path:
    """Train the protocol's run (resuming an interrupted one; a finished one is kept)."""
    from cervical import train

    run = out / "runs" / f"{protocol}_{k}"
    if (run / "summary.json").is_file() and (run / "model.keras").is_file():
        return run
    thesis = protocol == "study"
    options = train.protocol_options("thesis" if thesis else "standard", cfg.model, cfg.regime)
    if cfg.regime == "cost-sensitive":
        names = data.read_info(prepared)["class_names"]
        options["class_weights"] = "thesis" if thesis and len(names) == 5 else "train"
    say(f"train {protocol} {k} ({cfg.model}, {cfg.regime})")
    train.train(train.TrainConfig(
        data=str(prepared), out=str(run), model=cfg.model, regime=cfg.regime,
        epochs=cfg.epochs, batch_size=cfg.batch_size, seed=k, weights=cfg.weights,
        resume=(run / "config.json").is_file(), **options))
    return run


def _evaluate(cfg: AuditConfig, run: Path, prepared: Path, protocol: str, k: int) -> dict:
    """Test metrics of one run, plus its accuracy on shared and unshared test cells."""
    from cervical import report

    f = run / "eval" / "test" / "metrics.json"
    summary = (json.loads(f.read_text()) if f.is_file() else
               report.evaluate_run(run, split="test", n_boot=cfg.n_boot, seed=k))
    rows = data.read_manifest(prepared)
    record = {"protocol": protocol, "index": k, "run": str(run), "prepared": str(prepared),
              "n": summary["n"], "accuracy": summary["accuracy"], "macro_f1": summary["macro_f1"],
              "ci": summary.get("ci"), "leak": leak_stats(rows)}
    record["by_leak"] = _accuracy_by_leak(run, prepared, cfg.n_boot, k)
    return record


def _accuracy_by_leak(run: Path, prepared: Path, n_boot: int, seed: int) -> dict:
    """Accuracy (cluster-bootstrap 95 % interval) on test cells whose cluster image also supplied
    training or validation cells ("shared"), and on the others ("unshared")."""
    flags = _shared_flags(prepared)
    group = {r["path"]: r["group"] for r in data.read_manifest(prepared)}
    with open(run / "eval" / "test" / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    out = {}
    for name, want in (("shared", True), ("unshared", False)):
        rows = [p for p in preds if flags.get(p["path"]) is want]
        if not rows:
            out[name] = {"n": 0, "accuracy": None, "ci": None}
            continue
        hit = np.array([p["true"] == p["predicted"] for p in rows], dtype=np.int64)
        entry = {"n": len(rows), "accuracy": float(hit.mean()), "ci": None}
        if n_boot:
            ci = metrics.bootstrap_ci(np.ones_like(hit), hit, "accuracy", n=n_boot, seed=seed,
                                      num_classes=2, groups=[group[p["path"]] for p in rows])
            entry["ci"] = [ci["low"], ci["high"]]
        out[name] = entry
    return out


# ------------------------------------------------------------------------------------------------
# Aggregation: intervals over seeds, the paired difference
# ------------------------------------------------------------------------------------------------

def _t_interval(values: Sequence[float]) -> dict:
    """Mean and 95 % t-interval over runs (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    if v.size == 1:
        return {"mean": float(v[0]), "low": None, "high": None, "n": 1}
    half = float(stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return {"mean": float(v.mean()), "low": float(v.mean() - half),
            "high": float(v.mean() + half), "n": int(v.size)}


def _summarise(cfg: AuditConfig, runs: List[dict], study_split: str) -> dict:
    by = {p: [r for r in runs if r["protocol"] == p] for p in PROTOCOLS}
    per_protocol = {p: {m: _t_interval([r[m] for r in rs]) for m in ("accuracy", "macro_f1")}
                    for p, rs in by.items()}
    diffs = {m: _t_interval([a[m] - b[m] for a, b in zip(by["study"], by["corrected"])])
             for m in ("accuracy", "macro_f1")}
    shared = [r["by_leak"]["shared"]["accuracy"] for r in by["study"]]
    unshared = [r["by_leak"]["unshared"]["accuracy"] for r in by["study"]]
    return {
        "config": dataclasses.asdict(cfg), "study_split": study_split,
        "versions": files.library_versions(), "runs": runs,
        "protocols": per_protocol, "difference_study_minus_corrected": diffs,
        "leak": {p: rs[0]["leak"] for p, rs in by.items()},
        "study_shared_vs_unshared": {
            "shared": _t_interval(shared), "unshared": _t_interval(unshared),
            "difference": _t_interval([a - b for a, b in zip(shared, unshared)
                                       if a is not None and b is not None])},
        "synthetic": None if cfg.data_dir else cfg.synthetic,
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _interval(stat: dict, scale: float = 100.0, unit: str = " %") -> str:
    if stat.get("mean") is None:
        return "n/a"
    text = f"{scale * stat['mean']:.2f}{unit}"
    if stat.get("low") is not None:
        text += f" [{scale * stat['low']:.2f}, {scale * stat['high']:.2f}]"
    return text


def format_audit(result: dict) -> str:
    """audit.md: the protocol gap with its intervals, and the leak."""
    cfg = result["config"]
    n = len(result["runs"]) // 2
    what = (f"synthetic SIPaKMeD-like cells ({result['synthetic']} setting)" if result["synthetic"]
            else f"{cfg['dataset']} from {cfg['data_dir']}")
    lines = [
        "# Audit: how much of the accuracy is the protocol?", "",
        f"Data: {what}. Model {cfg['model']}, regime {cfg['regime']}, {cfg['size']} px, "
        f"x{cfg['augment'] + 1} augmentation, at most {cfg['epochs']} epochs, {n} "
        f"{'grouped folds' if cfg['folds'] else 'seeds'} per protocol. Study split: "
        f"`{result['study_split']}`. Intervals: 95 % t-intervals over the {n} runs (the per-run "
        f"cluster-bootstrap intervals are in audit.json).", "",
        "| protocol | accuracy | macro-F1 | test cells sharing a cluster image with train/val |",
        "|---|---|---|---|"]
    for p in PROTOCOLS:
        s, leak = result["protocols"][p], result["leak"][p]
        lines.append(f"| {p} | {_interval(s['accuracy'])} | {_interval(s['macro_f1'], 1.0, '')} | "
                     f"{leak['shared_test_cells']} of {leak['test_cells']} |")
    d = result["difference_study_minus_corrected"]
    sv = result["study_shared_vs_unshared"]
    lines += ["", f"**Study minus corrected:** accuracy {_interval(d['accuracy'], 100, ' points')}, "
              f"macro-F1 {_interval(d['macro_f1'], 1.0, '')}.", "",
              f"**Inside the study's protocol** (same runs): accuracy on test cells whose cluster "
              f"image also gave training/validation cells {_interval(sv['shared'])}, on the others "
              f"{_interval(sv['unshared'])}; difference {_interval(sv['difference'], 100, ' points')}.",
              ""]
    if result["synthetic"]:
        lines += ["These are synthetic cells: the audit shows the mechanism (what a cell-level "
                  "split can add when cells of one image share its conditions), never the size of "
                  "the effect on real SIPaKMeD; run it on the real data for that.", ""]
    lines += ["| run | protocol | accuracy [cluster bootstrap 95 %] | shared / unshared test cells |",
              "|---|---|---|---|"]
    for r in result["runs"]:
        ci = (r.get("ci") or {}).get("accuracy")
        acc = _pct(r["accuracy"]) + (f" [{100 * ci['low']:.2f}, {100 * ci['high']:.2f}]" if ci else "")
        bl = r["by_leak"]
        lines.append(f"| {Path(r['run']).name} | {r['protocol']} | {acc} | "
                     f"{_pct(bl['shared']['accuracy'])} (n {bl['shared']['n']}) / "
                     f"{_pct(bl['unshared']['accuracy'])} (n {bl['unshared']['n']}) |")
    return "\n".join(lines) + "\n"


def _figure(result: dict):
    """Accuracy per protocol (runs and 95 % intervals), and shared vs unshared under the study's."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for i, p in enumerate(PROTOCOLS):
        accs = [100 * r["accuracy"] for r in result["runs"] if r["protocol"] == p]
        ax1.scatter([i] * len(accs), accs, color="grey", zorder=3, s=14)
        s = result["protocols"][p]["accuracy"]
        if s["low"] is not None:
            ax1.errorbar([i], [100 * s["mean"]], yerr=[[100 * (s["mean"] - s["low"])],
                                                       [100 * (s["high"] - s["mean"])]],
                         fmt="o", color="#4c72b0", capsize=6, zorder=4)
    ax1.set_xticks(range(len(PROTOCOLS)), ["study protocol", "corrected"])
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Same model, two protocols", fontsize=9)
    sv = result["study_shared_vs_unshared"]
    for i, key in enumerate(("shared", "unshared")):
        s = sv[key]
        if s["mean"] is not None:
            ax2.bar([i], [100 * s["mean"]], color=["#c44e52", "#55a868"][i])
    ax2.set_xticks([0, 1], ["cluster image also\nin train/val", "cluster image\nonly in test"])
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("Inside the study's protocol", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
