"""Benchmark: offline augmentation speed per group (cervical.augment).

Prints, for every group, milliseconds per image and images per second on synthetic cell images of
the target size, then the ratios that matter for ``prepare``:

* each group's time relative to one bilinear warp of the same image (a fixed yardstick measured in
  the same run, so numbers from different machines can be compared);
* our vectorised CLAHE against ``skimage.exposure.equalize_adapthist`` at the tile counts the study
  drew (3 and 21 tiles per side), side by side;
* the projected single-core time of the study's ``--augment 6`` on 2589 training images.

Usage: python benchmarks/augment_bench.py [--size 110] [--images 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cervical import augment as A  # noqa: E402


def synthetic_cells(n: int, size: int, seed: int) -> list:
    """Return ``n`` (image, mask) pairs of noisy elliptical cells on a light background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cells = []
    for _ in range(n):
        cy, cx = rng.uniform(0.4, 0.6, 2) * size
        ry, rx = rng.uniform(0.2, 0.4, 2) * size
        cyto = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        nuc = np.hypot(yy - cy, xx - cx) < rng.uniform(0.05, 0.15) * size
        img = np.empty((size, size, 3))
        img[:] = rng.uniform(190, 230, 3)
        img[cyto] = rng.uniform(100, 200, 3)
        img[nuc] = rng.uniform(30, 110, 3)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        cells.append((img, cyto.astype(np.uint8) + nuc))
    return cells


def best_of(repeats: int, fn) -> float:
    """Best wall time of ``repeats`` runs of ``fn`` (seconds); the minimum is least disturbed by load."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=110, help="image side in pixels (default 110)")
    parser.add_argument("--images", type=int, default=60, help="images per group and run (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default 3)")
    args = parser.parse_args()
    cells = synthetic_cells(args.images, args.size, seed=0)

    def run_group(group: str) -> None:
        for i, (img, mask) in enumerate(cells):
            A.augment(img, mask, group, np.random.default_rng(i))

    def run_warp() -> None:
        m = A.affine_matrix((args.size, args.size), rotate=30.0, scale=(0.7, 0.8))
        for img, _ in cells:
            A.warp_affine(img, m)

    run_group("affine")  # warm-up (imports, caches)
    warp_ms = best_of(args.repeats, run_warp) / len(cells) * 1e3
    print(f"augment benchmark: {len(cells)} images of {args.size}x{args.size}, best of {args.repeats}")
    print(f"yardstick: one bilinear warp = {warp_ms:.3f} ms/image")
    print(f"{'group':<18}{'ms/image':>10}{'images/s':>10}{'x warp':>9}")
    study_ms = []
    for group in A.GROUPS:
        ms = best_of(args.repeats, lambda g=group: run_group(g)) / len(cells) * 1e3
        if group in A.STUDY_GROUPS:
            study_ms.append(ms)
        print(f"{group:<18}{ms:>10.3f}{1e3 / ms:>10.0f}{ms / warp_ms:>9.1f}")

    def run_copies() -> None:
        for i, (img, mask) in enumerate(cells):
            A.augment_copies(img, mask, n=6, seed=(0, i))

    copies_s = best_of(args.repeats, run_copies) / len(cells)
    print(f"augment_copies(n=6) per source image: {copies_s * 1e3:.2f} ms "
          f"(sum of the six study groups: {sum(study_ms):.2f} ms)")
    print(f"projected --augment 6 on 2589 train images, one core: {2589 * copies_s:.1f} s")

    # Side by side: vectorised CLAHE vs skimage's equalize_adapthist at the same tiling.
    from skimage import exposure

    channel = cells[0][0][..., 0]
    for tiles in (3, 21):
        ours = best_of(args.repeats * 5, lambda t=tiles: A._clahe_channel(channel, 4.0, (t, t)))
        kernel = math.ceil(args.size / tiles)
        ref = best_of(
            args.repeats * 5,
            lambda k=kernel: exposure.equalize_adapthist(channel, kernel_size=k, clip_limit=4.0 / 256),
        )
        print(f"CLAHE {tiles:>2}x{tiles:<2} tiles, one channel: ours {ours * 1e3:.3f} ms, "
              f"skimage {ref * 1e3:.3f} ms, skimage/ours = {ref / ours:.1f}")


if __name__ == "__main__":
    main()
