"""Benchmark cervical.cams: CAM time per image in forward-pass equivalents, measured side by side.

For each model (a Keras application backbone, weights=None, nested as a layer behind a Rescaling
preprocessing layer and followed by GAP -> Dropout -> Dense(5, softmax), i.e. the layout of the
project's transfer-learning models) at 110 x 110, batch 8:

    forward  = steady-state time of one compiled ``model(x, training=False)`` on the batch, per image
    ratio(m) = (time of method m on the batch, per image) / forward

Targets (issue 6): Grad-CAM, Grad-CAM++, LayerCAM <= 4; Faster-Score-CAM (max_n 10) <= 15;
Score-CAM ratio / K <= 1.2, K = channels of the target layer (one masked forward per channel).
Wall-clock figures are the minimum over ``--repeats`` runs (other processes only ever add time: the
timeit convention), CPU figures the median of the process CPU time (this process' own work, far less
sensitive to a shared machine); forward passes are interleaved with the methods. Full Score-CAM runs
one image per call on ``--scorecam-images`` images, and its baseline is as long as one call (K images
through the forward pass in batches of ``--batch``), measured before, between and after the calls.
The first call of each method (tracing of the compiled forward/backward functions, paid once per
model, layer and input shape) is reported separately. The machine load (os.getloadavg) is printed
before and after each model.

Usage:
    python benchmarks/cams_bench.py                                  # both models, full run
    python benchmarks/cams_bench.py --quick                          # 1 repeat, Score-CAM on 1 image
    python benchmarks/cams_bench.py --models mobilenetv2 --out outputs/cams_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKBONES = {
    "mobilenetv2": "MobileNetV2",
    "densenet169": "DenseNet169",
    "resnet50": "ResNet50",
    "vgg16": "VGG16",
}
TARGETS = {"gradcam": 4.0, "gradcam++": 4.0, "layercam": 4.0, "faster-scorecam": 15.0}
SCORECAM_TARGET = 1.2  # per channel


def build_model(name: str, size: int, classes: int = 5):
    """Rescaling -> nested keras.applications backbone (weights=None) -> GAP -> Dropout -> Dense softmax."""
    import keras

    application = getattr(keras.applications, BACKBONES[name])
    backbone = application(include_top=False, weights=None, input_shape=(size, size, 3))
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"{name}_bench")


def timed(fn: Callable[[], object]) -> Tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(samples: List[Tuple[float, float]]) -> Tuple[float, float]:
    """(minimum wall-clock, median CPU time): other processes only ever add wall time (the timeit
    convention), while CPU time measures this process' own work."""
    return min(s[0] for s in samples), statistics.median(s[1] for s in samples)


def load() -> str:
    return "load avg %.2f %.2f %.2f" % os.getloadavg()


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISSED"


