"""Benchmark of ``prepare`` on a full-size synthetic SIPaKMeD (4049 cells, 966 cluster images, x7).

Target (issue 2): the whole prepare <= 5 minutes on 2 cores, using both cores.

    python benchmarks/prepare_bench.py            # full size, all cores and 1 core side by side
    python benchmarks/prepare_bench.py --quick    # 1/5 of the cells

Prints the time of each part, images/s, and the speed-up of all cores over one core.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cervical import data, synthetic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one fifth of the full size")
    ap.add_argument("--augment", type=int, default=6)
    ap.add_argument("--single-core", action="store_true", help="also time workers=1 (slow)")
    args = ap.parse_args()

    counts = synthetic.FULL_COUNTS
    if args.quick:
        counts = {k: v // 5 for k, v in counts.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        gen = synthetic.generate(tmp / "raw", per_class=counts, seed=0)
        t_gen = time.perf_counter() - t0
        n_cells = sum(counts.values())
        print(f"generate: {n_cells} cells in {t_gen:.1f} s ({n_cells / t_gen:.0f} cells/s)")

        runs = [("all cores", 0)] + ([("1 core", 1)] if args.single_core else [])
        timings = {}
        for label, workers in runs:
            t0 = time.perf_counter()
            s = data.prepare("sipakmed", tmp / "raw", tmp / f"out{workers}", augment=args.augment,
                             workers=workers)
            dt = time.perf_counter() - t0
            timings[label] = dt
            n_out = sum(s["totals"].values())
            print(f"prepare ({label}, {os.cpu_count()} cpus): {dt:.1f} s; {n_cells} cells in -> "
                  f"{n_out} images out (train {s['totals']['train']}, val {s['totals']['val']}, "
                  f"test {s['totals']['test']}); {n_out / dt:.0f} images/s")
        total = t_gen + timings["all cores"]
        print(f"generate + prepare: {total:.1f} s  (target <= 300 s: "
              f"{'met' if total <= 300 else 'MISSED'})")
        if "1 core" in timings:
            print(f"speed-up all cores / 1 core: {timings['1 core'] / timings['all cores']:.2f}x")
        print(f"cluster images: {gen.get('clusters', gen.get('n_clusters', 'n/a'))}")


if __name__ == "__main__":
    main()
