"""Benchmark cervical.lime_lite: explanation time vs plain batched inference, and stability.

Measured side by side in one run, per model (Keras applications, weights=None, 5 classes):

1. ratio = time of one ``explain(num_samples=N)`` / time of N forward passes of the same model
   in the same batches (``predict_on_batch``: 1.5-2x faster than ``model(x, training=False)``
   here), interleaved; reported as the median of paired ratios and as min(explain)/min(forward),
   the estimate least disturbed by other processes.
   Target (issue 7): ratio <= 1.15 at N = 1000, 110 x 110 input. Everything above 1.0 is LIME's
   own overhead: SLIC, building the perturbed images, the ridge solve.
2. The overhead split: SLIC, masking of all N images, ridge solve, each in ms and as % of (1).
3. For N in ``--sweep``: median explanation time over seeds, and the stability of the top-k
   superpixels across seeds: mean pairwise Jaccard |A n B| / |A u B| of ``top_features(k)``.
   (SLIC is deterministic, so superpixel ids are comparable between seeds.)

Usage:
    python benchmarks/lime_bench.py                      # MobileNetV2 + DenseNet169, full run
    python benchmarks/lime_bench.py --quick              # smoke run (small N, one repeat)
    python benchmarks/lime_bench.py --models mobilenetv2 --out outputs/lime_bench.json

Weights are random (weights=None) with BatchNorm statistics re-estimated on perturbed copies
of the image (otherwise MobileNetV2's output is exactly 1/5 for every input): timings are
representative; stability figures are for an untrained network and indicate the sampling noise
of the surrogate, not what a trained model gives (pass --weights for that). The machine load
(os.getloadavg) is printed before and after each model: ratios are measured in the same
process and interleaved, so load affects both sides, but a busy machine widens the spread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cervical import lime_lite  # noqa: E402

MODELS = {"mobilenetv2": "MobileNetV2", "densenet169": "DenseNet169"}


# ----------------------------------------------------------------------------- inputs
def synthetic_cell(size: int, seed: int) -> np.ndarray:
    """A Pap-smear-like cell: light background, cytoplasm ellipse, dark nucleus, smooth noise.

    Args:
        size: image side in pixels.
        seed: noise seed.

    Returns:
        (size, size, 3) float32 image in [0, 1].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.empty((size, size, 3))
    img[:] = (0.86, 0.80, 0.86)
    cyto = ((yy - 0.52) / 0.38) ** 2 + ((xx - 0.48) / 0.30) ** 2 < 1.0
    nucleus = ((yy - 0.47) / 0.12) ** 2 + ((xx - 0.52) / 0.10) ** 2 < 1.0
    img[cyto] = (0.55, 0.70, 0.78)
    img[nucleus] = (0.30, 0.22, 0.50)
    shade = 0.08 * np.sin(6.0 * yy + 1.0) * np.cos(5.0 * xx)
    img += shade[..., None] + rng.normal(0.0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def load_image(path: str, size: int) -> np.ndarray:
    """Read an RGB image, resize to size x size (bilinear), scale to [0, 1] float32."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def build_model(name: str, size: int, weights: str = None):
    """keras.applications model, 5 softmax outputs, random weights unless ``weights`` is given."""
    import keras

    model = getattr(keras.applications, MODELS[name])(
        weights=None, input_shape=(size, size, 3), classes=5)
    if weights:
        model.load_weights(weights)
    return model


def calibrate_batchnorm(model, image: np.ndarray, n: int = 64, seed: int = 123) -> None:
    """Re-estimate BatchNorm statistics of an untrained net on LIME-perturbed copies of the image.

    With weights=None every BatchNorm layer assumes mean 0 / variance 1; MobileNetV2's signal
    then dies out and the softmax is exactly 1/5 for every input, so no explanation (and no
    stability figure) is possible. One training-mode pass with momentum 0 sets the moving
    statistics to those of n perturbed images (a data-dependent initialisation). Timing is
    unaffected: the architecture and the FLOPs are the same.
    """
    import keras

    seg = lime_lite.segment(image)
    z = lime_lite.sample_masks(n, int(seg.max()) + 1, seed)
    x = lime_lite.perturb(image, lime_lite.fudged_image(image, seg), seg, z)
    bns = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
    saved = [l.momentum for l in bns]
    for layer in bns:
        layer.momentum = 0.0
    model(x, training=True)
    for layer, m in zip(bns, saved):
        layer.momentum = m


# ----------------------------------------------------------------------------- timings
def forward_time(model, images: np.ndarray, batch_size: int) -> float:
    """Seconds for plain batched inference over ``images``.

    The slices are the ones ``explain`` uses (at most ``batch_size`` rows, balanced so that
    every batch has the same shape: 1000 rows -> 4 x 250), so the ratio isolates LIME's own
    work instead of rewarding or penalising a ragged last batch.
    """
    t0 = time.perf_counter()
    for start, stop in lime_lite._batch_bounds(len(images), batch_size):
        np.asarray(model.predict_on_batch(images[start:stop]))
    return time.perf_counter() - t0


def explain_time(model, image: np.ndarray, n: int, seed: int, batch_size: int):
    """(seconds, Explanation) for one explanation."""
    t0 = time.perf_counter()
    exp = lime_lite.explain(model, image, num_samples=n, seed=seed, batch_size=batch_size)
    return time.perf_counter() - t0, exp


def overhead_split(image: np.ndarray, n: int, batch_size: int, seed: int) -> Dict[str, float]:
    """Seconds spent in LIME's own steps (no model): SLIC, masking of n images, ridge solve."""
    t0 = time.perf_counter()
    seg = lime_lite.segment(image)
    t1 = time.perf_counter()
    z = lime_lite.sample_masks(n, int(seg.max()) + 1, seed)
    fud = lime_lite.fudged_image(image, seg, "mean")
    for start, stop in lime_lite._batch_bounds(n, batch_size):
        lime_lite.perturb(image, fud, seg, z[start:stop])
    t2 = time.perf_counter()
    lime_lite.fit_surrogate(z, np.random.default_rng(seed).random(n))
    t3 = time.perf_counter()
    return {"slic_s": t1 - t0, "masking_s": t2 - t1, "ridge_s": t3 - t2}


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A n B| / |A u B| (1.0 for two empty sets)."""
    sa, sb = set(int(v) for v in a), set(int(v) for v in b)
    return 1.0 if not (sa | sb) else len(sa & sb) / len(sa | sb)


def mean_pairwise_jaccard(sets: List[Sequence[int]]) -> float:
    """Mean Jaccard over all unordered pairs of top-k sets."""
    pairs = list(itertools.combinations(sets, 2))
    return float(np.mean([jaccard(a, b) for a, b in pairs])) if pairs else float("nan")


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------- per model
def bench_model(name: str, image: np.ndarray, args: argparse.Namespace) -> Dict:
    """Run every measurement for one model and return a result dict."""
    load_before = os.getloadavg()
    n, bs = args.num_samples, args.batch_size
    model = build_model(name, image.shape[0], args.weights)
    if not args.weights:
        calibrate_batchnorm(model, image)
    batch = np.broadcast_to(image, (n,) + image.shape).copy()
    batch += np.random.default_rng(0).normal(0, 0.01, batch.shape).astype(np.float32)

    log(f"[{name}] warm-up (traces every batch shape once)")
    forward_time(model, batch, bs)
    explain_time(model, image, n, 0, bs)
    for m in args.sweep:
        sizes = {stop - start for start, stop in lime_lite._batch_bounds(m, bs)}
        for size in sizes:
            model.predict_on_batch(batch[:size])

    fwd, exp_t = [], []
    for r in range(args.repeats):
        log(f"[{name}] repeat {r + 1}/{args.repeats}")
        if r % 2 == 0:  # interleave the order so drifting load hits both sides
            fwd.append(forward_time(model, batch, bs))
            exp_t.append(explain_time(model, image, n, r, bs)[0])
        else:
            exp_t.append(explain_time(model, image, n, r, bs)[0])
            fwd.append(forward_time(model, batch, bs))
    ratios = [e / f for e, f in zip(exp_t, fwd)]
    split = overhead_split(image, n, bs, seed=0)

    sweep = []
    for m in args.sweep:
        times, tops = [], []
        for seed in range(args.seeds):
            log(f"[{name}] sweep num_samples={m} seed={seed}")
            t, exp = explain_time(model, image, m, seed, bs)
            times.append(t)
            tops.append(exp.top_features(args.top).tolist())
        sweep.append({
            "num_samples": m,
            "median_s": statistics.median(times),
            "per_sample_ms": 1000 * statistics.median(times) / m,
            "jaccard_top": mean_pairwise_jaccard(tops),
            "num_superpixels": int(exp.num_features),
            "tops": tops,
        })
    return {
        "model": MODELS[name],
        "num_samples": n,
        "batch_size": bs,
        "forward_s": fwd,
        "explain_s": exp_t,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(exp_t) / min(fwd),
        "overhead": split,
        "sweep": sweep,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def print_model(res: Dict, top: int) -> None:
    """Human-readable summary of one model's results."""
    fwd_med = statistics.median(res["forward_s"])
    print(f"\n== {res['model']}  (N={res['num_samples']}, batch_size={res['batch_size']}, "
          f"load avg before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f})")
    print("forward N images : " + ", ".join(f"{t:.2f}s" for t in res["forward_s"]))
    print("explain          : " + ", ".join(f"{t:.2f}s" for t in res["explain_s"]))
    print("ratio explain/fwd: " + ", ".join(f"{r:.3f}" for r in res["ratios"])
          + f"   paired median {res['ratio_median']:.3f}, min/min {res['ratio_min']:.3f}"
          + "   (target <= 1.15)")
    o = res["overhead"]
    tot = sum(o.values())
    print(f"LIME overhead    : SLIC {1000 * o['slic_s']:.1f} ms, masking {1000 * o['masking_s']:.1f} ms, "
          f"ridge {1000 * o['ridge_s']:.1f} ms = {100 * tot / fwd_med:.1f}% of the forward time")
    print(f"{'num_samples':>11} {'median s':>9} {'ms/sample':>10} {'Jaccard top-' + str(top):>15} {'M':>4}")
    for s in res["sweep"]:
        print(f"{s['num_samples']:>11} {s['median_s']:>9.2f} {s['per_sample_ms']:>10.2f} "
              f"{s['jaccard_top']:>15.3f} {s['num_superpixels']:>4}")


def write_json_atomic(path: str, data: Dict) -> None:
    """Write JSON to a temp file in the same folder, then os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenetv2,densenet169",
                   help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N=200, sweep 50/100/200, 2 seeds, 1 repeat")
    p.add_argument("--size", type=int, default=110, help="input side in pixels")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", default="250,500,1000,2000")
    p.add_argument("--seeds", type=int, default=3, help="seeds per sweep point (stability)")
    p.add_argument("--top", type=int, default=5, help="k of the top-k Jaccard")
    p.add_argument("--image", default=None, help="optional RGB image (default: synthetic cell)")
    p.add_argument("--weights", default=None,
                   help="optional .weights.h5 of a trained 5-class model (default: random "
                        "weights with BatchNorm statistics re-estimated on the image)")
    p.add_argument("--out", default=None, help="optional JSON result path")
    args = p.parse_args(argv)
    if args.quick:
        args.num_samples, args.sweep, args.seeds, args.repeats = 200, "50,100,200", 2, 1
    args.sweep = [int(v) for v in args.sweep.split(",") if v]
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    image = load_image(args.image, args.size) if args.image else synthetic_cell(args.size, 0)
    print(f"lime_lite benchmark: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}, input {image.shape}, "
          f"image {'synthetic cell' if not args.image else args.image}")
    results = []
    for name in args.models:
        res = bench_model(name, image, args)
        print_model(res, args.top)
        results.append(res)
        sys.stdout.flush()
    if args.out:
        write_json_atomic(args.out, {"args": {k: v for k, v in vars(args).items()},
                                     "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
