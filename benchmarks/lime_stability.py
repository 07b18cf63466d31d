"""How many LIME samples does a trained model need? Top-k stability across seeds, per sample count.

For a run folder (``python cli.py train``), one test cell per class (the first of each class in the
prepared test split): for each N in ``--sweep`` and each pair of seeds, the Jaccard index
|A n B| / |A u B| of the top-k superpixels (``Explanation.top_features(k)``; SLIC is deterministic,
so superpixel ids agree between seeds), and the explanation time. Printed per N: mean Jaccard over
cells and seed pairs, and the time relative to N = the first sweep value (same process, side by side).

Usage (after ``python cli.py demo``):
    python benchmarks/lime_stability.py --run outputs/demo/runs/finetune
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder with model.keras and config.json")
    p.add_argument("--data", default=None, help="prepared dataset (default: the run's)")
    p.add_argument("--sweep", default="250,500,1000,2000", help="sample counts N")
    p.add_argument("--seeds", type=int, default=3, help="seeds per N")
    p.add_argument("--top", type=int, default=5, help="k of the top-k Jaccard")
    p.add_argument("--segments", type=int, default=30, help="SLIC superpixels")
    args = p.parse_args(argv)

    import keras

    import cervical.models  # noqa: F401  (registers the in-model preprocessing layer)
    from cervical import data, lime_lite

    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())
    model = keras.models.load_model(run / "model.keras")
    test = data.load_split(args.data or config["data_dir"], "test")
    cells = [int(np.flatnonzero(test.y == c)[0]) for c in np.unique(test.y)]
    predict = lambda batch: model.predict_on_batch(batch)   # noqa: E731
    sweep = [int(v) for v in args.sweep.split(",") if v]
    print(f"{run}: {len(cells)} test cells (one per class), {args.segments} superpixels, "
          f"top-{args.top}, {args.seeds} seeds per N")
    print(f"{'N':>6} {'Jaccard':>8} {'s/explanation':>14} {'time ratio':>11}")
    base = None
    for n in sweep:
        jac, secs = [], []
        for i in cells:
            image = test.x[i].astype(np.float32)
            tops = []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                exp = lime_lite.explain(predict, image, num_samples=n, n_segments=args.segments,
                                        seed=seed)
                secs.append(time.perf_counter() - t0)
                tops.append(set(int(f) for f in exp.top_features(args.top)))
            for a, b in itertools.combinations(tops, 2):
                union = a | b
                jac.append(len(a & b) / len(union) if union else 1.0)
        t = float(np.median(secs))
        base = base or t
        print(f"{n:>6} {np.mean(jac):>8.2f} {t:>14.3f} {t / base:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
