"""``eval``: one run on one split -> metrics with intervals, the study's tables and figures.

Thesis §6.3 reports, per backbone and regime, a classification table (Tables 6.2-6.4) read off a
confusion matrix. ``evaluate_run`` rebuilds them from a run folder and fixes what the study's
notebooks got wrong (docs/study.md §5): rows = true class and columns = predicted class, class
names instead of 0-4, cluster-bootstrap intervals, calibration, and the split protocol printed
beside every number. ``cervical.report`` builds the report over several runs from these files.

    evaluate_run(run_dir, data_dir=None, split="test")  -> RUN/eval/<split>/{metrics.json, ...}

Figures use Matplotlib's object API with the Agg canvas (no pyplot state, nothing left open).
Every file is written atomically (cervical.files).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import files, metrics

__all__ = [
    "ReportError",
    "SPLITS",
    "protocol_label",
    "classification_table",
    "plot_confusion_matrix",
    "plot_reliability",
    "evaluate_run",
    "format_eval",
    "untested_version_notes",
]

SPLITS = ("train", "val", "test", "all")

#: Training regimes in the order of the thesis, with the table and figure each one mirrors.
REGIMES = {
    "finetune": ("Fine-tuning", "cf. thesis Table 6.2, Fig. 6.1"),
    "cost-sensitive": ("Cost-sensitive learning", "cf. thesis Table 6.3, Fig. 6.2"),
    "contrastive": ("Supervised contrastive learning", "cf. thesis Table 6.4, Fig. 6.4"),
    "baseline": ("End-to-end baseline", "the study's from-scratch comparison, in its notebooks only"),
}

#: Display labels of models.MODEL_NAMES, in the row order of thesis Tables 6.2-6.4.
MODEL_LABELS = {"vgg16": "VGG16", "vgg19": "VGG19", "densenet169": "DenseNet169",
               "mobilenetv2": "MobileNetV2", "resnet50": "ResNet50", "tiny": "Tiny CNN"}

#: Metrics aggregated (mean ± std) over folds or repeated runs.
AGG_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "weighted_precision",
               "weighted_recall", "kappa", "roc_auc", "log_loss", "brier", "ece", "sensitivity",
               "specificity")

EVAL_FILES = ("metrics.json", "predictions.csv", "classification.md", "classification.csv",
              "classification.tex", "confusion_matrix.png", "reliability.png")

Progress = Optional[files.Progress]


class ReportError(ValueError):
    """Bad input to ``eval`` or ``report``; the message is one line naming the input and the fix."""


# --------------------------------------------------------------------------------------------
# small helpers: formatting
# --------------------------------------------------------------------------------------------
def _finite(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x, digits: int = 4) -> str:
    x = _finite(x)
    return "–" if x is None else f"{x:.{digits}f}"


def _fmt_pm(mean, std, digits: int = 4) -> str:
    if _finite(mean) is None:
        return "–"
    if std is None:
        return _fmt(mean, digits)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pct(x, digits: int = 2) -> str:
    x = _finite(x)
    return "–" if x is None else f"{100 * x:.{digits}f} %"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "run"


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        return str("" if v is None else v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "±": r"$\pm$"}


def _tex(text) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str("" if text is None else text))


def _tex_table(header: Sequence[str], rows: Sequence[Sequence], caption: str, label: str) -> str:
    cols = "l" + "r" * (len(header) - 1)
    out = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{_tex(caption)}}}", rf"\label{{{label}}}",
           rf"\begin{{tabular}}{{{cols}}}", r"\hline",
           " & ".join(_tex(h) for h in header) + r" \\", r"\hline"]
    out += [" & ".join(_tex(v) for v in r) + r" \\" for r in rows]
    out += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# protocol labels
# --------------------------------------------------------------------------------------------
def protocol_label(split: Optional[str], fold: Optional[int] = None, folds: Optional[int] = None,
                   cell_level_groups: bool = False) -> str:
    """Human label of a dataset's split protocol (dataset.json "split").

    "thesis" and the study's manifest (``manifest:thesis_split.csv``) are the study's cell-level
    split: cells of one cluster image can sit in train and test.  "grouped" keeps every cluster
    image inside one split.

    Args:
        split: dataset.json's "split" value (None when unknown).
        fold: the fold index when the dataset is one fold of a K-fold split.
        folds: K.
        cell_level_groups: the dataset had no group information (every image its own group),
            so a "grouped" split is in fact a cell-level one.

    Returns:
        e.g. "cell-level (thesis)", "grouped", "grouped 5-fold CV", "manifest (x.csv)", "unknown".
    """
    if not split:
        return "unknown"
    s = str(split)
    if s == "thesis" or (s.startswith("manifest:") and "thesis" in s):
        return "cell-level (thesis)"
    if s == "grouped" and cell_level_groups:
        return "cell-level (no group information: one group per image)"
    if s == "grouped":
        if fold is not None:
            return f"grouped {folds}-fold CV" if folds else "grouped K-fold CV"
        return "grouped"
    if s.startswith("manifest:"):
        return f"manifest ({s.split(':', 1)[1]})"
    return s


def _fold_of(config: dict, info: dict, data_dir: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(fold, K) from the run config, the dataset info or a data folder named fold_<k>."""
    fold = config.get("fold", info.get("fold"))
    folds = config.get("folds", info.get("folds"))
    if fold is None and data_dir:
        m = re.fullmatch(r"fold_(\d+)", Path(data_dir).name)
        if m:
            fold = int(m.group(1))
    return (int(fold) if fold is not None else None), (int(folds) if folds else None)


