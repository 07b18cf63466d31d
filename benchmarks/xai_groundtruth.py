"""Ground-truth benchmark of the saliency methods: do the maps find the evidence the model used?

On real crops a centred Gaussian finds the nucleus as well as any method (docs/xai.md), so real
cells cannot tell an informative map from a centre prior. Here the class is decided ONLY by a small
inclusion whose place is known per cell and varies (``cervical.synthetic.cue_cells``): a ring
(class 1) or a disk of the same outer radius and integrated optical density (class 0), drawn in the
cytoplasm of a cell of any morphology, away from its nucleus and from the canvas centre, with the
cell itself pasted at a random place. A model that classifies these cells must use the inclusion,
so a map that explains it must put its energy and its peak there.

Two settings, each trained and explained in the same way:

cue       the inclusion is drawn; tiny is trained on train/val and must learn it (test accuracy
          printed with a bootstrap interval).
no cue    the same cells without the inclusion and with coin-flip labels (a model trained on noise):
          the "cue" region is only where the inclusion would have been, so every map must fall to
          chance there.

For each setting, ``cervical.xai_eval.evaluate_methods`` on ``--eval`` class-balanced test cells with
every method (Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM, Faster-Score-CAM at the default CAM layer
"features" and at the higher-resolution "relu2"; LIME), and the localisation table
(``xai_eval.localisation_comparisons``): per cell, the method's cue energy share and cue pointing
hit minus those of the centred Gaussian, the darkness map, the Sobel edge map, the random map, the
region's area fraction (what a uniform map / a random point scores) and the same map's score at a
placebo site drawn by the same rule (exchangeable with the true site when there is no cue), each
with a 95 % bootstrap interval over cells and a verdict beats / ties / loses.

Outputs (in --out, default outputs/xai_groundtruth): per setting the prepared data, the run, the
full metrics JSON and Markdown report, and examples_<setting>.png (cells, ground truth, maps).

Usage:
    python benchmarks/xai_groundtruth.py                 # both settings, about 7 min on 2 cores
    python benchmarks/xai_groundtruth.py --accuracy-only --train-seeds 0,1,2,3,4 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

#: CAM methods of the table and the layers they are computed at.
CAM_METHODS = ("gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam")
LAYERS = ("features", "relu2")
SCORE_TITLES = {"nucleus_energy": "cue energy share", "nucleus_pointing": "cue pointing"}
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}

#: The cue setting's model must reach this test accuracy, else its maps are not about a model that
#: uses the cue: the lowest test accuracy of training seeds 0-4 (15 epochs, 1500 training cells,
#: ``--accuracy-only``: 0.997, 0.997, 1.000, 1.000, 0.997 on the 300 test cells) minus a margin of
#: 0.05.
MIN_CUE_ACCURACY = 0.947


def cue_splits(sizes: Dict[str, int], size: int, seed: int, cue: bool) -> Dict[str, Any]:
    """{split: CueSet}; split k uses seed 1000 * seed + SPLIT_SEEDS[k] (the same cells for both
    settings: the negative setting is the cue setting without the inclusion)."""
    from cervical import synthetic

    return {k: synthetic.cue_cells(n, size=size, seed=1000 * seed + SPLIT_SEEDS[k], cue=cue)
            for k, n in sizes.items()}


def write_dataset(folder: Path, sets: Dict[str, Any]) -> None:
    """A prepared dataset (cervical.data layout) from the CueSets; classes "disk" (0), "ring" (1)."""
    from cervical import data

    if folder.exists():
        shutil.rmtree(folder)
    splits = {k: dict(x=c.images, y=c.labels, masks=c.masks) for k, c in sets.items()}
    data.write_prepared(folder, splits, ["disk", "ring"], save_images=False,
                        info={"dataset": "cue_cells", "task": "ring-vs-disk",
                              "cue": bool(next(iter(sets.values())).cue)})


def train_tiny(folder: Path, run: Path, epochs: int, seed: int):
    """Train tiny on the prepared folder (defaults of cervical.train otherwise); (model, summary)."""
    from cervical import explain, train

    summary = train.train(train.TrainConfig(data=str(folder), out=str(run), model="tiny",
                                            epochs=epochs, seed=seed, overwrite=True))
    model, _ = explain.load_run(run)
    return model, summary


def accuracy_ci(predict, x: np.ndarray, y: np.ndarray, seed: int = 0) -> Dict[str, Any]:
    """Accuracy on (x, y) with a 95 % percentile bootstrap interval over cells, and under
    "balanced" the balanced accuracy (mean recall of the two classes) with its interval: 0.5 in
    expectation whenever the predictions are independent of the labels, however lopsided."""
    from cervical.metrics import bootstrap_ci, cluster_mean_ci

    pred = np.concatenate([predict(x[i:i + 256].astype(np.float32)).argmax(1)
                           for i in range(0, len(x), 256)])
    out = cluster_mean_ci((pred == y).astype(np.float64), n=2000, seed=seed)
    out["balanced"] = bootstrap_ci(y, pred, metric="balanced_accuracy", n=2000, seed=seed,
                                   num_classes=2)
    return out


def method_explainers(layers: Sequence[str] = LAYERS, lime: bool = True) -> Dict[str, Any]:
    """{"<method> @ <layer>": explain} for every CAM method and layer, then "LIME"."""
    from cervical import explain

    out = {}
    for layer in layers:
        for method, fn in explain.explainers(list(CAM_METHODS), layer).items():
            out[f"{explain.TITLES[method]} @ {layer}"] = fn
    if lime:
        out["LIME"] = explain.explainers(["lime"])["lime"]
    return out


def evaluate_setting(model, cues, explainers: Dict[str, Any], predict=None, settings=None,
                     progress=None) -> Dict[str, Any]:
    """The benchmark's evaluation of one setting on the given cells.

    ``evaluate_methods`` with the cue masks (mask == 2: the inclusion's disc) and the placebo disc
    as an extra region, then ``localisation_comparisons`` against every control.

    Args:
        model: the Keras model (or any object the explainers accept).
        cues: a CueSet (or one indexed like it) of the cells to evaluate.
        explainers: {name: explain(model, images, classes) -> maps}.
        predict: images -> probabilities (default: the model).
        settings: xai_eval.EvalSettings.
    Returns:
        {"metrics": evaluate_methods' result, "table": localisation_comparisons' result}.
    """
    from cervical import xai_eval

    metrics = xai_eval.evaluate_methods(model, cues.images, cues.labels, cues.masks, explainers,
                                        predict=predict, settings=settings, progress=progress,
                                        regions={"placebo": cues.placebo})
    table = xai_eval.localisation_comparisons(metrics, "nucleus", placebo="placebo")
    return {"metrics": metrics, "table": table}


def subset(cues, rows: np.ndarray):
    """The CueSet rows ``rows`` (array fields indexed, the rest kept)."""
    import dataclasses

    return dataclasses.replace(cues, **{f.name: getattr(cues, f.name)[rows]
                                        for f in dataclasses.fields(cues)
                                        if isinstance(getattr(cues, f.name), np.ndarray)})


def means_table(metrics: Dict[str, Any], labels: np.ndarray) -> str:
    """Mean cue energy share and pointing per map, overall and per true class (disk / ring)."""
    rows = ["| map | cue energy | (disk / ring) | cue pointing | (disk / ring) | placebo energy |",
            "|---|---|---|---|---|---|"]
    for name, v in metrics["per_cell"].items():
        cells = []
        for key in ("nucleus_energy", "nucleus_pointing"):
            a = np.asarray(v[key], dtype=np.float64)
            cells += [f"{np.nanmean(a):.3f}",
                      f"{np.nanmean(a[labels == 0]):.3f} / {np.nanmean(a[labels == 1]):.3f}"]
        cells.append(f"{np.nanmean(np.asarray(v['placebo_energy'], dtype=np.float64)):.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    ch = metrics["chance"]
    rows.append(f"| (area fraction) | {ch['nucleus_area']['mean']:.3f} | | "
                f"{ch['nucleus_pointing']['mean']:.3f} | | {ch['placebo_area']['mean']:.3f} |")
    return "\n".join(rows)


def verdict_grid(metrics: Dict[str, Any]) -> str:
    """Faithfulness at a glance: per method and score its mean and its verdicts against the
    centred Gaussian, darkness, edges and random maps (b beats, t ties, l loses), in that order."""
    scores = [("deletion_auc", "deletion ↓"), ("insertion_auc", "insertion ↑"),
              ("road_morf_auc", "ROAD MoRF ↓"), ("road_lerf_auc", "ROAD LeRF ↑"),
              ("road_lerf_minus_morf", "LeRF − MoRF ↑")]
    scores = [(k, t) for k, t in scores if k in next(iter(metrics["per_cell"].values()))]
    comp = metrics["paired"]["comparisons"]
    lines = ["| method | " + " | ".join(t for _, t in scores) + " |", "|---" * (len(scores) + 1) + "|"]
    for m in metrics["methods"]:
        cells = [f"{metrics['methods'][m][k]['mean']:.3f} · " + " ".join(
            comp[m][r][k]["verdict"][0] for r in ("centre", "darkness", "edges", "random"))
            for k, _ in scores]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    refs = " / ".join(f"{r} " + ", ".join(f"{metrics['reference'][r][k]['mean']:.3f}" for k, _ in scores)
                      for r in ("centre", "darkness", "edges", "random"))
    return "\n".join(lines) + f"\n\nReference means ({', '.join(t for _, t in scores)}): {refs}"


def peak_offsets(model, cues, predict, layers: Sequence[str] = LAYERS) -> str:
    """Where the CAM peaks lie: median distance (px) from the peak to the cue centre on the cells
    predicted "ring", and its median component towards the canvas centre (negative = outwards),
    for the package's corner-aligned upsampling and for a half-pixel-aligned bilinear resize
    (skimage ``resize``, order 1) of the same raw maps."""
    from skimage.transform import resize

    from cervical import cams

    x = cues.images.astype(np.float32)
    pred = predict(x).argmax(1)
    ring = np.flatnonzero(pred == 1)
    lines = ["| map | upsampling | peak - cue distance (median px) | towards the centre (median px) |",
             "|---|---|---|---|"]
    s = x.shape[1]
    for layer in layers:
        for method in ("gradcam", "layercam"):
            raw = cams.compute(method, model, x[ring], class_index=pred[ring], layer=layer, upsample=False)
            aligned = {"corner-aligned (package)": cams.resize_bilinear(raw, (s, s)),
                       "half-pixel": np.stack([resize(r, (s, s), order=1, mode="edge") for r in raw])}
            for how, maps in aligned.items():
                peaks = np.array([np.unravel_index(np.argmax(a), a.shape) for a in maps], float)
                cue = cues.centres[ring][:, ::-1]                   # (row, col)
                to_centre = (s - 1) / 2.0 - cue
                to_centre /= np.linalg.norm(to_centre, axis=1, keepdims=True)
                d = peaks - cue
                lines.append(f"| {method} @ {layer} | {how} | {np.median(np.hypot(*d.T)):.1f} | "
                             f"{np.median((d * to_centre).sum(1)):+.1f} |")
    return "\n".join(lines) + f"\n\n({len(ring)} cells predicted ring.)"


def example_figure(model, cues, explainers: Dict[str, Any], predict, path: Path, n: int = 8) -> None:
    """Cells (half disk, half ring), their cue region and the maps of every method and reference."""
    from matplotlib.figure import Figure

    from cervical import xai_eval

    rows = np.concatenate([np.flatnonzero(cues.labels == c)[: n // 2] for c in (0, 1)])
    x = cues.images[rows]
    pred = predict(x.astype(np.float32)).argmax(1)
    maps = {k: np.asarray(fn(model, x, pred)) for k, fn in explainers.items()}
    refs = xai_eval.reference_maps(x.shape[:3], images=x)
    maps.update({k: refs[k] for k in ("darkness", "edges", "centre")})
    cols = ["image", "cue region"] + list(maps)
    fig = Figure(figsize=(1.3 * len(cols), 1.4 * len(rows)))
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for i, r in enumerate(rows):
        panels = [x[i], cues.masks[r]] + [maps[k][i] for k in maps]
        for j, (ax, p) in enumerate(zip(axes[i], panels)):
            ax.imshow(p, cmap=None if j == 0 else "viridis")
            if j > 1:
                ax.contour(cues.masks[r] == 2, levels=[0.5], colors="w", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=6)
        axes[i][0].set_ylabel(f"{'ring' if cues.labels[r] else 'disk'} -> "
                              f"{'ring' if pred[i] else 'disk'}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_setting(name: str, cue: bool, args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Generate, train, explain and evaluate one setting; print its tables; return its record."""
    from cervical import explain, xai_eval

    t0 = time.perf_counter()
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    sets = cue_splits(sizes, args.size, args.data_seed, cue)
    write_dataset(out / f"data_{name}", sets)
    t_data = time.perf_counter() - t0
    model, summary = train_tiny(out / f"data_{name}", out / f"run_{name}", args.epochs, args.seed)
    predict = explain._probabilities(model)
    acc = accuracy_ci(predict, sets["test"].images, sets["test"].labels)
    t_train = time.perf_counter() - t0 - t_data
    test = subset(sets["test"], xai_eval.choose_eval_cells(sets["test"].labels, args.eval))
    settings = xai_eval.EvalSettings(n_sanity=args.sanity)
    result = evaluate_setting(model, test, method_explainers(), predict, settings)
    t_eval = time.perf_counter() - t0 - t_data - t_train
    example_figure(model, test, method_explainers(("features", "relu2"), lime=True), predict,
                   out / f"examples_{name}.png")
    _print_setting(name, cue, sets, summary, acc, result, test.labels,
                   (t_data, t_train, t_eval, time.perf_counter() - t0))
    if cue:
        print("\nWhere the CAM peaks lie (cells predicted ring; the cue disc has radius R + 0.5 = "
              f"{np.median(test.radii) + 0.5:.1f} px, median):\n")
        print(peak_offsets(model, test, predict))
    metrics = result["metrics"]
    (out / f"xai_metrics_{name}.md").write_text(xai_eval.format_metrics_md(metrics, f"XAI, {name}"))
    record = {"setting": name, "cue": cue, "test_accuracy": acc, "train_summary": summary,
              "model_check": _model_check(cue, acc),
              "table": result["table"], "metrics": {k: v for k, v in metrics.items() if k != "per_cell"},
              "seconds": {"data": t_data, "train": t_train, "evaluate": t_eval}}
    (out / f"groundtruth_{name}.json").write_text(json.dumps(record, indent=1, default=float))
    return record


def _model_check(cue: bool, acc: Dict[str, Any]) -> bool:
    """Did the model do what the setting needs? With the cue: test accuracy >= MIN_CUE_ACCURACY.
    Without it: the balanced-accuracy interval does not lie above 0.5, i.e. nothing shows that
    the model predicts the coin-flip labels better than chance (the balanced accuracy, unlike the
    plain one, is 0.5 in expectation for any predictions independent of the labels). Only "above"
    fails: with labels independent of the images a test accuracy below chance is a chance
    deviation, not information (the run of docs/xai.md §5 gave 0.437 [0.382, 0.494]; a first
    version of this check also failed below 0.5). Printed."""
    if cue:
        ok = acc["estimate"] >= MIN_CUE_ACCURACY
        print(f"model check: test accuracy {acc['estimate']:.3f} {'>=' if ok else '<'} "
              f"{MIN_CUE_ACCURACY} -> {'the model uses the cue' if ok else 'FAILED: the model did not learn the cue; the verdicts above are not about a cue-using model'}")
    else:
        b = acc["balanced"]
        ok = b["low"] <= 0.5
        print(f"model check: balanced accuracy {b['estimate']:.3f} [{b['low']:.3f}, {b['high']:.3f}] "
              f"{'not above' if ok else 'ABOVE'} 0.5 -> "
              f"{'no label information learned' if ok else 'FAILED: the model predicts coin flips'}")
    return ok


def _print_setting(name, cue, sets, summary, acc, result, labels, times) -> None:
    from collections import Counter

    from cervical import xai_eval

    metrics = result["metrics"]
    morph = Counter(sets["train"].cell_classes)
    print(f"\n## Setting: {name} ({'inclusion drawn, label = ring vs disk' if cue else 'no inclusion, coin-flip labels'})\n")
    print(f"cells: " + ", ".join(f"{k} {len(v.labels)}" for k, v in sets.items())
          + f"; train morphologies: " + ", ".join(f"{k} {v}" for k, v in sorted(morph.items())))
    print(f"tiny: kept epoch {summary['kept_epoch']} of {summary['epochs_run']}, val accuracy "
          f"{summary['val_accuracy']:.3f}; test accuracy {acc['estimate']:.3f} "
          f"[{acc['low']:.3f}, {acc['high']:.3f}], balanced accuracy "
          f"{acc['balanced']['estimate']:.3f} [{acc['balanced']['low']:.3f}, "
          f"{acc['balanced']['high']:.3f}] (95 % bootstrap, {acc['n']} cells)")
    test = subset(sets["test"], xai_eval.choose_eval_cells(sets["test"].labels, metrics["n_cells"]))
    overlap = np.mean([(p & (m == 2)).any() for p, m in zip(test.placebo, test.masks)])
    print(f"explained: {metrics['n_cells']} class-balanced test cells, predicted class "
          f"(accuracy on them {metrics['accuracy_on_cells']:.3f}); the placebo disc overlaps the "
          f"cue disc in {100 * overlap:.0f} % of them\n")
    print(means_table(metrics, labels) + "\n")
    print(xai_eval.format_localisation_md(result["table"], score_titles=SCORE_TITLES))
    print("Faithfulness (mean · verdict vs centre, darkness, edges, random; b beats, t ties, "
          "l loses; full table in xai_metrics_<setting>.md):\n")
    print(verdict_grid(metrics))
    sanity = ", ".join(f"{k} {'pass' if s['passed'] else 'FAIL' if s['passed'] is False else 'n/a'}"
                       for k, s in metrics["sanity"].items())
    print(f"\nSanity (cascading randomisation, {metrics['settings']['sanity_cells']} cells): {sanity}")
    print(f"\nwall time: data {times[0]:.0f} s, training {times[1]:.0f} s, evaluation {times[2]:.0f} s, "
          f"setting total {times[3]:.0f} s")


def accuracy_study(args: argparse.Namespace, out: Path) -> int:
    """Train the cue setting with several seeds; print val and test accuracy per seed (the epoch
    count of the benchmark is chosen from this)."""
    from cervical import explain

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    sets = cue_splits(sizes, args.size, args.data_seed, True)
    write_dataset(out / "data_cue", sets)
    print(f"| seed | epochs | kept epoch | val accuracy | test accuracy [95 % CI] | s |\n|---|---|---|---|---|---|")
    for seed in [int(s) for s in args.train_seeds.split(",")]:
        t0 = time.perf_counter()
        model, summary = train_tiny(out / "data_cue", out / f"run_seed{seed}", args.epochs, seed)
        acc = accuracy_ci(explain._probabilities(model), sets["test"].images, sets["test"].labels)
        print(f"| {seed} | {args.epochs} | {summary['kept_epoch']} | {summary['val_accuracy']:.3f} | "
              f"{acc['estimate']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/xai_groundtruth", help="output folder")
    p.add_argument("--size", type=int, default=64, help="canvas side in px")
    p.add_argument("--train", type=int, default=1500, help="training cells")
    p.add_argument("--val", type=int, default=300, help="validation cells")
    p.add_argument("--test", type=int, default=300, help="test cells")
    p.add_argument("--eval", type=int, default=100, help="test cells explained and evaluated")
    p.add_argument("--epochs", type=int, default=15, help="maximum training epochs")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated cells")
    p.add_argument("--sanity", type=int, default=5, help="cells of the randomisation check")
    p.add_argument("--settings", default="cue,no-cue", help="which settings to run")
    p.add_argument("--accuracy-only", action="store_true", help="only the seed study of accuracy")
    p.add_argument("--train-seeds", default="0,1,2,3,4", help="seeds of --accuracy-only")
    args = p.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.accuracy_only:
        return accuracy_study(args, out)
    print(f"# Ground-truth XAI benchmark (cue cells, {args.size} px, seed {args.seed})")
    records = [run_setting(name, name == "cue", args, out) for name in args.settings.split(",")]
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0 if all(r["model_check"] for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
