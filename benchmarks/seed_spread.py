"""Seed spread of every figure a test or the README asserts about a trained model.

A test that trains something and asserts its quality must hold on any machine, so its threshold
comes from a distribution, not from one run. This script measures those distributions:

    python benchmarks/seed_spread.py toy-losses [--seeds 50] [--group 5]
        the contrastive toy encoder of tests/test_losses.py: per loss, the median over each group
        of ``--group`` seeds (the statistic the test asserts) for disjoint groups of seeds
    python benchmarks/seed_spread.py tiny [--seeds 5]
        tiny on the synthetic default (tests/test_train.py::test_tiny_learns_the_synthetic_default)
    python benchmarks/seed_spread.py demo [--seeds 5] [--out outputs/seed_spread]
        the demo's printed figures (accuracies, macro-F1, nucleus energy shares) over seeds

Each prints min / median / max. Set TF_ENABLE_ONEDNN_OPTS=0 to rerun on TensorFlow's other CPU
kernels: a second numeric path on the same machine (different summation orders), the nearest
stand-in for another machine that one machine has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def spread(values) -> str:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return "n/a"
    return f"{np.median(v):.3f} [{v.min():.3f} - {v.max():.3f}] (n = {len(v)})"


def toy_losses(args) -> dict:
    from test_losses import TOY_LOSSES, toy_encoder_runs

    out = {}
    for name, fn in TOY_LOSSES.items():
        r = toy_encoder_runs(fn, seeds=range(args.seeds))
        r["inter_drop"] = r["inter0"] - r["inter"]
        groups = [np.arange(g, args.seeds, args.seeds // args.group)
                  for g in range(args.seeds // args.group)]
        out[name] = {}
        for key in ("inter_drop", "inter", "intra", "loss_drop"):
            medians = [float(np.median(r[key][idx])) for idx in groups]
            out[name][key] = {"single_runs": [float(r[key].min()), float(r[key].max())],
                              "group_medians": medians}
            print(f"{name:<20} {key:<11} median of {args.group}: {spread(medians)}; single runs "
                  f"{r[key].min():.3f} ... {r[key].max():.3f}", flush=True)
    return out


def tiny(args) -> dict:
    import tempfile

    from cervical import data, train

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        data.prepare(dataset="synthetic", out=prepared, save_images=False)
        for seed in range(args.seeds):
            t = time.time()
            s = train.train(train.TrainConfig(data=str(prepared), out=f"{tmp}/run{seed}",
                                              model="tiny", epochs=12, seed=seed))
            out[seed] = {"val_accuracy": s["val_accuracy"], "best_epoch": s["best_epoch"],
                         "seconds": time.time() - t}
            print(f"seed {seed}: val_accuracy {s['val_accuracy']:.4f} at epoch {s['best_epoch']} "
                  f"({time.time() - t:.0f} s)", flush=True)
    print("val_accuracy:", spread(r["val_accuracy"] for r in out.values()))
    return out


def demo(args) -> dict:
    results = {}
    for seed in range(args.seeds):
        folder = Path(args.out) / f"seed_{seed}"
        marker = folder / "demo.json"
        finished = marker.is_file() and json.loads(marker.read_text()).get("finished")
        if not finished:
            subprocess.run([sys.executable, str(REPO / "cli.py"), "demo", "--seed", str(seed),
                            "--out", str(folder), "--overwrite"], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL)
        results[seed] = json.loads(marker.read_text())
    print(demo_table(list(results.values())))
    return results


def demo_table(results) -> str:
    """Markdown rows: figure | median [min - max] over the given demo.json results."""
    rows = ["| figure | median [min - max] |", "|---|---|"]
    for name in results[0]["runs"]:
        for key, label in (("test_accuracy", "test accuracy"), ("macro_f1", "macro-F1")):
            v = [100 * r["runs"][name][key] if key == "test_accuracy" else r["runs"][name][key]
                 for r in results]
            rows.append(f"| {name} {label} | {_fmt(v, key == 'test_accuracy')} |")
    for method in results[0]["cam"]:
        v = [100 * r["cam"][method]["nucleus_energy"] for r in results]
        rows.append(f"| {method} nucleus energy share (%) | {_fmt(v, True)} |")
    chance = [100 * next(iter(r["cam"].values()))["chance_nucleus_area"] for r in results]
    rows.append(f"| nucleus area = chance (%) | {_fmt(chance, True)} |")
    secs = [sum(r["seconds"].values()) for r in results]
    rows.append(f"| demo seconds | {_fmt(secs, True, 0)} |")
    return "\n".join(rows)


def _fmt(v, pct: bool, digits: int = 1) -> str:
    v = np.asarray(v, float)
    d = digits if pct else 3
    return f"{np.median(v):.{d}f} [{v.min():.{d}f} - {v.max():.{d}f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["toy-losses", "tiny", "demo"])
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--out", default="outputs/seed_spread")
    p.add_argument("--json", default=None, help="also write the measurements to this file")
    args = p.parse_args(argv)
    args.seeds = args.seeds or {"toy-losses": 50, "tiny": 5, "demo": 5}[args.what]
    result = {"toy-losses": toy_losses, "tiny": tiny, "demo": demo}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
