"""``report``: the study's tables and figures over several runs, with the published numbers.

Thesis §6.3 and §7.1 report, per backbone and training regime, a classification table (Tables
6.2-6.4), a bar chart of accuracies (Figs 6.1, 6.2, 6.4), the contrastive loss curves (Fig. 6.3)
and a comparison with previous work (Table 7.1). ``build_report`` rebuilds all of them from run
folders evaluated by ``cervical.evaluation`` (re-exported here: ``report.evaluate_run`` is the
same function), with the split protocol printed beside every number (the study's cell-level
split leaks cluster images between train and test) and, where runs were explained, their
explanations against model-free control maps.

    build_report(run_dirs, out_dir)                      -> OUT/report.md (+ CSV, PNG)
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import files, gallery
from cervical.evaluation import (  # noqa: F401  (re-exported: eval's functions, as before)
    AGG_METRICS, EVAL_FILES, MODEL_LABELS, REGIMES, SPLITS, Progress, ReportError, _fmt, _fmt_pm,
    _finite, _fold_of, _load_model, _md_table, _pct, _read_config, _slug, _tex, _tex_table,
    classification_table, evaluate_run, format_eval, plot_confusion_matrix, plot_reliability,
    protocol_label, untested_version_notes)

__all__ = ["REGIMES", "load_published", "build_report"] + [  # and eval's, re-exported
    name for name in __import__("cervical.evaluation", fromlist=["__all__"]).__all__]


# --------------------------------------------------------------------------------------------
# published numbers
# --------------------------------------------------------------------------------------------
def load_published(path: Optional[os.PathLike] = None) -> dict:
    """Load the published comparison numbers (``cervical/published.json`` by default).

    The file holds thesis Table 7.1 (previous works on SIPaKMeD with their citations, and the
    study's own best results), the study's per-model per-class results of Tables 6.2–6.4, and the
    numbers printed in the study's notebooks.

    Args:
        path: another JSON file of the same layout.

    Returns:
        the parsed dict.

    Raises:
        ReportError: the file is missing or not valid JSON.
    """
    p = Path(path) if path is not None else Path(__file__).with_name("published.json")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{p}: cannot read the published results ({type(exc).__name__}); reinstall cervical") from None


# --------------------------------------------------------------------------------------------
# report over several runs
# --------------------------------------------------------------------------------------------
def _collect_run(run: Path, split: str, evaluate_missing: bool, progress: Progress) -> dict:
    """Config + eval summary of one run (evaluating it first when its metrics.json is missing)."""
    if not run.is_dir():
        raise ReportError(f"--runs {run}: not a folder; pass run folders made by 'python cli.py train'")
    f = run / "eval" / split / "metrics.json"
    if f.is_file():
        try:
            summary = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ReportError(f"{f}: unreadable ({type(exc).__name__}); rerun 'python cli.py eval --run {run} "
                              f"--split {split}'") from None
        missing = [k for k in ("class_names", "per_class", "confusion_matrix", "accuracy", "n")
                   if not isinstance(summary, dict) or k not in summary]
        if missing:
            raise ReportError(f"{f}: not a metrics.json written by 'cli.py eval' (missing {', '.join(missing)}); "
                              f"rerun 'python cli.py eval --run {run} --split {split}'")
    elif evaluate_missing:
        summary = evaluate_run(run, split=split, progress=progress)
    else:
        raise ReportError(f"--runs {run}: no eval/{split}/metrics.json; run 'python cli.py eval --run {run} "
                          f"--split {split}' first")
    config = _read_config(run)
    meta = summary.get("meta", {})
    model = config.get("model") or meta.get("model") or run.name
    regime = config.get("regime") or meta.get("regime") or "unknown"
    loss = config.get("loss") or meta.get("loss")
    fold = meta.get("fold")
    if fold is None:
        fold, _ = _fold_of(config, {}, config.get("data_dir"))
    return {
        "run": run, "summary": summary, "config": config, "model": model, "regime": regime,
        "loss": loss, "variant": config.get("variant") or meta.get("variant"),
        "dataset": meta.get("dataset") or config.get("dataset"), "protocol": meta.get("protocol")
        or protocol_label(config.get("split_protocol")), "fold": fold,
        "history": run / "contrastive_history.csv",
    }


def _group_label(r: dict) -> str:
    label = MODEL_LABELS.get(r["model"], r["model"])
    if r["regime"] == "contrastive" and r["loss"]:
        label += f" ({r['loss']})"
    if r["variant"] == "thesis":
        label += " [thesis variant]"
    return label


def _group_runs(records: List[dict]) -> List[dict]:
    """Runs of the same regime, model, loss, variant, dataset and protocol form one group (folds or seeds)."""
    groups: Dict[tuple, dict] = {}
    for r in records:
        key = (r["regime"], r["model"], r["loss"], r["variant"], r["dataset"], r["protocol"])
        g = groups.setdefault(key, {"key": key, "regime": r["regime"], "model": r["model"], "loss": r["loss"],
                                    "variant": r["variant"], "dataset": r["dataset"], "protocol": r["protocol"],
                                    "label": _group_label(r), "runs": []})
        g["runs"].append(r)
    order = {k: i for i, k in enumerate(REGIMES)}
    models = {m: i for i, m in enumerate(MODEL_LABELS)}
    out = sorted(groups.values(), key=lambda g: (order.get(g["regime"], len(order)), g["regime"],
                                                 models.get(g["model"], len(models)), g["label"],
                                                 str(g["dataset"]), g["protocol"]))
    for g in out:
        _aggregate(g)
    return out


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation (ddof = 1) of the defined values; std None for one value."""
    v = np.array([x for x in values if _finite(x) is not None], dtype=np.float64)
    if v.size == 0:
        return None, None
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def _aggregate(g: dict) -> None:
    """Mean ± std over a group's runs, per metric and per class; confusion matrices summed."""
    sums = [r["summary"] for r in g["runs"]]
    folds = [r["fold"] for r in g["runs"]]
    g["n_runs"] = len(sums)
    g["kind"] = ("folds" if len(sums) > 1 and None not in folds and len(set(folds)) == len(folds)
                 else "runs" if len(sums) > 1 else "single")
    g["metrics"] = {m: _mean_std([s.get(m) for s in sums]) for m in AGG_METRICS}
    names = sums[0]["class_names"]
    g["class_names"] = names
    g["per_class"] = {c: {k: _mean_std([s["per_class"][c][k] for s in sums]) for k in ("precision", "recall", "f1")}
                      for c in names}
    g["support"] = {c: int(sum(s["per_class"][c]["support"] for s in sums)) for c in names}
    g["confusion_matrix"] = np.sum([np.asarray(s["confusion_matrix"]) for s in sums], axis=0).tolist()
    g["ci"] = sums[0].get("ci") if len(sums) == 1 else None
    g["n_test"] = int(sum(s["n"] for s in sums))


def _thesis_block(published: dict, group: dict) -> Optional[dict]:
    """The thesis's Table 6.2–6.4 entry for a group's (regime, model[, loss]) when its classes are SIPaKMeD's."""
    if list(group["class_names"]) != list(published.get("class_names", [])):
        return None
    study_data = published.get("study", {}).get("dataset")
    if study_data and group.get("dataset") != study_data:
        return None  # e.g. the synthetic set shares SIPaKMeD's class names but not its numbers
    block = published.get("study_tables", {}).get(group["regime"], {})
    if block.get("loss") and group.get("loss") and group["loss"] != block["loss"]:
        return None  # Table 6.4 is N-pairs only
    return block.get("models", {}).get(group["model"])


def _study_table(groups: List[dict], published: dict) -> Tuple[List[str], List[list], List[str], List[list]]:
    """Markdown rows and CSV rows of one regime's Table 6.2–6.4 style table."""
    md_header = ["Classifier", "Class", "Precision", "Recall", "F1 score", "Accuracy", "Thesis P / R / F1", "Thesis acc."]
    csv_header = ["classifier", "runs", "dataset", "protocol", "class", "precision", "precision_std", "recall",
                  "recall_std", "f1", "f1_std", "support", "accuracy", "accuracy_std", "thesis_precision",
                  "thesis_recall", "thesis_f1", "thesis_accuracy"]
    md, rows = [], []
    for g in groups:
        th = _thesis_block(published, g)
        acc_m, acc_s = g["metrics"]["accuracy"]
        name = g["label"] + (f" (mean ± std, {g['n_runs']} {g['kind']})" if g["n_runs"] > 1 else "")
        for i, c in enumerate(g["class_names"]):
            pc = g["per_class"][c]
            tc = th["per_class"].get(c) if th else None
            md.append([name if i == 0 else "", c, _fmt_pm(*pc["precision"], 2 if g["n_runs"] == 1 else 3),
                       _fmt_pm(*pc["recall"], 2 if g["n_runs"] == 1 else 3),
                       _fmt_pm(*pc["f1"], 2 if g["n_runs"] == 1 else 3),
                       (_pct(acc_m) + (f" ± {100 * acc_s:.2f}" if acc_s is not None else "")) if i == 0 else "",
                       f"{tc['precision']:.2f} / {tc['recall']:.2f} / {tc['f1']:.2f}" if tc else "",
                       _pct(th["accuracy"]) if th and i == 0 else ""])
            rows.append([g["label"], g["n_runs"], g["dataset"], g["protocol"], c,
                         pc["precision"][0], pc["precision"][1], pc["recall"][0], pc["recall"][1],
                         pc["f1"][0], pc["f1"][1], g["support"][c], acc_m, acc_s,
                         tc["precision"] if tc else None, tc["recall"] if tc else None,
                         tc["f1"] if tc else None, th["accuracy"] if th else None])
    return md_header, md, csv_header, rows


def _plot_accuracy_bars(groups: List[dict], published: dict, title: str, path: Path) -> Path:
    """Accuracy per model (Figs 6.1/6.2/6.4), error bars = std over folds/runs or the 95 % bootstrap CI."""
    from matplotlib.figure import Figure

    labels = [g["label"] for g in groups]
    acc = np.array([100 * g["metrics"]["accuracy"][0] for g in groups])
    err = np.zeros((2, len(groups)))
    for i, g in enumerate(groups):
        if g["metrics"]["accuracy"][1] is not None:
            err[:, i] = 100 * g["metrics"]["accuracy"][1]
        elif g["ci"] and "accuracy" in g["ci"]:
            err[0, i] = acc[i] - 100 * g["ci"]["accuracy"]["low"]
            err[1, i] = 100 * g["ci"]["accuracy"]["high"] - acc[i]
    fig = Figure(figsize=(max(5.0, 1.3 * len(groups) + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(groups))
    bars = ax.bar(xs, acc, yerr=err, capsize=4, color="#4c72b0", edgecolor="black", label="this report")
    th_x, th_y = [], []
    for i, g in enumerate(groups):
        th = _thesis_block(published, g)
        if th:
            th_x.append(i)
            th_y.append(100 * th["accuracy"])
    if th_x:
        ax.scatter(th_x, th_y, marker="D", color="#c44e52", zorder=3, label="thesis (cell-level split)")
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right")
    low = float(np.nanmin(np.concatenate([acc - err[0], th_y]))) if len(groups) else 0.0
    bottom = max(0.0, min(low - 5.0, 90.0))
    ax.set_ylim(bottom, 101.0)
    for b, a in zip(bars, acc):  # value inside the bar, clear of the error bar
        ax.text(b.get_x() + b.get_width() / 2, bottom + 0.4, f"{a:.2f}", ha="center", va="bottom",
                fontsize=8, color="white", fontweight="bold")
    ax.set_ylabel("Accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return files.save_figure(fig, path)


def _read_history(path: Path) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """(epoch, loss) columns of a contrastive_history.csv, or None when absent or empty."""
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss") not in (None, "")]
    if not rows:
        return None
    ep = np.array([float(r.get("epoch") or i) for i, r in enumerate(rows)])
    return ep, np.array([float(r["loss"]) for r in rows])


def _plot_contrastive_losses(records: List[dict], path: Path,
                             published: Optional[dict] = None) -> Optional[Path]:
    """Fig. 6.3: phase-1 contrastive loss per epoch, one panel per loss, one line per run, with
    the study's printed values (published.json "contrastive_losses": first and last epochs) drawn
    dashed beside ours, and a last panel with its two broken losses (flat at ln 31 and 0.2)."""
    from matplotlib.figure import Figure

    curves: Dict[str, list] = {}
    for r in records:
        h = _read_history(r["history"])
        if h is not None:
            curves.setdefault(str(r["loss"] or "contrastive"), []).append((r, h))
    if not curves:
        return None
    theirs = (published or {}).get("contrastive_losses", {}).get("curves", [])
    broken = [c for c in theirs if "broken" in c["loss"]]
    panels = sorted(curves.items()) + ([("the study's broken losses", [])] if broken else [])
    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for i, (loss, items) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r, (ep, lv) in items:
            lab = MODEL_LABELS.get(r["model"], r["model"]) + (f" fold {r['fold']}" if r["fold"] is not None else "")
            ax.plot(ep, lv, marker="o", ms=2, lw=1.2, label=lab)
        for c in (broken if not items else [c for c in theirs if c["loss"] == loss]):
            ax.plot(c["epochs"], c["values"], "--", marker="s", ms=3, lw=1, alpha=0.8,
                    label=f"study {MODEL_LABELS.get(c['model'], c['model'])} ({c['loss']})")
        ax.set_title(f"({chr(ord('a') + i)}) {loss}" + (" loss" if items else ""))
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Loss")
        ax.legend(fontsize=6)
    fig.suptitle("Contrastive pre-training loss (cf. thesis Fig. 6.3; dashed: the study's "
                 "printed first/last epochs)")
    return files.save_figure(fig, path)


def _dropout(config: dict) -> str:
    """The dropout rate of a run's classifier head (the heads of docs/study.md §3-4)."""
    if config.get("regime") in ("contrastive", "baseline"):
        return "0.5"
    return "0.5" if config.get("model") in ("vgg16", "vgg19", "resnet50") else "none"


def _hyperparameter_section(records: List[dict], published: dict, out: Path) -> List[str]:
    """Table 6.1 from the runs' config.json files, the thesis's table beside."""
    header = ["Run", "Model", "Regime", "Epochs (run / max)", "Loss", "Optimizer", "Size",
              "Batch", "Learning rate", "Dropout", "Kept epoch", "Selected on", "BN statistics"]
    rows = []
    for r in records:
        c, s = r["config"], _read_summary(r["run"])
        loss = (f"{c.get('loss')} (phase 1), cross-entropy" if c.get("regime") == "contrastive"
                else "expected cost" if c.get("cost_matrix") else "categorical cross-entropy")
        lr = (f"{c.get('contrastive_lr')} / {c.get('lr')}" if c.get("regime") == "contrastive"
              else str(c.get("lr")))
        rows.append([Path(r["run"]).name, MODEL_LABELS.get(r["model"], r["model"]), r["regime"],
                     f"{s.get('epochs_run', '?')} / {c.get('epochs')}", loss, "Adam",
                     f"{c.get('image_size')}x{c.get('image_size')}", c.get("global_batch_size",
                                                                        c.get("batch_size")),
                     lr, _dropout(c), c.get("keep") or "best", c.get("monitor"),
                     f"precise ({c['precise_bn']} images)" if c.get("precise_bn")
                     else "moving averages"])
    files.write_csv(out / "hyperparameters.csv", header, rows)
    thesis = published.get("table_6_1", {})
    th_rows = [[t["experiment"], t["epochs"], t["loss"], t["optimizer"], t["size"], t["dropout"],
                t["learning_rate"], t.get("note", "")] for t in thesis.get("rows", [])]
    md = ["## Hyper-parameters (cf. thesis Table 6.1)", "",
          "From each run's config.json:", "", _md_table(header, rows)]
    if th_rows:
        md += [f"The thesis's table ({thesis.get('source', 'thesis Table 6.1')}):", "",
               _md_table(["Experiment", "Epochs", "Loss", "Optimizer", "Size", "Dropout",
                          "Learning rate", "Note"], th_rows)]
    return md + ["CSV: [hyperparameters.csv](hyperparameters.csv).", ""]


def _read_summary(run) -> dict:
    f = Path(run) / "summary.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


#: Columns of comparison.csv (thesis Table 7.1 with our runs added).
COMPARISON_COLUMNS = ("Author/Year", "Method", "Dataset", "Split protocol", "Accuracy",
                      "95 % CI / std", "Source")


def _comparison_rows(groups: List[dict], published: dict) -> Tuple[Tuple[str, ...], List[dict]]:
    """Thesis Table 7.1 rows followed by ours (best first), each with its dataset and protocol."""
    rows = [dict(zip(COMPARISON_COLUMNS, (
        f"{p['author']}/{p['year']} {p.get('ref', '')}".strip(), p["method"], p.get("dataset", ""),
        protocol_label(p.get("split_protocol")), p["accuracy"], "", p.get("citation", ""))))
        for p in published.get("table_7_1", [])]
    ours = []
    for g in groups:
        m, s = g["metrics"]["accuracy"]
        spread = (f"± {s:.4f} ({g['n_runs']} {g['kind']})" if s is not None else
                  f"[{g['ci']['accuracy']['low']:.4f}, {g['ci']['accuracy']['high']:.4f}]"
                  if g["ci"] else "")
        regime = REGIMES.get(g["regime"], (g["regime"],))[0]
        ours.append(dict(zip(COMPARISON_COLUMNS, (
            "This report", f"{regime}, {g['label']}", g["dataset"] or "", g["protocol"], m, spread,
            ", ".join(str(r["run"]) for r in g["runs"])))))
    ours.sort(key=lambda r: -(r["Accuracy"] if r["Accuracy"] is not None else -1))
    return COMPARISON_COLUMNS, rows + ours


def _short_source(row: dict) -> str:
    """Markdown cell for the source column: the citation cut to its title, or the run folder names."""
    text = str(row["Source"] or "")
    if row["Author/Year"] == "This report":
        names = [Path(p.strip()).name for p in text.split(",")]
        return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
    return text if len(text) <= 90 else text[:90].rsplit(" ", 1)[0] + " …"


def _version_lines(records: List[dict]) -> List[str]:
    """Markdown lines: which runs were trained or evaluated with untested library versions."""
    lines = []
    for r in records:
        meta = r["summary"].get("meta", {})
        notes = untested_version_notes(r["config"].get("versions"), meta.get("eval_versions"))
        if notes:
            lines.append(f"- {Path(r['run']).name}: " + "; ".join(notes))
    if not lines:
        return ["Every run was trained and evaluated with the tested versions "
                "(`cervical/constraints.txt`)."]
    return ["Versions other than the tested ones (`cervical/constraints.txt`); figures may differ "
            "from the README's:", ""] + lines


def build_report(run_dirs: Sequence[os.PathLike], out_dir: os.PathLike, split: str = "test",
                 evaluate_missing: bool = True, progress: Progress = None,
                 published: Optional[dict] = None, overwrite: bool = True) -> Path:
    """The study's tables and figures over several runs, with the published numbers beside them.

    Reads ``RUN/eval/<split>/metrics.json`` of every run (evaluating runs that have none when
    ``evaluate_missing``), groups runs of the same regime, model, loss, variant, dataset and
    split protocol (folds of a K-fold split, or repeated seeds) into mean ± sample std (ddof 1),
    and writes to ``out_dir``:

    - ``report.md``: everything below, PNGs embedded;
    - ``runs.csv``: one line per run (accuracy, CIs, macro-F1, balanced accuracy, kappa, ECE, ...);
    - ``table_<regime>.md/.csv``: Tables 6.2–6.4 layout, one block per model, class rows, with the
      thesis's values beside ours when the classes are SIPaKMeD's;
    - ``fig_accuracy_<regime>.png``: Figs 6.1/6.2/6.4 (bars, error bars, thesis markers);
    - ``fig_contrastive_losses.png``: Fig. 6.3, when contrastive runs have a loss history;
    - ``aggregate.md/.csv``: mean ± std per metric per group (when a group has several runs);
    - ``comparison.md/.csv``: Table 7.1 with our runs added, each with dataset and split protocol;
    - ``cm_<group>.png``: confusion matrix per group (summed over folds);
    - ``report.json``: the grouped numbers, machine-readable.

    Args:
        run_dirs: run folders.
        out_dir: report folder (created).
        split: which eval split to report.
        evaluate_missing: evaluate runs without metrics.json (needs TensorFlow).
        progress: None/False quiet, True a stderr counter, or a callable (done, total, note).
        published: the published numbers (default :func:`load_published`).
        overwrite: replace an earlier report in ``out_dir`` (the command line asks for
            --overwrite; refused otherwise, before any run is evaluated).

    Returns:
        path of report.md.

    Raises:
        ReportError: no runs, a run folder that is missing or not evaluated, or runs whose class
            sets differ.
    """
    if not run_dirs:
        raise ReportError("--runs: no run folders given; pass one or more folders made by 'python cli.py train'")
    if split not in SPLITS:
        raise ReportError(f"--split {split}: unknown; choose one of {', '.join(SPLITS)}")
    published = published if published is not None else load_published()
    files.check_output_dir(out_dir, "report.md", replace=overwrite)   # before any evaluation
    records = _collect_runs(run_dirs, split, evaluate_missing, progress)
    groups = _group_runs(records)
    final = Path(out_dir)
    with files.output_lock(final), files.atomic_dir(final, "report.md") as out:
        _write_report(out, split, records, groups, published)
    return final / "report.md"


def _write_report(out: Path, split: str, records: List[dict], groups: List[dict],
                  published: dict) -> None:
    """Every file of the report, into ``out`` (a staging folder swapped in whole)."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    md = _report_intro(split, records, groups, created)
    md += _runs_section(records, out)
    for regime in _regimes_present(groups):
        md += _regime_section(regime, [g for g in groups if g["regime"] == regime], published, out)
    md += _hyperparameter_section(records, published, out)
    md += _contrastive_section(records, out, published)
    md += _aggregate_section(groups, out)
    md += ["## Library versions", ""] + _version_lines(records) + [""]
    md += _comparison_section(groups, published, out)
    md += _confusion_section(groups, out)
    md += _explanations_section(records, split)
    files.write_json(out / "report.json", _report_json(split, records, groups, created))
    files.write_text(out / "report.md", "\n".join(md))
    gallery.write_report_page(out)                        # report.html: the same, as a page


def _collect_runs(run_dirs: Sequence[os.PathLike], split: str, evaluate_missing: bool,
                  progress: Progress) -> List[dict]:
    """One record per distinct run folder; every run must have the same classes."""
    unique = list(dict.fromkeys(Path(rd).resolve() for rd in run_dirs))  # a run given twice counts once
    records = []
    for i, rd in enumerate(unique):
        records.append(_collect_run(Path(rd), split, evaluate_missing, progress))
        files.report_progress(progress, "report: runs", i + 1, len(unique))
    first = records[0]["summary"]["class_names"]
    for r in records[1:]:
        if r["summary"]["class_names"] != first:
            raise ReportError(f"--runs: {r['run']} has classes {r['summary']['class_names']} but "
                              f"{records[0]['run']} has {first}; report runs of one task together")
    return records


def _report_intro(split: str, records: List[dict], groups: List[dict], created: str) -> List[str]:
    return [f"# Results report ({split} split)", "",
            f"{len(records)} run(s), {len(groups)} model group(s); generated {created} by cervical.", "",
            "**Split protocol matters.** *cell-level (thesis)* is the study's split: cells cut from "
            "one cluster image can sit in train and test (745 of SIPaKMeD's 812 test cells do), so "
            "its numbers are optimistic. *grouped* keeps each cluster image in one split. Numbers "
            "on other datasets (e.g. the synthetic default) are not comparable with SIPaKMeD "
            "numbers; the *Dataset* column says which is which.", ""]


#: Columns of runs.csv, one row per run.
RUN_COLUMNS = ("run", "model", "regime", "loss", "variant", "dataset", "protocol", "fold", "n",
               "accuracy", "accuracy_low", "accuracy_high", "macro_f1", "macro_f1_low",
               "macro_f1_high", "balanced_accuracy", "weighted_f1", "kappa", "roc_auc", "log_loss",
               "ece", "sensitivity", "specificity")


def _run_row(r: dict) -> dict:
    """runs.csv row of one run record, by column name."""
    s, ci = r["summary"], r["summary"].get("ci", {})
    row = {k: r[k] for k in ("model", "regime", "loss", "variant", "dataset", "protocol", "fold")}
    row.update(run=str(r["run"]), n=s["n"])
    for m in ("accuracy", "macro_f1"):
        row.update({m: s[m], f"{m}_low": ci.get(m, {}).get("low"),
                    f"{m}_high": ci.get(m, {}).get("high")})
    for m in ("balanced_accuracy", "weighted_f1", "kappa", "roc_auc", "log_loss", "ece",
              "sensitivity", "specificity"):
        row[m] = s.get(m)
    return row


def _with_ci(row: dict, metric: str) -> str:
    low, high = row[f"{metric}_low"], row[f"{metric}_high"]
    return _fmt(row[metric]) + (f" [{low:.4f}, {high:.4f}]" if low is not None else "")


def _runs_section(records: List[dict], out: Path) -> List[str]:
    rows = [_run_row(r) for r in records]
    files.write_csv(out / "runs.csv", RUN_COLUMNS, rows)
    table = _md_table(
        ["Run", "Model", "Regime", "Dataset", "Protocol", "n", "Accuracy [95 % CI]",
         "Macro-F1 [95 % CI]", "Bal. acc.", "Kappa", "ECE", "Sens. / Spec. (abnormal)"],
        [[Path(r["run"]).name, MODEL_LABELS.get(r["model"], r["model"]),
          r["regime"] + (f" ({r['loss']})" if r["loss"] else ""), r["dataset"],
          r["protocol"] + (f" fold {r['fold']}" if r["fold"] is not None else ""), r["n"],
          _with_ci(r, "accuracy"), _with_ci(r, "macro_f1"), _fmt(r["balanced_accuracy"]),
          _fmt(r["kappa"]), _fmt(r["ece"]), f"{_fmt(r['sensitivity'])} / {_fmt(r['specificity'])}"]
         for r in rows])
    return ["## Runs", "", table, "Full numbers: [runs.csv](runs.csv).", ""]


def _regimes_present(groups: List[dict]) -> List[str]:
    """The regimes of the groups, in the thesis's order, unknown ones last."""
    present = {g["regime"] for g in groups}
    return [k for k in REGIMES if k in present] + sorted(present - set(REGIMES))


def _regime_section(regime: str, groups: List[dict], published: dict, out: Path) -> List[str]:
    """Tables 6.2-6.4 and Figs 6.1/6.2/6.4 for one regime."""
    title, ref = REGIMES.get(regime, (regime, "no counterpart in the thesis"))
    mh, mrows, ch, crows = _study_table(groups, published)
    slug = _slug(regime)
    files.write_text(out / f"table_{slug}.md", f"**{title}** ({ref})\n\n" + _md_table(mh, mrows))
    files.write_csv(out / f"table_{slug}.csv", ch, crows)
    fig = _plot_accuracy_bars(groups, published, f"{title}: accuracy per model",
                              out / f"fig_accuracy_{slug}.png")
    return [f"## {title} ({ref})", "", _md_table(mh, mrows),
            f"CSV: [table_{slug}.csv](table_{slug}.csv). Per-class rows are per-class scores (the "
            "thesis headed them 'weighted'); thesis values are on SIPaKMeD with its cell-level "
            "split.", "", f"![{title}: accuracy per model]({fig.name})", ""]


def _contrastive_section(records: List[dict], out: Path, published: dict) -> List[str]:
    """Fig. 6.3: the phase-1 loss curves of the contrastive runs."""
    fig = _plot_contrastive_losses([r for r in records if r["regime"] == "contrastive"],
                                   out / "fig_contrastive_losses.png", published)
    if fig is None:
        return []
    return ["## Contrastive loss curves (cf. thesis Fig. 6.3)", "",
            "The study's NT-Xent and triplet curves were flat because those losses were broken "
            "(labels ignored; collapse to ln 31 = 3.4333 and to the margin 0.2).", "",
            f"![contrastive losses]({fig.name})", ""]


def _aggregate_section(groups: List[dict], out: Path) -> List[str]:
    """Mean ± std over the folds or repeated runs of each group that has several."""
    multi = [g for g in groups if g["n_runs"] > 1]
    if not multi:
        return []
    header = ["group", "regime", "dataset", "protocol", "runs", "kind"] + [
        x for m in AGG_METRICS for x in (m, f"{m}_std")]
    files.write_csv(out / "aggregate.csv", header,
                    [[g["label"], g["regime"], g["dataset"], g["protocol"], g["n_runs"], g["kind"]]
                     + [x for m in AGG_METRICS for x in g["metrics"][m]] for g in multi])
    shown = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "kappa", "ece")
    table = _md_table(["Model", "Regime", "Protocol", "Runs"] + list(shown),
                      [[g["label"], g["regime"], g["protocol"], f"{g['n_runs']} {g['kind']}"]
                       + [_fmt_pm(*g["metrics"][m]) for m in shown] for g in multi])
    files.write_text(out / "aggregate.md", table)
    return ["## Folds and repeated runs: mean ± std", "",
            "Sample standard deviation (ddof = 1) over the runs of each group.", "", table,
            "All metrics: [aggregate.csv](aggregate.csv).", ""]


def _comparison_section(groups: List[dict], published: dict, out: Path) -> List[str]:
    """Table 7.1 with our runs added."""
    header, rows = _comparison_rows(groups, published)
    files.write_csv(out / "comparison.csv", header, [[r[h] for h in header] for r in rows])
    table = _md_table(["Author/Year", "Method", "Dataset", "Split protocol", "Accuracy",
                       "95 % CI / std", "Source / runs"],
                      [[r["Author/Year"], r["Method"], r["Dataset"], r["Split protocol"],
                        _pct(r["Accuracy"]), r["95 % CI / std"], _short_source(r)] for r in rows])
    files.write_text(out / "comparison.md", table)
    md = ["## Comparison with published results (cf. thesis Table 7.1)", "", table,
          "Full citations: [comparison.csv](comparison.csv).", ""]
    notes = published.get("notes", [])
    if notes:
        md += ["Notes on the published numbers:", ""] + [f"- {n}" for n in notes] + [""]
    return md


def _confusion_section(groups: List[dict], out: Path) -> List[str]:
    md = ["## Confusion matrices", "", "Rows: true class; columns: predicted class; counts and "
          "share of the true class (summed over folds/runs for groups).", ""]
    used = set()
    for g in groups:
        slug = _slug(f"{g['regime']}_{g['label']}_{g['dataset']}_{g['protocol']}")
        while slug in used:
            slug += "_"
        used.add(slug)
        title = f"{REGIMES.get(g['regime'], (g['regime'],))[0]}: {g['label']}"
        p = plot_confusion_matrix(g["confusion_matrix"], g["class_names"], out / f"cm_{slug}.png",
                                  title=f"{title} (n = {g['n_test']})")
        md += [f"### {title}", "", f"![{title}]({p.name})", ""]
    return md


def _report_json(split: str, records: List[dict], groups: List[dict], created: str) -> dict:
    """report.json: the grouped numbers, machine-readable, with when and with which libraries the
    report was made (each run's own versions are in its config.json)."""
    return {
        "split": split, "created": created, "versions": files.library_versions(),
        "runs": [{"run": str(r["run"]), **{k: r[k] for k in ("model", "regime", "loss", "variant",
                                                            "dataset", "protocol", "fold")}}
                 for r in records],
        "groups": [{k: g[k] for k in ("label", "regime", "model", "loss", "variant", "dataset",
                                      "protocol", "n_runs", "kind", "n_test", "class_names",
                                      "confusion_matrix")}
                   | {"metrics": {m: {"mean": v[0], "std": v[1]} for m, v in g["metrics"].items()},
                      "per_class": {c: {k: {"mean": v[0], "std": v[1]} for k, v in pc.items()}
                                    for c, pc in g["per_class"].items()},
                      "runs": [str(r["run"]) for r in g["runs"]]}
                   for g in groups],
    }


def _explanations_section(records: List[dict], split: str) -> List[str]:
    """Per run with ``explain --evaluate`` output: each method's nucleus energy share against the
    model-free control maps, paired per cell (cervical.xai_eval), and the verdict those support."""
    from cervical import xai_eval

    lines: List[str] = []
    for r in records:
        f = Path(r["run"]) / "explain" / split / "xai_metrics.json"
        try:
            metrics = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
        except (OSError, json.JSONDecodeError):
            metrics = None
        if not metrics or not metrics.get("paired") or not metrics.get("localisation_available"):
            continue
        comp = metrics["paired"]["comparisons"]
        refs = [c for c in ("centre", "darkness", "random") if c in metrics.get("reference", {})]
        rows = []
        for m, res in metrics["methods"].items():
            cells = [xai_eval._diff(comp.get(m, {}).get(c, {}).get("nucleus_energy"))
                     + " " + comp.get(m, {}).get(c, {}).get("nucleus_energy", {}).get("verdict", "")
                     for c in refs]
            rows.append([m, _fmt((res.get("nucleus_energy") or {}).get("mean"), 3)] + cells)
        lines += [f"### {Path(r['run']).name} ({metrics['n_cells']} {split} cells)", "",
                  _md_table(["method", "nucleus energy"]
                            + [f"vs {xai_eval.CONTROL_NAMES[c]}" for c in refs], rows), "",
                  "**Verdict.** " + " ".join(xai_eval.verdict_sentences(metrics)), ""]
    if not lines:
        return []
    return ["## Explanations against model-free controls", "",
            "Per cell, method minus control map, mean with a 95 % cluster-bootstrap interval "
            "(`explain --evaluate`; full tables in each run's explain folder). A map beating "
            "chance is not enough: on centred cells a centred Gaussian finds the nucleus "
            "without any model (docs/xai.md).", ""] + lines

