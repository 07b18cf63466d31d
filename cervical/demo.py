"""The whole study in one command, offline, on the embedded synthetic SIPaKMeD-like dataset.

``python cli.py demo`` runs, in order, the steps a reader of the thesis would run on SIPaKMeD:

    1. prepare   generate the synthetic set (real SIPaKMeD layout, five classes, .dat contours),
                 size analysis, resize, grouped split (no cluster image in two splits), augmentation
    2. train     ``tiny`` fine-tuned; the same model continued cost-sensitively (train-label class
                 weights, as the study did with --init); one small supervised-contrastive run (SupCon)
    3. eval      every run on the held-out test split (metrics, tables, confusion matrix)
    4. explain   the fine-tuned model's test cells with every CAM method and LIME, plus the
                 quantitative evaluation (deletion/insertion, nucleus energy share against the
                 expert masks, pointing game, randomisation sanity check)
    5. report    the study's tables and figures over the three runs

Sizes are reduced so the whole run fits in a few minutes on two CPU cores (``DEMO_SIZES``);
``quick=True`` shrinks them further for the test suite. The numbers printed at the end are the
accuracies against chance, and each explanation method's nucleus energy share against its chance
level and, cell by cell, against model-free control maps (a centred Gaussian, a darkness map, a
random map), with the verdict those paired intervals support - beating chance alone says little,
since a centred blob beats it too on centred cells. Nothing here is hard-coded: every figure is
read back from the files the steps wrote.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

__all__ = ["DEMO_SIZES", "QUICK_SIZES", "run_demo", "format_demo"]

#: Settings of the full demo (about 3-4 minutes on 2 CPU cores).
DEMO_SIZES: Dict[str, Any] = {
    "size": 64, "per_class": 100, "augment": 3,
    "epochs": 15, "cost_epochs": 4, "contrastive_epochs": 6, "contrastive_head_epochs": 8,
    "n_eval": 20, "n_sanity": 3, "lime_samples": 300, "lime_segments": 30,
}
#: Settings of ``--quick`` (the end-to-end test; well under a minute).
QUICK_SIZES: Dict[str, Any] = {
    "size": 40, "per_class": 24, "augment": 1,
    "epochs": 2, "cost_epochs": 1, "contrastive_epochs": 1, "contrastive_head_epochs": 1,
    "n_eval": 5, "n_sanity": 2, "lime_samples": 40, "lime_segments": 12,
}

_MARKER = "demo.json"


class DemoError(ValueError):
    """The demo folder cannot be used (it holds something that is not an earlier demo)."""


def _is_demo(folder: Path) -> bool:
    """True when ``folder`` holds the marker an earlier run_demo wrote (a JSON object with its sizes)."""
    import json

    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and "sizes" in marker and "seed" in marker


def _clear_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` an empty folder; only an earlier demo (or --overwrite) may be replaced."""
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out}: is a file; name a folder")
    if out.is_dir() and any(out.iterdir()):
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents) or (out / ".git").exists():
            raise DemoError(f"--out {out}: holds the working folder or a git repository; "
                            "name a folder of its own, e.g. outputs/demo")
        if not (overwrite or _is_demo(out)):
            raise DemoError(f"--out {out}: folder is not empty and holds no earlier demo; "
                            "choose another folder or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _prefixed(progress: Optional[Callable], prefix: str) -> Optional[Callable]:
    """``progress`` with every step name prefixed (None stays None)."""
    if progress is None:
        return None
    # steps that already name themselves ("explain: maps", "report: runs") keep their one prefix
    return lambda step, done, total: progress(
        step if step.startswith(prefix) else f"{prefix}{step}", done, total)


def _epoch_progress(progress: Optional[Callable], name: str) -> list:
    """A Keras callback reporting each epoch (with loss and validation accuracy) to ``progress``."""
    if progress is None:
        return []
    import keras

    class EpochProgress(keras.callbacks.Callback):
        done, total = 0, 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            self.total = int(self.params.get("epochs") or epoch + 1)
            self.done = min(epoch + 1, self.total)
            shown = ", ".join(f"{k} {logs[k]:.3f}" for k in ("loss", "val_accuracy") if k in logs)
            progress(f"train {name}: epochs ({shown})", self.done, self.total)

        def on_train_end(self, logs=None):
            if 0 < self.done < self.total:      # early stopping: close the line honestly
                progress(f"train {name}: stopped early after {self.done} of {self.total} epochs",
                         self.done, self.done)

    return [EpochProgress()]


def run_demo(out: os.PathLike = "outputs/demo", quick: bool = False, seed: int = 42,
             overwrite: bool = False, say: Callable[[str], None] = print,
             progress: Optional[Callable] = None) -> Dict[str, Any]:
    """Run the five study steps on the synthetic dataset and return the headline figures.

    Args:
        out: demo folder; an earlier demo there is replaced, anything else is refused.
        quick: the reduced sizes of :data:`QUICK_SIZES` (tests) instead of :data:`DEMO_SIZES`.
        seed: seed of the data, split, augmentation, training and explanations.
        overwrite: replace ``out`` even if it holds something other than an earlier demo.
        say: where step headers and results are printed.
        progress: None, or ``progress(step, done, total)`` for long loops (cervical.files).

    Returns:
        dict with "out", "sizes", "seconds" per step, "runs" {name: {"test_accuracy", "macro_f1",
        "run"}}, "chance_accuracy", "cam" {method: {"nucleus_energy", "chance_nucleus_area"}},
        "sanity" {method: passed}, "report" (path of report.md).
    """
    from cervical import files   # TensorFlow only after prepare: its worker pool can fork

    out = Path(out)
    sizes = dict(QUICK_SIZES if quick else DEMO_SIZES)
    _clear_out(out, overwrite)
    files.write_json(out / _MARKER, {"quick": quick, "seed": seed, "sizes": sizes,
                                     "finished": False})
    seconds: Dict[str, float] = {}

    def step(key: str, title: str, fn: Callable, *args):
        say(f"\n== {title}")
        t = time.perf_counter()
        value = fn(*args)
        seconds[key] = time.perf_counter() - t
        return value

    prepared = step("prepare", f"1/5 prepare: synthetic SIPaKMeD-like set, {sizes['per_class']} "
                    f"cells per class, {sizes['size']} px, grouped split, x{sizes['augment'] + 1} "
                    f"augmentation", _prepare, out, sizes, seed, say, progress)
    runs = step("train", "2/5 train: three regimes of the study", _train, prepared,
                out / "runs", sizes, seed, say, progress)
    results = step("eval", "3/5 eval: each run on the held-out test split", _evaluate, runs,
                   seed, say, progress)
    explained = step("explain", "4/5 explain: GradCAM, GradCAM++, LayerCAM, ScoreCAM, "
                     "Faster-ScoreCAM and LIME on the fine-tuned model, with the quantitative "
                     "evaluation", _explain, runs["finetune"], sizes, seed, say, progress)
    report_path = step("report", "5/5 report: the study's tables and figures over the three runs",
                       _report, list(runs.values()), out / "report", progress)
    n_classes = len(next(iter(results.values()))["class_names"])
    result = {"out": str(out), "quick": quick, "seed": seed, "sizes": sizes, "seconds": seconds,
              "runs": {k: {key: v[key] for key in ("test_accuracy", "macro_f1", "run",
                                                   "accuracy_ci", "accuracy_ci_cells")}
                       for k, v in results.items()},
              "chance_accuracy": 1.0 / n_classes, **explained,
              "report": str(report_path), "finished": True}
    files.write_json(out / _MARKER, result)
    return result


def _prepare(out: Path, sizes: dict, seed: int, say: Callable, progress) -> Path:
    """Step 1: generate the synthetic raw set and prepare it (grouped split, augmentation)."""
    from cervical import data

    prepared = out / "prepared"
    summary = data.prepare(dataset="synthetic", data_dir=out / "raw", out=prepared,
                           size=sizes["size"], split="grouped", augment=sizes["augment"], seed=seed,
                           per_class=sizes["per_class"], save_images=True,
                           progress=_prefixed(progress, "prepare: "))
    say(data.format_summary(summary))
    from cervical import import_tensorflow_quietly
    import_tensorflow_quietly()
    return prepared


#: The demo's three runs: name, what it is, TrainConfig options (sizes filled in by _train).
_PLANS = (
    ("finetune", "tiny fine-tuned (Adam 1e-3, cross-entropy, best val_loss weights kept)",
     dict(regime="finetune")),
    ("cost-sensitive", "tiny continued with train-label class weights (--init finetune)",
     dict(regime="cost-sensitive", model=None)),
    ("contrastive", "tiny with SupCon (two views per image), then a frozen-encoder classifier",
     dict(regime="contrastive", loss="supcon", online_augment=True)),
)


def _train(prepared: Path, runs_dir: Path, sizes: dict, seed: int, say: Callable,
           progress) -> Dict[str, Path]:
    """Step 2: fine-tune tiny, continue it cost-sensitively, train one SupCon run."""
    from cervical import train

    epochs = {"finetune": dict(epochs=sizes["epochs"]),
              "cost-sensitive": dict(epochs=sizes["cost_epochs"],
                                     init=str(runs_dir / "finetune")),
              "contrastive": dict(contrastive_epochs=sizes["contrastive_epochs"],
                                  epochs=sizes["contrastive_head_epochs"])}
    runs = {}
    for name, title, options in _PLANS:
        say(f"-- {name}: {title}")
        cfg = train.TrainConfig(**{"data": str(prepared), "model": "tiny", "seed": seed,
                                   "batch_size": 32, "verbose": 0, "out": str(runs_dir / name),
                                   **options, **epochs[name]})
        say(train.format_summary(train.train(cfg, callbacks=_epoch_progress(progress, name))))
        runs[name] = runs_dir / name
    return runs


def _evaluate(runs: Dict[str, Path], seed: int, say: Callable, progress) -> Dict[str, dict]:
    """Step 3: every run on the test split (metrics, tables, figures in RUN/eval/test)."""
    from cervical import report

    results = {}
    for name, run in runs.items():
        ev = report.evaluate_run(run, split="test", progress=_prefixed(progress, f"eval {name}: "),
                                 n_boot=200, seed=seed)
        say(report.format_eval(ev))
        results[name] = {"test_accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
                         "run": str(run), "class_names": ev["class_names"],
                         "accuracy_ci": (ev.get("ci") or {}).get("accuracy"),
                         "accuracy_ci_cells": (ev.get("ci_cells") or {}).get("accuracy")}
    return results


def _explain(run: Path, sizes: dict, seed: int, say: Callable, progress) -> Dict[str, Any]:
    """Step 4: every method on the fine-tuned model, with the quantitative XAI evaluation."""
    from cervical import explain, xai_eval

    ex = explain.explain_run(run, split="test", methods="all", per_class=1, evaluate=True,
                             n_eval=sizes["n_eval"], n_sanity=sizes["n_sanity"], sanity_blocks=3,
                             lime_samples=sizes["lime_samples"],
                             lime_segments=sizes["lime_segments"], seed=seed,
                             progress=_prefixed(progress, "explain: "))
    say(f"explanations written to {ex['out_dir']}")
    metrics = ex["metrics"] or {}
    chance = ((metrics.get("chance") or {}).get("nucleus_area") or {}).get("mean")

    def mean(r: dict, key: str):
        return (r.get(key) or {}).get("mean")

    paired = (metrics.get("paired") or {}).get("comparisons") or {}
    cam = {m: {"nucleus_energy": mean(r, "nucleus_energy"), "chance_nucleus_area": chance,
               "deletion_auc": mean(r, "deletion_auc"), "insertion_auc": mean(r, "insertion_auc"),
               "nucleus_energy_vs": {ref: paired.get(m, {}).get(ref, {}).get("nucleus_energy")
                                     for ref in xai_eval.CONTROL_NAMES}}
           for m, r in (metrics.get("methods") or {}).items()}
    sanity = {m: s.get("passed") for m, s in (metrics.get("sanity") or {}).items()}
    verdict = xai_eval.verdict_sentences(metrics, explain.TITLES) if paired else []
    verdict = verdict[:2] + verdict[-1:] if len(verdict) > 3 else verdict   # localisation + overall
    return {"cam": cam, "sanity": sanity, "xai_verdict": verdict, "explain_dir": ex["out_dir"]}


def _report(runs: list, out: Path, progress) -> Path:
    """Step 5: the study's tables and figures over the three runs."""
    from cervical import report

    return report.build_report(runs, out, split="test", progress=_prefixed(progress, "report: "))


def format_demo(result: Dict[str, Any]) -> str:
    """The closing summary: accuracy against chance, CAM nucleus energy against chance, timings."""
    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    lines = ["", "== summary"]
    if result.get("quick"):
        lines.append("(--quick: a smoke test of every step on a few dozen cells and 1-2 epochs; its "
                     "figures say nothing about the methods; run without --quick for those)")
    chance = result["chance_accuracy"]
    for name, r in result["runs"].items():
        lines.append(f"{name:<15} test accuracy {pct(r['test_accuracy'])}  macro-F1 "
                     f"{r['macro_f1']:.3f}   (chance {pct(chance)})")
    if result["cam"]:
        lines += _cam_lines(result, pct)
    total = sum(result["seconds"].values())
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
                 + f"; total {total:.0f} s")
    lines.append(f"explanations: {result['explain_dir']}")
    lines.append(f"report: {result['report']}")
    lines.append(f"open in a browser: {Path(result['explain_dir']) / 'index.html'} (every "
                 f"explained cell) and {Path(result['report']).with_name('report.html')}")
    return "\n".join(lines)