# --------------------------------------------------------------------------------------------
# evaluation of one run
# --------------------------------------------------------------------------------------------
def _read_config(run: Path) -> dict:
    return files.read_run_config(run)


def _load_model(path: Path):
    from cervical import models

    return models.load_model_file(path)


def classification_table(summary: dict) -> Tuple[List[str], List[List[str]]]:
    """The thesis layout of Tables 6.2–6.4 for one model: class rows, then macro and weighted averages.

    The thesis headed its columns "Weighted Precision / Recall / F1" but printed the per-class
    values of scikit-learn's classification_report; here the per-class rows say what they are
    and the support-weighted averages get their own row.

    Args:
        summary: a :func:`cervical.metrics.summarize` dict.

    Returns:
        (header, rows) of strings; accuracy (%) sits in the first row as in the thesis.
    """
    header = ["Class", "Precision", "Recall", "F1 score", "Support", "Accuracy"]
    rows = []
    for i, (name, pc) in enumerate(summary["per_class"].items()):
        rows.append([name, _fmt(pc["precision"]), _fmt(pc["recall"]), _fmt(pc["f1"]), str(pc["support"]),
                     _pct(summary["accuracy"]) if i == 0 else ""])
    n = summary["n"]
    rows.append(["macro avg", _fmt(summary["macro_precision"]), _fmt(summary["macro_recall"]),
                 _fmt(summary["macro_f1"]), str(n), ""])
    rows.append(["weighted avg", _fmt(summary["weighted_precision"]), _fmt(summary["weighted_recall"]),
                 _fmt(summary["weighted_f1"]), str(n), ""])
    return header, rows


def plot_confusion_matrix(cm, class_names: Sequence[str], path: os.PathLike, title: str = "") -> Path:
    """Confusion matrix figure: rows = true class, columns = predicted class.

    Each cell shows the count and the row-normalised percentage (share of the true class), the
    colour is the row-normalised value, so per-class recall sits on the diagonal.

    Args:
        cm: (K, K) counts, cm[i, j] = #{true i, predicted j}.
        class_names: K tick labels.
        path: PNG to write.
        title: figure title.

    Returns:
        the PNG path.
    """
    from matplotlib.figure import Figure

    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = max(4.0, 1.0 + 1.1 * k)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.1f}%", ha="center", va="center",
                    fontsize=8 if k <= 7 else 6, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(class_names, rotation=35, ha="right")
    ax.set_yticklabels(class_names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title or "Confusion matrix (rows: true, columns: predicted)")
    return files.save_figure(fig, path)