def bench_model(name: str, args: argparse.Namespace) -> Dict[str, object]:
    import tensorflow as tf

    from cervical import cams

    model = build_model(name, args.size)
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype(np.float32)
    layer = cams.find_target_layer(model)
    backbone = next(inner for inner in model.layers if hasattr(inner, "layers"))
    channels = int(backbone.get_layer(layer).output.shape[-1])
    print(f"\n== {name}: target layer {layer!r} ({channels} channels), input {args.size}x{args.size}, "
          f"batch {args.batch}; {load()}", flush=True)

    forward_fn = tf.function(lambda t: model(t, training=False))
    xt = tf.constant(x)
    forward_fn(xt)  # trace

    def forward() -> None:
        forward_fn(xt).numpy()

    methods: Dict[str, Callable[[], object]] = {
        "gradcam": lambda: cams.gradcam(model, x),
        "gradcam++": lambda: cams.gradcam_plus_plus(model, x),
        "layercam": lambda: cams.layercam(model, x),
        "faster-scorecam": lambda: cams.faster_scorecam(model, x, max_n=args.max_n),
    }
    first = {m: timed(fn)[0] for m, fn in methods.items()}  # includes tracing
    forwards: List[Tuple[float, float]] = []
    samples: Dict[str, List[Tuple[float, float]]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, fn in methods.items():
            forwards.append(timed(forward))
            samples[m].append(timed(fn))
    forwards.append(timed(forward))
    fwd_wall, fwd_cpu = (t / args.batch for t in summary(forwards))
    walls = sorted(1e3 * f[0] / args.batch for f in forwards)
    result: Dict[str, object] = {"model": name, "layer": layer, "channels": channels,
                                 "forward_ms_per_image": 1e3 * fwd_wall,
                                 "forward_cpu_ms_per_image": 1e3 * fwd_cpu,
                                 "forward_wall_ms_min_max": [walls[0], walls[-1]]}
    print(f"forward: {1e3 * fwd_wall:.2f} ms/image wall (min; max {walls[-1]:.2f}), "
          f"{1e3 * fwd_cpu:.2f} ms/image CPU (median)")
    print(f"{'method':16s} {'ms/image':>9s} {'ratio':>7s} {'CPU ratio':>9s} {'target':>7s}  first call")
    for m in methods:
        wall, cpu = (t / args.batch for t in summary(samples[m]))
        ratio, cpu_ratio = wall / fwd_wall, cpu / fwd_cpu
        result[m] = {"ms_per_image": 1e3 * wall, "ratio": ratio, "cpu_ratio": cpu_ratio,
                     "first_call_s": first[m], "target": TARGETS[m]}
        print(f"{m:16s} {1e3 * wall:9.2f} {ratio:7.2f} {cpu_ratio:9.2f} {'<= %g' % TARGETS[m]:>7s}  "
              f"{first[m]:6.2f} s  {verdict(ratio, TARGETS[m])}", flush=True)

    if args.scorecam_images > 0:
        cams.scorecam(model, x[:1], max_n=2)  # trace the forward function outside the timing
        # One image per call (K masked forwards). A long run competes differently for a shared CPU than
        # a short burst, so the baseline here is equally long: K images through the forward pass in
        # batches of --batch, measured before, between and after the Score-CAM calls.
        calls = -(-channels // args.batch)

        def long_forward() -> None:
            for _ in range(calls):
                forward_fn(xt).numpy()

        baselines = [timed(long_forward)]
        runs = []
        for i in range(args.scorecam_images):
            runs.append(timed(lambda: cams.scorecam(model, x[i:i + 1], batch_size=args.scorecam_batch,
                                                    progress=_print_progress if args.progress
                                                    else None)))
            baselines.append(timed(long_forward))
        fwd_wall, fwd_cpu = (t / (calls * args.batch) for t in summary(baselines))
        wall, cpu = summary(runs)
        ratio, cpu_ratio = wall / fwd_wall / channels, cpu / fwd_cpu / channels
        result["scorecam"] = {"images": args.scorecam_images, "ms_per_image": 1e3 * wall,
                              "forward_ms_per_image": 1e3 * fwd_wall, "ratio_per_channel": ratio,
                              "cpu_ratio_per_channel": cpu_ratio, "target_per_channel": SCORECAM_TARGET}
        target = "<= %g" % SCORECAM_TARGET
        print(f"{'scorecam':16s} {1e3 * wall:9.0f} {ratio:7.3f} {cpu_ratio:9.3f} {target:>7s}  "
              f"{verdict(ratio, SCORECAM_TARGET)}  (ratios / K; {args.scorecam_images} image(s) x {channels} "
              f"masked forwards in chunks of {args.scorecam_batch}; baseline {calls * args.batch} images "
              f"in batches of {args.batch}: {1e3 * fwd_wall:.2f} ms/image)", flush=True)
    result["load_after"] = os.getloadavg()
    print(load())
    return result


def _print_progress(step: str, done: int, total: int) -> None:
    print(f"\r{step}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenetv2,densenet169",
                        help="comma list of " + ",".join(BACKBONES))
    parser.add_argument("--size", type=int, default=110)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-n", type=int, default=10, help="Faster-Score-CAM channels per image")
    parser.add_argument("--scorecam-images", type=int, default=2, help="images for full Score-CAM (0 = skip)")
    parser.add_argument("--scorecam-batch", type=int, default=64, help="masked images per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 repeat, full Score-CAM on 1 image")
    parser.add_argument("--progress", action="store_true", help="Score-CAM progress line on stderr")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.scorecam_images = 1, min(args.scorecam_images, 1)
    names = [n.strip().lower() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(BACKBONES)}")
    import tensorflow as tf

    print(f"cams_bench: python {platform.python_version()}, tensorflow {tf.__version__}, "
          f"{os.cpu_count()} CPU(s); {load()}")
    results = [bench_model(n, args) for n in names]
    if args.out:
        folder = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