def _cam_lines(result: Dict[str, Any], pct: Callable) -> list:
    """Each method's nucleus energy share, its paired verdict against every control, the verdict."""
    def vs(c: Optional[dict]) -> str:
        if not c or c.get("estimate") is None:
            return "n/a"
        return (f"{c['verdict']} ({100 * c['estimate']:+.1f} [{100 * c['low']:+.1f}, "
                f"{100 * c['high']:+.1f}] points)")

    first = next(iter(result["cam"].values()))
    lines = ["share of map energy on the nucleus (fine-tuned model; chance = nucleus area "
             f"{pct(first['chance_nucleus_area'])}), and per cell against each model-free "
             "control map (95 % cluster-bootstrap interval):"]
    for m, r in result["cam"].items():
        check = result["sanity"].get(m)
        flag = "" if check is None else ("; sanity check passed" if check
                                         else "; sanity check FAILED (map ignores the weights)")
        controls = "; ".join(f"vs {name}: {vs(r.get('nucleus_energy_vs', {}).get(ref))}"
                             for ref, name in (("centre", "centred Gaussian"),
                                               ("darkness", "darkness"), ("random", "random")))
        lines.append(f"  {m:<16} {pct(r['nucleus_energy'])}{flag}")
        lines.append(f"  {'':<16} {controls}")
    if result.get("xai_verdict"):
        lines.append("verdict: " + " ".join(result["xai_verdict"]))
    return lines
