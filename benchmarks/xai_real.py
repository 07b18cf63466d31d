"""Saliency maps on real Herlev cells against the model-free controls, and what moves the result.

A colleague found that on real Herlev cells no saliency method located the nucleus better than a
fixed centred Gaussian. This benchmark repeats that measurement on the Herlev sample
(``/work/shared/data/herlev_sample``: 297 real cells at 40 x 40 px with the experts' nucleus masks,
7 classes; read in place, never copied into the repository) and then changes one factor at a time.

Protocol. ``cervical.data.prepare`` (Herlev, task 2class: normal vs abnormal, grouped stratified
5-fold split, each image its own group, no offline augmentation) into a temporary folder; tiny is
trained on each fold's train part (early stopping on its val part) and explains that fold's test
cells, so all 297 cells are explained by a model that never saw them. ``xai_eval.evaluate_methods``
per fold, pooled over the folds (``xai_eval.pool_evaluations``); per cell, method minus control on
nucleus energy share and nucleus pointing (controls: centred Gaussian, darkness, Sobel edges, random
map, and the nucleus area fraction = chance), 95 % bootstrap interval over cells, verdict.

Row sets (one factor at a time, everything else as in the baseline):

baseline    64 px, default training (``cervical.train`` defaults: up to 50 epochs, early stopping
            patience 3 on val_loss, best epoch kept, no augmentation), every method at the default
            CAM layer "features" (stride 8) and at "relu2" (stride 4) + LIME; full evaluation
            (deletion / insertion, ROAD, sanity check on fold 0) -> the paired table of every score.
layer       features vs relu2 (same models; the rows of each method at each layer).
class       abnormal vs normal cells (same maps; abnormal nuclei are larger).
outcome     correctly classified vs misclassified cells (same maps).
size        the 40-px crops resized to 110 px instead of 64 (new models; CAMs only).
training    (a) online augmentation "light" (flips, transposes, crops, brightness / contrast);
            (b) longer training: 40 epochs without early stopping, the last epoch kept (the
            baseline's early stopping on a 48-cell validation part keeps epoch 1-4);
            (c) both (a combination, stated as such) (new models; CAMs only).
combined    not one factor: 110 px with (c), the best of each factor together, to see whether
            any setting tried here reaches the centred Gaussian.

Factor runs score localisation only (deletion / insertion at 2 steps, no ROAD, no sanity check) and
leave LIME out (it does not depend on the CAM layer; at 110 px it alone would exceed the time
budget). Printed: per row set the model's pooled accuracy and balanced accuracy with intervals and
the localisation verdicts; the full Markdown tables go to --out.

Usage:
    python benchmarks/xai_real.py --part baseline      # baseline, layer, class, outcome rows
    python benchmarks/xai_real.py --part size          # 110 px instead of 64
    python benchmarks/xai_real.py --part training      # augmentation, longer training, both
    python benchmarks/xai_real.py --part combined      # 110 px with augmentation and 40 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

HERLEV_SAMPLE = "/work/shared/data/herlev_sample"
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam")
LAYERS = ("features", "relu2")
CONTROLS = ("centre", "darkness", "edges", "random", "area")

#: Training variants: name -> TrainConfig fields.
TRAINING = {"default": {},
            "augment": {"online_augment": "light"},
            "longer": {"epochs": 40, "patience": 0, "keep": "last"},
            "augment+longer": {"online_augment": "light", "epochs": 40, "patience": 0, "keep": "last"}}

#: The factor runs of each part: (row set name, image size, training variant).
FACTORS = {"size": [("size 110 px (default training)", 110, "default")],
           "training": [("training: augment light (64 px)", 64, "augment"),
                        ("training: 40 epochs, last kept (64 px)", 64, "longer"),
                        ("training: augment light + 40 epochs, last kept (64 px)", 64,
                         "augment+longer")],
           "combined": [("combined: 110 px + augment light + 40 epochs, last kept", 110,
                         "augment+longer")]}


def prepare_folds(herlev: str, size: int, folds: int, work: Path) -> Path:
    """Herlev 2-class, grouped stratified K-fold, resized to ``size`` px, in ``work`` (temporary)."""
    from cervical import data

    out = work / f"herlev_{size}"
    if not (out / "fold_0" / "dataset.json").is_file():
        data.prepare(dataset="herlev", data_dir=herlev, out=out, size=size, task="2class",
                     folds=folds, augment=0, save_images=False, workers=1, overwrite=True, seed=42)
    return out


def explainers(lime: bool) -> Dict[str, Any]:
    """{"<method> @ <layer>": explain} for the CAMs at both layers, then LIME if asked."""
    from cervical import explain

    out = {f"{explain.TITLES[m]} @ {layer}": fn for layer in LAYERS
           for m, fn in explain.explainers(list(CAM_METHODS), layer).items()}
    if lime:
        out["LIME"] = explain.explainers(["lime"])["lime"]
    return out


def cross_validate(folder: Path, folds: int, training: Dict[str, Any], full: bool, seed: int,
                   work: Path, tag: str) -> Dict[str, Any]:
    """Train tiny on every fold and evaluate its test cells; the pooled evaluation and accuracies."""
    from cervical import data, explain, train, xai_eval

    parts, kept, t_train = [], [], 0.0
    for k in range(folds):
        t0 = time.perf_counter()
        run = work / f"run_{tag}_{k}"
        cfg = train.TrainConfig(data=str(folder / f"fold_{k}"), out=str(run), model="tiny",
                                seed=seed, overwrite=True, **training)
        summary = train.train(cfg)
        model, _ = explain.load_run(run)
        t_train += time.perf_counter() - t0
        test = data.load_split(folder / f"fold_{k}", "test")
        settings = (xai_eval.EvalSettings(n_sanity=5 if k == 0 else 0, seed=seed) if full else
                    xai_eval.EvalSettings(n_sanity=0, road=False, steps=2, seed=seed))
        parts.append(xai_eval.evaluate_methods(model, test.x, test.y, test.masks, explainers(full),
                                               predict=explain._probabilities(model),
                                               settings=settings))
        kept.append(summary["kept_epoch"])
    pooled = xai_eval.pool_evaluations(parts)
    return {"parts": parts, "pooled": pooled, "kept_epochs": kept, "train_seconds": t_train}


def accuracy_line(metrics: Dict[str, Any]) -> str:
    """Accuracy and balanced accuracy of the explained cells, with 95 % bootstrap intervals."""
    from cervical.metrics import bootstrap_ci

    y, p = np.asarray(metrics["labels"]), np.asarray(metrics["predicted"])
    if y.size == 0:
        return "no cells"
    if np.unique(y).size == 1:                  # one class: accuracy is that class's recall
        ci = bootstrap_ci(y, p, metric="accuracy", n=1000, seed=0)
        return (f"{y.size} cells of one class; recall {ci['estimate']:.3f} "
                f"[{ci['low']:.3f}, {ci['high']:.3f}]")
    parts = []
    for name in ("accuracy", "balanced_accuracy"):
        ci = bootstrap_ci(y, p, metric=name, n=1000, seed=0)
        parts.append(f"{name.replace('_', ' ')} {ci['estimate']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")
    majority = max(np.mean(y == c) for c in np.unique(y))
    return f"{y.size} cells; " + ", ".join(parts) + f" (majority class {majority:.3f})"


def row_set(name: str, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """One row set: its accuracy line and the localisation table against the controls."""
    from cervical import xai_eval

    table = xai_eval.localisation_comparisons(metrics, "nucleus")
    return {"name": name, "accuracy": accuracy_line(metrics), "n": metrics["n_cells"],
            "table": table, "means": {m: {s: metrics["methods"][m][s]["mean"]
                                          for s in ("nucleus_energy", "nucleus_pointing")}
                                      for m in metrics["methods"]},
            "reference_means": {r: {s: metrics["reference"][r][s]["mean"]
                                    for s in ("nucleus_energy", "nucleus_pointing")}
                                for r in metrics["reference"]},
            "chance": {s: metrics["chance"][k]["mean"] for s, k in
                       (("nucleus_energy", "nucleus_area"), ("nucleus_pointing", "nucleus_pointing"))}}


def subsets(pooled: Dict[str, Any], class_names: Sequence[str]) -> List[Dict[str, Any]]:
    """The row sets that need no new model: class and outcome (correct / misclassified)."""
    from cervical import xai_eval

    y, p = np.asarray(pooled["labels"]), np.asarray(pooled["predicted"])
    out = []
    for c, cname in enumerate(class_names):
        out.append(row_set(f"class: {cname}", xai_eval.pool_evaluations([pooled], keep=y == c)))
    for label, keep in (("outcome: correct", y == p), ("outcome: misclassified", y != p)):
        if keep.any():
            out.append(row_set(label, xai_eval.pool_evaluations([pooled], keep=keep)))
    return out


def summary_table(sets: Sequence[Dict[str, Any]]) -> str:
    """One line per (row set, method): means and the verdicts against every control."""
    head = ("| row set | method | energy | Δ vs centre | vs darkness | vs edges | vs random | "
            "vs area | pointing | Δ vs centre | vs darkness | vs area |")
    lines = [head, "|---" * 12 + "|"]
    for rs in sets:
        for m, scores in rs["table"].items():
            e, pt = scores["nucleus_energy"], scores["nucleus_pointing"]
            cells = [rs["name"], m, f"{rs['means'][m]['nucleus_energy']:.3f}",
                     _d(e["centre"])] + [e[c]["verdict"] for c in ("darkness", "edges", "random", "area")]
            cells += [f"{rs['means'][m]['nucleus_pointing']:.2f}", _d(pt["centre"]),
                      pt["darkness"]["verdict"], pt["area"]["verdict"]]
            lines.append("| " + " | ".join(cells) + " |")
        ref = rs["reference_means"]
        lines.append(f"| {rs['name']} | (centre / darkness / edges / random / chance) | "
                     f"{ref['centre']['nucleus_energy']:.3f} / {ref['darkness']['nucleus_energy']:.3f}"
                     f" / {ref['edges']['nucleus_energy']:.3f} / {ref['random']['nucleus_energy']:.3f}"
                     f" / {rs['chance']['nucleus_energy']:.3f} | | | | | | "
                     f"{ref['centre']['nucleus_pointing']:.2f} / {ref['darkness']['nucleus_pointing']:.2f}"
                     f" / {rs['chance']['nucleus_pointing']:.2f} | | | |")
    return "\n".join(lines)


def _d(c: Dict[str, Any]) -> str:
    return f"{c['estimate']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}"


def run_baseline(args, work: Path, out: Path) -> List[Dict[str, Any]]:
    """Baseline at 64 px with the full evaluation, and the layer, class and outcome row sets."""
    from cervical import data, xai_eval

    t0 = time.perf_counter()
    folder = prepare_folds(args.herlev, 64, args.folds, work)
    names = data.read_info(folder / "fold_0")["class_names"]
    cv = cross_validate(folder, args.folds, TRAINING["default"], True, args.seed, work, "base")
    pooled = cv["pooled"]
    report = xai_eval.format_metrics_md(pooled, "Herlev sample, tiny at 64 px, 5-fold, pooled")
    (out / "xai_real_baseline.md").write_text(report)
    print("\n## Baseline: the paired table of every score (pooled over the folds)\n")
    print(f"kept epochs per fold {cv['kept_epochs']}; {accuracy_line(pooled)}\n")
    print(report.split("## Paired comparisons with the reference maps", 1)[-1].strip())
    sets = [row_set("baseline (64 px, default training)", pooled)] + subsets(pooled, names)
    print(f"\nwall time: training {cv['train_seconds']:.0f} s, total {time.perf_counter() - t0:.0f} s")
    return sets


def run_factors(args, work: Path, part: str) -> List[Dict[str, Any]]:
    """The size or training row sets (new models, CAMs only, localisation only)."""
    sets = []
    for name, size, training in FACTORS[part]:
        t0 = time.perf_counter()
        folder = prepare_folds(args.herlev, size, args.folds, work)
        cv = cross_validate(folder, args.folds, TRAINING[training], False, args.seed, work,
                            f"{size}_{training}")
        sets.append(row_set(name, cv["pooled"]))
        print(f"{name}: kept epochs {cv['kept_epochs']}; {sets[-1]['accuracy']}; "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    return sets


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--herlev", default=HERLEV_SAMPLE, help="the Herlev sample folder (read only)")
    p.add_argument("--part", choices=("baseline", "size", "training", "combined", "all"),
                   default="all",
                   help="which row sets to run (each part about 10 min on 2 CPU cores)")
    p.add_argument("--folds", type=int, default=5, help="grouped stratified folds")
    p.add_argument("--seed", type=int, default=0, help="training and evaluation seed")
    p.add_argument("--out", default="outputs/xai_real", help="reports (no images are written)")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"# Saliency on real Herlev cells ({args.herlev}), tiny, {args.folds}-fold, seed {args.seed}")
    with tempfile.TemporaryDirectory(prefix="xai-real-") as tmp:
        work = Path(tmp)
        sets = run_baseline(args, work, out) if args.part in ("baseline", "all") else []
        for part in ("size", "training", "combined"):
            if args.part in (part, "all"):
                print(f"\n## Factor runs: {part}\n")
                sets += run_factors(args, work, part)
    from cervical import xai_eval

    with open(out / f"xai_real_{args.part}_sets.md", "w") as fh:
        for rs in sets:
            fh.write(f"\n## {rs['name']}\n\n{rs['accuracy']}\n\n"
                     + xai_eval.format_localisation_md(rs["table"]))
    print("\n## Localisation by row set (nucleus; Δ = method − control, 95 % bootstrap over cells)\n")
    for rs in sets:
        print(f"- {rs['name']}: {rs['accuracy']}")
    print("\n" + summary_table(sets))
    (out / f"xai_real_{args.part}.json").write_text(json.dumps(sets, indent=1, default=float))
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