def plot_reliability(reliability: dict, ece: Optional[float], path: os.PathLike, title: str = "") -> Path:
    """Reliability diagram (Guo et al. 2017, Fig. 1): accuracy vs confidence per bin, plus bin counts.

    Args:
        reliability: :func:`cervical.metrics.reliability_data` output.
        ece: expected calibration error shown in the title.
        path: PNG to write.
        title: figure title prefix.

    Returns:
        the PNG path.
    """
    from matplotlib.figure import Figure

    edges = np.asarray(reliability["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([np.nan if a is None else a for a in reliability["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in reliability["confidence"]])
    count = np.asarray(reliability["count"])
    fig = Figure(figsize=(5.0, 6.0))
    ax = fig.add_axes((0.14, 0.36, 0.8, 0.56))
    ax2 = fig.add_axes((0.14, 0.08, 0.8, 0.2), sharex=ax)
    ok = count > 0
    ax.bar(centers[ok], acc[ok], width=width, edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(centers[ok], conf[ok] - acc[ok], bottom=acc[ok], width=width, color="#dd8452", alpha=0.45,
           edgecolor="#dd8452", hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}ECE = {_fmt(ece)} ({len(count)} bins)")
    ax2.bar(centers, count, width=width, color="gray", edgecolor="black")
    ax2.set_xlabel("Confidence (max probability)")
    ax2.set_ylabel("Count")
    return files.save_figure(fig, path)


def _resolve_eval_inputs(run: Path, data_dir, split: str):
    """Check the run folder and return (config, data folder, external flag)."""
    if split not in SPLITS:
        raise ReportError(f"--split {split}: unknown; choose one of {', '.join(SPLITS)}")
    if not run.is_dir():
        raise ReportError(f"--run {run}: not a folder; pass a run folder made by 'python cli.py train'")
    if not (run / "model.keras").is_file():
        raise ReportError(f"--run {run}: no model.keras; train the run first ('python cli.py train --out {run}')")
    config = _read_config(run)
    own = config.get("data_dir")
    if data_dir is None and not own:
        raise ReportError(f"--run {run}: config.json names no data_dir; pass --data DIR (a prepared dataset)")
    data = Path(data_dir if data_dir is not None else own)
    external = data_dir is not None and (not own or Path(own).resolve() != data.resolve())
    return config, data, external


def evaluate_run(run_dir: os.PathLike, data_dir: Optional[os.PathLike] = None, split: str = "test",
                 out_dir: Optional[os.PathLike] = None, progress: Progress = None, batch_size: int = 64,
                 n_boot: int = 1000, seed: int = 0, abnormal: Optional[Sequence[str]] = None,
                 overwrite: bool = True) -> dict:
    """Evaluate a trained run on one split and write the eval folder.

    Loads ``RUN/model.keras`` and the split of the run's prepared dataset (``config.json``
    "data_dir"), or of another prepared dataset (``data_dir``: external validation, e.g. a model
    trained on SIPaKMeD applied to Herlev with the same task classes).  Augmented training copies
    are left out: metrics are computed on original images only.

    Writes to ``out_dir`` (default ``RUN/eval/<split>``, or ``RUN/eval/external-<name>-<split>``
    for another dataset): metrics.json (:func:`cervical.metrics.summarize` with 95 % bootstrap
    intervals and a "meta" block), predictions.csv (path,true,predicted,prob_<class>...),
    classification.md/.csv/.tex (thesis layout), confusion_matrix.png, reliability.png.

    Args:
        run_dir: run folder with model.keras (and config.json).
        data_dir: prepared dataset to evaluate on (default: the run's own).
        split: "test", "val", "train" or "all".
        out_dir: where to write (default above).
        progress: None, or ``progress(step, done, total)`` (cervical.files.Progress).
        batch_size: images per forward pass.
        n_boot: bootstrap resamples for the intervals (0: none).
        seed: bootstrap seed.
        abnormal: class names counted as abnormal (default by name, see
            :func:`cervical.metrics.default_abnormal_classes`).
        overwrite: replace an earlier evaluation in the output folder (the command line asks
            for --overwrite; refused otherwise, before any work).

    Returns:
        the summary dict written to metrics.json, plus "files": {name: path}.

    Raises:
        ReportError: no model, no data folder, unknown split, classes that differ from the run's,
            or a model whose output size differs from the number of classes.
        cervical.data.DataError: the prepared dataset is missing, broken or the split is empty.
    """
    from cervical import models, out_of_range

    for flag, value, low, limit in (("--batch-size", batch_size, 1, "batch_size"),
                                    ("--n-boot", n_boot, 0, "n_boot")):
        problem = out_of_range(flag, value, low, limit)
        if problem:
            raise ReportError(problem)
    run = Path(run_dir)
    config, data, external = _resolve_eval_inputs(run, data_dir, split)
    if out_dir is None:
        sub = split if not external else f"external-{_slug(data.name)}-{split}"
        out_dir = run / "eval" / sub
    files.check_output_dir(out_dir, "metrics.json", replace=overwrite)
    cells = _eval_cells(config, data, split)
    model = _load_model(run / "model.keras")
    mismatch = models.input_size_mismatch(model, cells.x, data)
    if mismatch:
        raise ReportError(mismatch)
    prob = models.predict_proba(model, cells.x, batch_size=batch_size, progress=progress)
    if prob.shape[1] != len(cells.names):
        raise ReportError(f"{run / 'model.keras'}: outputs {prob.shape[1]} classes but {data} has "
                          f"{len(cells.names)} ({', '.join(cells.names)}); evaluate on data of the "
                          f"run's task")
    summary = metrics.summarize(cells.y, prob.argmax(axis=1), cells.names, y_prob=prob,
                                abnormal=abnormal, n_boot=n_boot, seed=seed, groups=cells.groups)
    summary["meta"] = _eval_meta(run, config, data, split, external, cells, n_boot, seed)
    summary["files"] = _write_eval_files(Path(out_dir), summary, cells, prob, config, run, split)
    return summary


@dataclasses.dataclass
class _EvalCells:
    """The original (not augmented) images of a split, labelled in the run's class order."""

    x: np.ndarray
    y: np.ndarray
    paths: List[str]
    groups: List[str]                 # cluster image of each cell (the bootstrap's unit)
    names: List[str]
    info: dict
    augmented_excluded: int


def _eval_cells(config: dict, data: Path, split: str) -> _EvalCells:
    from cervical import data as cdata

    info = cdata.read_info(data)
    part = cdata.load_split(data, split, mmap=True, masks=False)   # read a batch at a time
    names = list(part.class_names)
    y = np.asarray(part.y, dtype=np.int64)
    run_names = config.get("class_names")
    if run_names and list(run_names) != names:
        if sorted(run_names) != sorted(names):
            raise ReportError(f"--data {data}: classes {names} differ from the run's "
                              f"{list(run_names)}; evaluate on a dataset prepared with the same "
                              f"--task or --class-map")
        y = np.array([list(run_names).index(names[i]) for i in y], dtype=np.int64)
        names = list(run_names)                  # same set, other order
    keep = ~np.asarray(part.augmented, dtype=bool)
    if not keep.any():
        raise ReportError(f"--split {split}: only augmented copies in {data}; choose another split")
    x = part.x if keep.all() else part.x[keep]      # only "train" / "all" hold augmented copies
    return _EvalCells(x, y[keep], [p for p, k in zip(part.paths, keep) if k],
                      [g for g, k in zip(part.groups, keep) if k], names, info, int((~keep).sum()))


def _eval_meta(run: Path, config: dict, data: Path, split: str, external: bool,
               cells: _EvalCells, n_boot: int, seed: int) -> dict:
    """metrics.json's "meta": what was evaluated, on which data and protocol, with which versions."""
    info = cells.info
    protocol = info.get("split", config.get("split_protocol"))
    fold, folds = _fold_of(config, info, str(data))
    eval_versions = files.library_versions()
    return {
        "run": str(run.resolve()), "model": config.get("model"), "regime": config.get("regime"),
        "loss": config.get("loss"), "variant": config.get("variant"), "split": split,
        "data_dir": str(data.resolve()), "dataset": info.get("dataset"), "task": info.get("task"),
        "split_protocol": protocol,
        "protocol": protocol_label(protocol, fold, folds,
                                   bool((info.get("groups") or {}).get("cell_level"))),
        "fold": fold, "folds": folds, "external": bool(external),
        "augmented_excluded": cells.augmented_excluded, "n_boot": int(n_boot), "seed": int(seed),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": config.get("versions"), "eval_versions": eval_versions,
        "untested_versions": untested_version_notes(config.get("versions"), eval_versions),
    }


def _write_eval_files(out: Path, summary: dict, cells: _EvalCells, prob: np.ndarray,
                      config: dict, run: Path, split: str) -> Dict[str, str]:
    """The eval folder: metrics.json, predictions.csv, the thesis table (MD/CSV/TeX), figures.

    Built aside and swapped in whole (files.atomic_dir), one writer at a time: a killed eval
    leaves the previous complete folder or none.
    """
    with files.output_lock(out), files.atomic_dir(out, "metrics.json") as stage:
        written = _eval_files(stage, summary, cells, prob, config, run, split)
    return {k: str(out / Path(v).name) for k, v in written.items()}


def _eval_files(out: Path, summary: dict, cells: _EvalCells, prob: np.ndarray,
                config: dict, run: Path, split: str) -> Dict[str, Path]:
    names, pred = cells.names, prob.argmax(axis=1)
    written = {"metrics.json": files.write_json(out / "metrics.json", summary)}
    written["predictions.csv"] = files.write_csv(
        out / "predictions.csv", ["path", "true", "predicted"] + [f"prob_{c}" for c in names],
        [[p, names[t], names[q]] + [f"{v:.6f}" for v in pr]
         for p, t, q, pr in zip(cells.paths, cells.y, pred, prob)])
    header, rows = classification_table(summary)
    label = MODEL_LABELS.get(config.get("model"), config.get("model") or run.name)
    caption = (f"{label} ({config.get('regime') or 'run'}), {split} split, n = {summary['n']}, "
               f"{summary['meta']['protocol']} protocol")
    written["classification.md"] = files.write_text(out / "classification.md",
                                                    f"**{caption}**\n\n" + _md_table(header, rows))
    written["classification.csv"] = files.write_csv(out / "classification.csv", header, rows)
    written["classification.tex"] = files.write_text(
        out / "classification.tex", _tex_table(header, rows, caption, f"tab:{_slug(label)}-{split}"))
    written["confusion_matrix.png"] = plot_confusion_matrix(
        summary["confusion_matrix"], names, out / "confusion_matrix.png", title=caption)
    written["reliability.png"] = plot_reliability(summary["reliability"], summary["ece"],
                                                  out / "reliability.png", title=label)
    return written


def untested_version_notes(train_versions: Optional[dict], eval_versions: Optional[dict]) -> List[str]:
    """Libraries of a run (trained with ``train_versions``, evaluated with ``eval_versions``) whose
    versions differ from the tested set of ``cervical/constraints.txt``, e.g.
    ["trained with keras 3.14.0 (tested 3.15.1)"]. Empty when both match (or nothing is recorded)."""
    tested = files.tested_versions()
    notes = [f"trained with {d}" for d in files.untested_versions(train_versions, tested)]
    notes += [f"evaluated with {d}" for d in files.untested_versions(eval_versions, tested)]
    return notes


def format_eval(summary: dict) -> str:
    """A short terminal table of an :func:`evaluate_run` summary (per-class scores and headline numbers)."""
    meta = summary.get("meta", {})
    lines = [f"run {meta.get('run', '?')}  split {meta.get('split', '?')}  n = {summary['n']}  "
             f"protocol {meta.get('protocol', '?')}" + ("  (external data)" if meta.get("external") else "")]
    width = max(12, max(len(c) for c in summary["class_names"]))
    lines.append(f"{'class':<{width}}  precision  recall      f1  support")
    for name, pc in summary["per_class"].items():
        lines.append(f"{name:<{width}}  {pc['precision']:9.4f}  {pc['recall']:6.4f}  {pc['f1']:6.4f}  {pc['support']:7d}")
    ci = summary.get("ci", {})

    def with_ci(key):
        c = ci.get(key)
        return _fmt(summary[key]) + (f" [{c['low']:.4f}, {c['high']:.4f}]" if c else "")
    lines.append(f"accuracy {with_ci('accuracy')}   macro-F1 {with_ci('macro_f1')}   "
                 f"balanced accuracy {_fmt(summary['balanced_accuracy'])}   kappa {_fmt(summary['kappa'])}")
    acc = ci.get("accuracy") or {}
    if acc.get("method") == "cluster percentile":
        cells = (summary.get("ci_cells") or {}).get("accuracy") or {}
        lines.append(f"95 % intervals resample the {acc['n_groups']} cluster images (cells of one "
                     f"image are not independent); cell-level accuracy interval "
                     f"[{cells.get('low', float('nan')):.4f}, {cells.get('high', float('nan')):.4f}]")
    extra = [f"ROC-AUC {_fmt(summary.get('roc_auc'))}", f"log loss {_fmt(summary.get('log_loss'))}",
             f"ECE {_fmt(summary.get('ece'))}"]
    if summary.get("abnormal_classes"):
        extra += [f"sensitivity {_fmt(summary['sensitivity'])}", f"specificity {_fmt(summary['specificity'])}"
                  f" (abnormal = {', '.join(summary['abnormal_classes'])})"]
    lines.append("   ".join(extra))
    untested = meta.get("untested_versions")
    if untested:
        lines.append("note: versions other than the tested ones (cervical/constraints.txt): "
                     + "; ".join(untested))
    if summary.get("files"):
        lines.append(f"written to {Path(summary['files']['metrics.json']).parent}")
    return "\n".join(lines)
