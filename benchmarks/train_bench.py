#!/usr/bin/env python
"""Training throughput on this machine, measured side by side in one run.

1. Pipeline overhead: images/s of ``model.fit`` on ``cervical.train.make_train_dataset`` (the
   tf.data pipeline ``train`` uses: per-epoch seeded permutation, gather, cast, optional online
   augmentation, prefetch) versus a bare ``model.train_on_batch`` loop over batches already in
   memory as float32 tensors; same model, same batch size, same images. Rounds alternate between the
   two and the best round of each is kept, so background load affects both alike. Target: the
   pipeline costs <= 10 % (ratio >= 0.90).
2. Training and inference images/s of every backbone at 110x110 (standard variant, random weights,
   the study's freeze points, batch 32), with seconds per 1000 training images.

    python benchmarks/train_bench.py                 # everything (several minutes on 2 CPU cores)
    python benchmarks/train_bench.py --quick         # tiny + mobilenetv2 only, fewer images
    python benchmarks/train_bench.py --data DIR      # pipeline part on a prepared dataset's train split
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _images(args):
    if args.data:
        from cervical import data

        split = data.load_split(args.data, "train", mmap=True, masks=False)   # as train reads it
        n = min(args.images, len(split))
        return split.x[:n], split.y[:n], len(split.class_names)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    return x, rng.integers(0, 5, args.images), 5


def bare_loop(model, batches) -> float:
    """Images/s of train_on_batch over in-memory (x, y) tensor batches."""
    n = sum(int(b[0].shape[0]) for b in batches)
    t = time.perf_counter()
    for xb, yb in batches:
        model.train_on_batch(xb, yb)
    return n / (time.perf_counter() - t)


def pipeline_fit(model, x, y, k, batch, epoch, augment) -> float:
    """Images/s of fit over one epoch of train.make_train_dataset."""
    from cervical import train

    steps = int(np.ceil(len(y) / batch))
    ds = train.make_train_dataset(x, y, batch, 0, (epoch, epoch + 1), num_classes=k,
                                  augment=augment)
    t = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return len(y) / (time.perf_counter() - t)


def pipeline_overhead(args) -> None:
    import keras
    import tensorflow as tf

    from cervical import models

    x, y, k = _images(args)
    b = args.batch
    for name in args.pipeline_models:
        keras.utils.set_random_seed(0)
        model = models.build_model(name, k, x.shape[1:], weights=None, freeze=True)
        model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", metrics=["accuracy"])
        onehot = np.eye(k, dtype=np.float32)[y]
        batches = [(tf.constant(x[i:i + b].astype(np.float32)), tf.constant(onehot[i:i + b]))
                   for i in range(0, len(y), b)]
        model.train_on_batch(*batches[0])                       # trace once
        pipeline_fit(model, x[:2 * b], y[:2 * b], k, b, 0, None)  # trace the fit loop
        bare, piped, aug = [], [], []
        for r in range(args.rounds):
            bare.append(bare_loop(model, batches))
            piped.append(pipeline_fit(model, x, y, k, b, r, None))
            aug.append(pipeline_fit(model, x, y, k, b, r, "light"))
        best_bare, best_pipe, best_aug = max(bare), max(piped), max(aug)
        print(f"pipeline  {name:12s} {x.shape[1]}px batch {b}, {len(y)} images, best of "
              f"{args.rounds}: bare train_on_batch {best_bare:7.1f} img/s | fit on "
              f"make_train_dataset {best_pipe:7.1f} img/s (ratio {best_pipe / best_bare:.3f}) | "
              f"+ online augment {best_aug:7.1f} img/s (ratio {best_aug / best_bare:.3f})")


def backbone_throughput(args) -> None:
    import keras

    from cervical import models, train

    rng = np.random.default_rng(1)
    size = 110
    n = args.backbone_images
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 5, n)
    for name in args.backbones:
        keras.utils.set_random_seed(0)
        t0 = time.perf_counter()
        model = models.build_model(name, 5, (size, size, 3), weights=None, freeze=True)
        model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", metrics=["accuracy"])
        build = time.perf_counter() - t0
        train_ips = []
        for r in range(2):                       # round 0 includes tracing; report round 1
            train_ips.append(pipeline_fit(model, x, y, 5, 32, r, None))
        xf = x.astype(np.float32)
        model.predict(xf[:32], verbose=0, batch_size=32)
        t = time.perf_counter()
        model.predict(xf, verbose=0, batch_size=32)
        infer = n / (time.perf_counter() - t)
        print(f"backbone  {name:12s} 110px batch 32: train {train_ips[-1]:7.1f} img/s "
              f"({1000 / train_ips[-1]:6.1f} s per 1000 images) | inference {infer:7.1f} img/s | "
              f"{model.count_params() / 1e6:5.2f} M params, build {build:4.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1024, help="images for the pipeline part")
    p.add_argument("--size", type=int, default=110, help="image side for random images")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (best is kept)")
    p.add_argument("--data", default=None, help="prepared dataset for the pipeline part")
    p.add_argument("--pipeline-models", nargs="+", default=["tiny"])
    p.add_argument("--backbones", nargs="+",
                   default=["tiny", "vgg16", "vgg19", "resnet50", "mobilenetv2", "densenet169"])
    p.add_argument("--backbone-images", type=int, default=128,
                   help="images per backbone round (train and inference)")
    p.add_argument("--skip-backbones", action="store_true")
    p.add_argument("--quick", action="store_true", help="fewer images; tiny and mobilenetv2 only")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds = 256, 2
        args.backbones, args.backbone_images = ["tiny", "mobilenetv2"], 64
    import tensorflow as tf

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}")
    pipeline_overhead(args)
    if not args.skip_backbones:
        backbone_throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
