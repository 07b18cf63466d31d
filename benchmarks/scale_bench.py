"""Memory and speed against dataset size: is each step's memory bounded by the batch?

    python benchmarks/scale_bench.py [--scales 1,4,16] [--size 110] [--augment 0]
                                     [--out outputs/scale_bench]

For each scale s the synthetic generator writes s x the full SIPaKMeD size (s x 4049 cells, s x 966
cluster images; generated once and kept in OUT/raw_s), then every step runs as its own process
and reports its wall time and peak resident memory (the process and its workers):

    prepare   --size SIZE --augment A --no-images (the array cache only)
    train     tiny, one epoch; images/s = train images / the epoch's seconds (validation
              included), from the run's summary.json
    eval      the test split
    explain   Grad-CAM on one cell per class

Run it twice, with the package of two checkouts on PYTHONPATH, to compare before and after a
change; the table is printed as Markdown.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MEASURE = """
import json, resource, sys, time
sys.argv = ["cli.py"] + sys.argv[1:]
import cli
t0 = time.time()
code = cli.main(sys.argv[1:])
wall = time.time() - t0
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kids_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("MEASURE " + json.dumps({"code": code, "seconds": wall,
                               "peak_rss_gb": max(self_kb, kids_kb) / 1024 ** 2}), flush=True)
"""


def measure(*args) -> dict:
    """Run ``cli.py ARGS`` in a fresh process; its exit code, wall seconds and peak RSS (GB)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    env.setdefault("PYTHONPATH", str(REPO))
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("MEASURE ")), None)
    if line is None:
        raise SystemExit(f"cli.py {' '.join(map(str, args))} failed:\n{out.stderr[-2000:]}")
    result = json.loads(line[len("MEASURE "):])
    if result["code"] != 0:
        raise SystemExit(f"cli.py {' '.join(map(str, args))}: exit {result['code']}\n"
                         f"{out.stderr[-2000:]}")
    return result


def raw_set(out: Path, scale: int) -> Path:
    """The synthetic raw set at ``scale`` x the full size (kept between runs)."""
    from cervical import synthetic

    raw = out / f"raw_{scale}"
    if not (raw / "synthetic.json").is_file():
        t = time.time()
        synthetic.generate(raw, per_class={c: n * scale for c, n in synthetic.FULL_COUNTS.items()},
                           overwrite=True)
        print(f"generated scale {scale} in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return raw


def one_scale(out: Path, scale: int, size: int, augment: int) -> dict:
    raw = raw_set(out, scale)
    prep, run = out / f"prepared_{scale}", out / f"run_{scale}"
    p = measure("prepare", "--dataset", "synthetic", "--data-dir", raw, "--out", prep,
                "--size", size, "--augment", augment, "--no-images", "--overwrite", "--quiet")
    info = json.loads((prep / "dataset.json").read_text())
    t = measure("train", "--data", prep, "--out", run, "--model", "tiny", "--epochs", 1,
                "--overwrite", "--quiet")
    summary = json.loads((run / "summary.json").read_text())
    e = measure("eval", "--run", run, "--n-boot", 0, "--overwrite", "--quiet")
    x = measure("explain", "--run", run, "--methods", "gradcam", "--overwrite", "--quiet")
    cache_gb = sum(f.stat().st_size for f in (prep / "cache").glob("*.npy")) / 1024 ** 3
    return {"scale": scale, "cells": info["n_cells"] if "n_cells" in info else None,
            "train_images": info["totals"]["train"], "cache_gb": cache_gb,
            "prepare_s": p["seconds"], "prepare_gb": p["peak_rss_gb"],
            "train_s": t["seconds"], "train_gb": t["peak_rss_gb"],
            "images_per_s": info["totals"]["train"] / summary["seconds_per_epoch"],
            "eval_gb": e["peak_rss_gb"], "explain_gb": x["peak_rss_gb"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,4,16")
    p.add_argument("--size", type=int, default=110)
    p.add_argument("--augment", type=int, default=0)
    p.add_argument("--out", default="outputs/scale_bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("| scale | train images | cache GB | prepare s | prepare peak GB | train s | train peak GB "
          "| train images/s | eval peak GB | explain peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale in (int(s) for s in args.scales.split(",")):
        r = one_scale(out, scale, args.size, args.augment)
        print(f"| x{scale} | {r['train_images']} | {r['cache_gb']:.2f} | {r['prepare_s']:.0f} | "
              f"{r['prepare_gb']:.2f} | {r['train_s']:.0f} | {r['train_gb']:.2f} | "
              f"{r['images_per_s']:.0f} | {r['eval_gb']:.2f} | {r['explain_gb']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
