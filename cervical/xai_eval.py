"""Quantitative evaluation of saliency maps: faithfulness, localisation, sanity and cost.

Pictures of CAMs are judged by eye; these functions put numbers on them. Every metric is a small pure
NumPy function of a map (H, W), an image and, where needed, a model's predictions, so each can be
checked by hand:

Faithfulness (Petsiuk, Das & Saenko, "RISE: Randomized input sampling for explanation of black-box
models", BMVC 2018)
    Deletion: remove the pixels of the image in decreasing order of saliency, 5 % at a time, and
    record the target-class probability p_t after each step; a faithful map makes p fall fast, so the
    area under the curve (AUC, lower is better) is small. Insertion: start from a baseline image and
    reveal the original pixels in the same order; p should rise fast (AUC higher is better).
    "Removed" pixels take the value of a baseline image, by default a strongly blurred copy of the
    image (see :func:`blur_baseline`).

ROAD, remove and debias (Rong, Leemann, Borisov, Kasneci & Kasneci, "A consistent and efficient
evaluation strategy for attribution methods", ICML 2022)
    Deleting to a baseline leaves the outline of the deleted region in the image, and a model can
    read the class from that outline instead of from the pixels themselves. ROAD fills the removed
    pixels by noisy linear imputation instead: each removed pixel equals the weighted mean of its 8
    neighbours (1/6 direct, 1/12 diagonal, renormalised at the border), one sparse linear system per
    image, plus a little Gaussian noise, so the filled region carries almost nothing about its shape.
    MoRF removes the p % most salient pixels (a faithful map makes p_t drop: lower is better), LeRF
    the p % least salient ones (p_t should stay: higher is better); LeRF - MoRF summarises both.

Localisation against expert masks (Wang et al., "Score-CAM", CVPR-W 2020, energy-based pointing game;
Zhang et al., "Top-down neural attention by excitation backprop", IJCV 2018, pointing game)
    energy share = sum(a+ * s) / sum(a+): the share of the map's positive energy inside the mask s;
    pointing hit = 1 if the map's maximum lies inside s (optionally within a tolerance in pixels);
    chance level = |s| / |image|: a uniform map scores exactly that energy share, and a uniformly
    random point hits the mask with that probability.

Sanity (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018, cascading model-parameter
randomisation)
    Randomise the weights of the model layer by layer from the output back (top-down, cumulative),
    recompute the maps after each step and compare them with the original maps by Spearman rank
    correlation. A method whose maps barely change once the whole model is random does not explain the
    model (an edge detector passes through any model); it fails the check.

Cost
    :func:`timed` measures the wall time of a call with an injectable clock.

Controls and paired comparisons
    A map can score well without explaining the model: cells are cropped around their nucleus, so a
    fixed centred Gaussian lands on it, and nuclei are dark, so "1 - grey level" finds them too.
    :func:`reference_maps` gives four model-free maps - random, centred Gaussian, darkness and Sobel
    edges - and every method is held against each of them cell by cell: d_i = s_method(i) -
    s_reference(i), its mean with a percentile cluster-bootstrap interval (cells of one cluster image
    resampled together; :func:`cervical.metrics.cluster_mean_ci`) and a verdict, beats / ties /
    loses, from the side of 0 the interval lies on (:func:`paired_comparisons`). A method that does
    not beat a control on a score has shown nothing on that score, and the report says so.

Chance levels that a map cannot game
    The area fraction |s| / (H W) is what a uniform map's energy share and a random point's hit rate
    equal; :func:`chance_comparisons` gives every map's per-cell difference with it (or with the
    same map's score in another region) with an interval and a verdict. A map that concentrates on
    the cell beats the area fraction of any region inside the cell without knowing anything; where
    a placebo region drawn by the same rule as the true one exists (the ground-truth benchmark,
    :func:`cervical.synthetic.cue_cells`), the difference with it is the exchangeable control.
    :func:`localisation_comparisons` collects all of them into one table
    (:func:`format_localisation_md`; docs/xai.md).

Several methods at once
    :func:`evaluate_methods` runs all of the above for a set of explainers (small callables
    ``explain(model, images, classes) -> maps``) on a set of cells, beside the reference maps, and
    :func:`format_metrics_md` writes the tables and a verdict paragraph generated from the intervals.
    :func:`pool_evaluations` pools the evaluations of K folds cell by cell (or keeps a subset of the
    cells, e.g. one class) and computes the intervals again.

This module imports only NumPy at import time; Keras is imported inside :func:`weighted_layers` and the
randomisation check, scikit-image inside :func:`blur_baseline`, SciPy inside the ROAD imputation,
cervical.metrics inside :func:`paired_comparisons`, Matplotlib inside :func:`plot_curves`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "XaiEvalError",
    "STEPS",
    "blur_baseline",
    "make_baseline",
    "saliency_ranks",
    "pixels_per_step",
    "perturbation_images",
    "perturbation_curves",
    "deletion_curve",
    "insertion_curve",
    "curve_auc",
    "deletion_auc",
    "insertion_auc",
    "ROAD_PERCENTAGES",
    "noisy_linear_imputation",
    "road_pixels",
    "road_images",
    "road_curves",
    "road_auc",
    "energy_share",
    "pointing_hit",
    "area_fraction",
    "dilate",
    "rankdata",
    "spearman",
    "map_similarity",
    "weighted_layers",
    "randomisation_check",
    "mean_std",
    "timed",
    "LOWER_IS_BETTER",
    "default_pairs",
    "paired_comparisons",
    "chance_comparisons",
    "LOCALISATION_CONTROLS",
    "localisation_comparisons",
    "format_localisation_md",
    "REFERENCE_TITLES",
    "darkness_map",
    "sobel_edges",
    "reference_maps",
    "choose_eval_cells",
    "EvalSettings",
    "evaluate_methods",
    "pool_evaluations",
    "format_metrics_md",
    "verdict_sentences",
    "plot_curves",
]

#: Number of 5 % steps of the deletion and insertion curves (21 points including 0 % and 100 %).
STEPS = 20

Baseline = Union[str, float, np.ndarray]
Progress = Optional[Callable[[str, int, int], None]]   # progress(step, done, total)


class XaiEvalError(ValueError):
    """Invalid argument of an XAI metric (one-line message naming the argument and the fix)."""


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _as_map(saliency: Any, name: str = "saliency") -> np.ndarray:
    """One finite 2-D map as float64."""
    a = np.asarray(saliency, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise XaiEvalError(f"{name}: expected one 2-D map (H, W), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise XaiEvalError(f"{name}: contains NaN or inf; pass a finite map")
    return a


def _as_mask(mask: Any, shape: Tuple[int, int]) -> np.ndarray:
    """A boolean mask of the map's shape."""
    s = np.asarray(mask)
    if s.shape != tuple(shape):
        raise XaiEvalError(f"mask: shape {s.shape} does not match the map's {tuple(shape)}")
    return s.astype(bool)


def _as_image(image: Any) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 3 or x.shape[-1] < 1:
        raise XaiEvalError(f"image: expected one (H, W, C) image, got shape {x.shape}")
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Deletion and insertion (Petsiuk et al. 2018)
# --------------------------------------------------------------------------------------------
def blur_baseline(image: np.ndarray, sigma: Optional[float] = None) -> np.ndarray:
    """The default baseline of deletion and insertion: a Gaussian-blurred copy of the image.

    B = G_sigma * x (each colour channel separately, borders by nearest-pixel extension), with
    sigma = max(H, W) / 10 by default (11 px for a 110-px cell), strong enough to erase a nucleus'
    texture and outline while keeping the image's colours and brightness. Petsiuk et al. (2018) blur
    for insertion but delete to black; here both use the blur, because on a pale Pap-smear background
    a black patch looks like a nucleus and would measure an artefact instead of the evidence.

    Args:
        image: (H, W, C) image as the model takes it.
        sigma: Gaussian standard deviation in pixels (> 0); None = max(H, W) / 10.

    Returns:
        (H, W, C) float32 blurred image, same value range as ``image``.

    Raises:
        XaiEvalError: on a malformed image or a non-positive sigma.
    """
    from skimage.filters import gaussian

    x = _as_image(image)
    s = max(x.shape[0], x.shape[1]) / 10.0 if sigma is None else float(sigma)
    if not s > 0:
        raise XaiEvalError(f"sigma: must be > 0, got {sigma}; use e.g. {max(x.shape[:2]) / 10:g}")
    out = gaussian(x.astype(np.float64), sigma=s, channel_axis=-1, preserve_range=True, mode="nearest")
    return out.astype(np.float32)


def make_baseline(image: np.ndarray, baseline: Baseline = "blur", sigma: Optional[float] = None) -> np.ndarray:
    """Build the baseline image that replaces deleted (or not yet inserted) pixels.

    Args:
        image: (H, W, C) image.
        baseline: "blur" (:func:`blur_baseline`), "black" (zeros), "mean" (the image's mean colour
            everywhere), a number (that value everywhere) or an (H, W, C) array.
        sigma: blur sigma for "blur".

    Returns:
        (H, W, C) float32 baseline.

    Raises:
        XaiEvalError: on an unknown name or an array of the wrong shape.
    """
    x = _as_image(image)
    if isinstance(baseline, str):
        if baseline == "blur":
            return blur_baseline(x, sigma)
        if baseline == "black":
            return np.zeros_like(x)
        if baseline == "mean":
            return np.broadcast_to(x.mean(axis=(0, 1)), x.shape).astype(np.float32)
        raise XaiEvalError(f"baseline: unknown value {baseline!r}; use 'blur', 'black', 'mean', a number or an image")
    b = np.asarray(baseline, dtype=np.float32)
    if b.ndim == 0:
        return np.full_like(x, float(b))
    if b.shape != x.shape:
        raise XaiEvalError(f"baseline: shape {b.shape} does not match the image's {x.shape}")
    return b


def saliency_ranks(saliency: np.ndarray) -> np.ndarray:
    """Position of every pixel in decreasing saliency order: rank 0 = the most salient pixel.

    Ties are broken by raster index (row-major), so the order is deterministic.

    Args:
        saliency: (H, W) map.

    Returns:
        (H, W) int64 ranks, a permutation of 0..H*W-1.
    """
    a = _as_map(saliency).ravel()
    order = np.argsort(-a, kind="stable")
    ranks = np.empty(a.size, dtype=np.int64)
    ranks[order] = np.arange(a.size)
    return ranks.reshape(np.shape(saliency))


def pixels_per_step(n_pixels: int, steps: int = STEPS) -> np.ndarray:
    """Cumulative number of perturbed pixels after each step: k_t = round(t n / T), t = 0..T.

    Rounded half up in integer arithmetic, so k_0 = 0 and k_T = n exactly (5 % steps for T = 20).

    Returns:
        (T + 1,) int64 array.
    """
    if int(steps) < 1:
        raise XaiEvalError(f"steps: must be >= 1, got {steps}; use {STEPS} for 5 % steps")
    t = np.arange(int(steps) + 1, dtype=np.int64)
    return (2 * t * int(n_pixels) + int(steps)) // (2 * int(steps))


def perturbation_images(image: np.ndarray, saliency: np.ndarray, baseline: np.ndarray,
                        mode: str = "deletion", steps: int = STEPS) -> np.ndarray:
    """The T + 1 images of a deletion or insertion curve.

    With rank r(p) from :func:`saliency_ranks` and k_t from :func:`pixels_per_step`:
        deletion:  x_t(p) = B(p) if r(p) < k_t else x(p)   (the k_t most salient pixels removed)
        insertion: x_t(p) = x(p) if r(p) < k_t else B(p)   (the k_t most salient pixels revealed)

    Args:
        image: (H, W, C) image x.
        saliency: (H, W) map.
        baseline: (H, W, C) baseline image B.
        mode: "deletion" or "insertion".
        steps: T.

    Returns:
        (T + 1, H, W, C) float32 images; row 0 is x (deletion) or B (insertion).

    Raises:
        XaiEvalError: on an unknown mode or mismatched shapes.
    """
    if mode not in ("deletion", "insertion"):
        raise XaiEvalError(f"mode: unknown value {mode!r}; use 'deletion' or 'insertion'")
    x = _as_image(image)
    b = np.asarray(baseline, dtype=np.float32)
    ranks = saliency_ranks(saliency)
    if ranks.shape != x.shape[:2] or b.shape != x.shape:
        raise XaiEvalError(f"saliency/baseline: shapes {ranks.shape}/{b.shape} do not match the image's {x.shape}")
    k = pixels_per_step(ranks.size, steps)
    chosen = ranks[None] < k[:, None, None]                     # (T+1, H, W)
    first, second = (b, x) if mode == "deletion" else (x, b)
    return np.where(chosen[..., None], first[None], second[None]).astype(np.float32)


def _predict(predict: Any, batch: np.ndarray) -> np.ndarray:
    """(N, K) float64 outputs of a Keras model (``predict_on_batch``) or a plain callable."""
    out = predict.predict_on_batch(batch) if hasattr(predict, "predict_on_batch") else predict(batch)
    if hasattr(out, "numpy"):
        out = out.numpy()
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise XaiEvalError(f"predict: returned shape {out.shape} for {batch.shape[0]} images; it must return (N, K) probabilities")
    return out


def _class_probs(predict: Any, build: Callable[[int], np.ndarray], n_cells: int, per_cell: int,
                 class_index: Union[int, Sequence[int], np.ndarray], batch_size: int) -> np.ndarray:
    """(n_cells, per_cell) probabilities of each cell's class c_i for its images ``build(i)``.

    The images of several cells are stacked into model batches of at most ``batch_size`` images
    (at least one cell per batch).
    """
    classes = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n_cells,))
    if int(batch_size) < 1:
        raise XaiEvalError(f"batch_size: must be >= 1, got {batch_size}")
    cells_per_batch = max(1, int(batch_size) // per_cell)
    probs = np.zeros((n_cells, per_cell), dtype=np.float64)
    for start in range(0, n_cells, cells_per_batch):
        idx = range(start, min(start + cells_per_batch, n_cells))
        out = _predict(predict, np.concatenate([build(i) for i in idx])).reshape(len(idx), per_cell, -1)
        if classes.min() < 0 or classes.max() >= out.shape[-1]:
            raise XaiEvalError(f"class_index: values must lie in [0, {out.shape[-1] - 1}], got {class_index!r}")
        probs[start:start + len(idx)] = out[np.arange(len(idx)), :, classes[start:start + len(idx)]]
    return probs


def perturbation_curves(predict: Any, images: np.ndarray, saliencies: np.ndarray,
                        class_index: Union[int, Sequence[int], np.ndarray], mode: str = "deletion",
                        baseline: Baseline = "blur", sigma: Optional[float] = None,
                        steps: int = STEPS, batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Deletion or insertion curves of a batch of images, with batched predictions.

    p_t = f(x_t)[c] for t = 0..T (see :func:`perturbation_images`); the perturbed images of several
    cells are stacked into model batches of at most ``batch_size`` images (at least one cell per batch).

    Args:
        predict: Keras model or callable mapping (N, H, W, C) float32 images to (N, K) probabilities.
        images: (B, H, W, C) images.
        saliencies: (B, H, W) maps.
        class_index: target class c, one int for all images or one per image.
        mode: "deletion" or "insertion".
        baseline: see :func:`make_baseline` (built per image).
        sigma: blur sigma for ``baseline="blur"``.
        steps: T (20 = 5 % steps).
        batch_size: largest model batch.

    Returns:
        (fractions, probs): fractions (T + 1,) = k_t / n in [0, 1]; probs (B, T + 1).

    Raises:
        XaiEvalError: on mismatched shapes or a bad class index.
    """
    x = np.asarray(images, dtype=np.float32)
    a = np.asarray(saliencies, dtype=np.float64)
    if x.ndim != 4 or a.shape != x.shape[:3]:
        raise XaiEvalError(f"images/saliencies: expected (B, H, W, C) and (B, H, W), got {x.shape} and {a.shape}")
    probs = _class_probs(
        predict, lambda i: perturbation_images(x[i], a[i], make_baseline(x[i], baseline, sigma), mode, steps),
        len(x), int(steps) + 1, class_index, batch_size)
    fractions = pixels_per_step(x.shape[1] * x.shape[2], steps) / float(x.shape[1] * x.shape[2])
    return fractions, probs


def deletion_curve(predict: Any, image: np.ndarray, saliency: np.ndarray, class_index: int,
                   **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Deletion curve of one image: (fractions (T+1,), probabilities (T+1,)); see :func:`perturbation_curves`."""
    f, p = perturbation_curves(predict, np.asarray(image)[None], np.asarray(saliency)[None], class_index,
                               mode="deletion", **kwargs)
    return f, p[0]


def insertion_curve(predict: Any, image: np.ndarray, saliency: np.ndarray, class_index: int,
                    **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Insertion curve of one image: (fractions (T+1,), probabilities (T+1,)); see :func:`perturbation_curves`."""
    f, p = perturbation_curves(predict, np.asarray(image)[None], np.asarray(saliency)[None], class_index,
                               mode="insertion", **kwargs)
    return f, p[0]


def curve_auc(fractions: np.ndarray, values: np.ndarray) -> Union[float, np.ndarray]:
    """Area under a curve by the trapezoid rule: sum_t (f_{t+1} - f_t) (v_t + v_{t+1}) / 2.

    Args:
        fractions: (T + 1,) increasing x values (here in [0, 1]).
        values: (T + 1,) or (B, T + 1) y values.

    Returns:
        a float, or (B,) areas for a batch of curves.
    """
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if v.shape[-1] != f.shape[0]:
        raise XaiEvalError(f"values: last axis {v.shape[-1]} does not match {f.shape[0]} fractions")
    area = np.sum(np.diff(f) * (v[..., 1:] + v[..., :-1]) / 2.0, axis=-1)
    return float(area) if np.ndim(area) == 0 else area


def deletion_auc(predict: Any, image: np.ndarray, saliency: np.ndarray, class_index: int, **kwargs: Any) -> float:
    """Deletion AUC of one image (lower = more faithful); see :func:`perturbation_curves`."""
    return curve_auc(*deletion_curve(predict, image, saliency, class_index, **kwargs))


def insertion_auc(predict: Any, image: np.ndarray, saliency: np.ndarray, class_index: int, **kwargs: Any) -> float:
    """Insertion AUC of one image (higher = more faithful); see :func:`perturbation_curves`."""
    return curve_auc(*insertion_curve(predict, image, saliency, class_index, **kwargs))


# --------------------------------------------------------------------------------------------
# ROAD: remove and debias (Rong et al. 2022)
# --------------------------------------------------------------------------------------------
#: Percentages of removed pixels on the ROAD curves of :func:`evaluate_methods`: few, so that an
#: explain run stays fast (Rong et al. use 10, 20, ..., 90; pass those for the full curve).
ROAD_PERCENTAGES = (10, 30, 50, 70, 90)

#: Neighbours (dy, dx, weight) of the linear imputation: 1/6 for the 4 direct and 1/12 for the 4
#: diagonal neighbours (they sum to 1).
_NEIGHBOURS = ((-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12))


def _imputation_system(removed: np.ndarray, x: np.ndarray):
    """The sparse system A v = b of :func:`noisy_linear_imputation` for the removed pixels.

    Unknowns are the removed pixels in raster order. Row i is the imputation equation
    v_i = sum_j c_ij v_j / t_i (t_i = sum of c_ij over the neighbours j of i inside the image)
    multiplied by t_i: t_i v_i - sum_{j removed} c_ij v_j = sum_{j kept} c_ij x_j. As c_ij = c_ji,
    A is symmetric; it is diagonally dominant with a strictly dominant row in every connected
    block, hence positive definite, so it can be factorised without pivoting.

    Returns:
        (A (n, n) CSC matrix, b (n, C) float64 right-hand sides, (rows, cols) of the unknowns).
    """
    import scipy.sparse

    h, w = removed.shape
    ry, rx = np.nonzero(removed)
    n = ry.size
    index = np.full((h, w), -1, dtype=np.int64)
    index[ry, rx] = np.arange(n)
    rows, cols, vals = [np.arange(n)], [np.arange(n)], [np.zeros(n)]
    b = np.zeros((n, x.shape[-1]))
    for dy, dx, c in _NEIGHBOURS:
        ny, nx = ry + dy, rx + dx
        inside = np.flatnonzero((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))
        vals[0][inside] += c                                     # t_i on the diagonal
        j = index[ny[inside], nx[inside]]
        unknown = j >= 0
        rows.append(inside[unknown])
        cols.append(j[unknown])
        vals.append(np.full(int(unknown.sum()), -c))
        known = inside[~unknown]
        b[known] += c * x[ny[known], nx[known]]
    a = scipy.sparse.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                shape=(n, n))
    return a, b, (ry, rx)


def noisy_linear_imputation(image: np.ndarray, removed: np.ndarray, noise: float = 0.01,
                            seed: Union[int, Sequence[int]] = 0) -> np.ndarray:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022): fill removed pixels from the kept ones.

    Every removed pixel i takes the weighted mean of its 8 neighbours N(i) inside the image,
        v_i = sum_{j in N(i)} w_ij v_j,   w_ij = c_ij / sum_{k in N(i)} c_ik,
    c = 1/6 for the 4 direct and 1/12 for the 4 diagonal neighbours; kept neighbours enter as the
    constants x_j, removed ones as unknowns. The sparse system (one matrix, one right-hand side per
    channel; symmetric positive definite once each row is multiplied by its weight total, see
    ``_imputation_system``) is factorised once (``scipy.sparse.linalg.splu`` in symmetric mode) and
    solved for all channels. Then Gaussian noise of standard deviation ``noise * (max x - min x)``
    (the image's own value range) is added to the imputed values only, with
    ``numpy.random.default_rng(seed)``: ROAD adds sd 0.01 to images on a unit scale, and scaling by
    the range makes 0.01 mean the same on a uint8 image (2.55 grey levels) as on a [0, 1] one.

    Every 8-connected component of removed pixels touches a kept pixel (unless all are removed), so
    every component has a row whose diagonal exceeds the sum of its off-diagonal entries, and the
    system has one solution. Known answers: a constant image is imputed as the constant (each row sums to
    one); so is a linear ramp x = a r + b c + d around a hole away from the border, because with the
    full symmetric neighbourhood sum_j w_ij (a dr + b dc) = 0 over the pairs of opposite offsets
    (+-dr, +-dc) and the ramp solves every row (at the border the renormalised one-sided mean does
    not reproduce a ramp).

    Args:
        image: (H, W, C) image x.
        removed: (H, W) mask of the pixels to replace (non-zero = removed).
        noise: relative noise sd (>= 0); 0 gives the plain linear imputation.
        seed: int or sequence of ints for the noise.

    Returns:
        (H, W, C) float32 image: kept pixels unchanged, removed pixels imputed (plus noise).

    Raises:
        XaiEvalError: on mismatched shapes, negative noise, or every pixel removed.
    """
    from scipy.sparse.linalg import splu

    x = _as_image(image).astype(np.float64)
    r = _as_mask(removed, x.shape[:2])
    if not float(noise) >= 0.0:
        raise XaiEvalError(f"noise: must be >= 0, got {noise}; use 0.01 as in ROAD")
    out = x.copy()
    if not r.any():
        return out.astype(np.float32)
    if r.all():
        raise XaiEvalError("removed: every pixel is removed; keep at least one pixel to impute from")
    a, b, (ry, rx) = _imputation_system(r, x)
    values = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                  options={"SymmetricMode": True}).solve(b)
    sd = float(noise) * float(x.max() - x.min())
    if sd > 0.0:
        values = values + np.random.default_rng(seed).normal(0.0, sd, size=values.shape)
    out[ry, rx] = values
    return out.astype(np.float32)


def road_pixels(n_pixels: int, percentages: Sequence[float] = ROAD_PERCENTAGES) -> np.ndarray:
    """Number of removed pixels at each percentage: k = floor(p n / 100 + 1/2) (rounded half up).

    Raises:
        XaiEvalError: unless the percentages increase strictly, 0 <= p < 100 and k < n (ROAD needs
            a kept pixel to impute from).
    """
    p = np.asarray(percentages, dtype=np.float64).reshape(-1)
    if p.size == 0 or np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p >= 100):
        raise XaiEvalError(f"percentages: each must lie in [0, 100), got {list(percentages)}; use e.g. 10, 30, 50, 70, 90")
    if np.any(np.diff(p) <= 0):
        raise XaiEvalError(f"percentages: must increase strictly, got {list(percentages)}")
    k = np.floor(p * int(n_pixels) / 100.0 + 0.5).astype(np.int64)
    if k.max() >= int(n_pixels):
        raise XaiEvalError(f"percentages: {p.max():g} % of {n_pixels} pixels removes them all; use smaller percentages")
    return k


def road_images(image: np.ndarray, saliency: np.ndarray, percentages: Sequence[float] = ROAD_PERCENTAGES,
                order: str = "morf", noise: float = 0.01,
                seed: Union[int, Sequence[int]] = 0) -> np.ndarray:
    """The images of one ROAD curve: the k_p most (MoRF) or least (LeRF) relevant pixels imputed.

    With rank r(p) from :func:`saliency_ranks` (0 = most salient, raster ties) and k from
    :func:`road_pixels`, the removed set is r < k (MoRF, "most relevant first") or r >= n - k (LeRF,
    "least relevant first"); it is filled by :func:`noisy_linear_imputation` with the seed
    (*seed, step), so the noise of step j is the same draw for every map of the same cell.

    Args:
        image: (H, W, C) image.
        saliency: (H, W) map.
        percentages: removed shares in percent, each in [0, 100).
        order: "morf" or "lerf".
        noise: relative noise sd (see :func:`noisy_linear_imputation`).
        seed: int or sequence of ints.

    Returns:
        (P, H, W, C) float32 images, one per percentage.
    """
    if order not in ("morf", "lerf"):
        raise XaiEvalError(f"order: unknown value {order!r}; use 'morf' or 'lerf'")
    x = _as_image(image)
    ranks = saliency_ranks(saliency)
    if ranks.shape != x.shape[:2]:
        raise XaiEvalError(f"saliency: shape {ranks.shape} does not match the image's {x.shape[:2]}")
    base = [int(s) for s in np.atleast_1d(seed)]
    out = []
    for j, k in enumerate(road_pixels(ranks.size, percentages)):
        removed = ranks < k if order == "morf" else ranks >= ranks.size - k
        out.append(noisy_linear_imputation(x, removed, noise, seed=base + [j]))
    return np.stack(out)


def road_curves(predict: Any, images: np.ndarray, saliencies: np.ndarray,
                class_index: Union[int, Sequence[int], np.ndarray], order: str = "morf",
                percentages: Sequence[float] = ROAD_PERCENTAGES, noise: float = 0.01, seed: int = 0,
                batch_size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """ROAD curves (Rong et al. 2022) of a batch of images: p_k = f(x_k)[c] after imputing k pixels.

    Cell i uses the noise seed (seed, i, 0 for MoRF / 1 for LeRF), so two maps of the same cell
    see the same noise draws (a paired comparison of maps is not blurred by independent noise).

    Args:
        predict: Keras model or callable mapping (N, H, W, C) float32 images to (N, K) probabilities.
        images: (B, H, W, C) images.
        saliencies: (B, H, W) maps.
        class_index: target class c, one int for all images or one per image.
        order: "morf" (most relevant removed first) or "lerf" (least relevant first).
        percentages: removed shares in percent (see :func:`road_pixels`).
        noise: relative noise sd of the imputation.
        seed: base seed.
        batch_size: largest model batch.

    Returns:
        (fractions, probs): fractions (P,) = k / n; probs (B, P).
    """
    x = np.asarray(images, dtype=np.float32)
    a = np.asarray(saliencies, dtype=np.float64)
    if x.ndim != 4 or a.shape != x.shape[:3]:
        raise XaiEvalError(f"images/saliencies: expected (B, H, W, C) and (B, H, W), got {x.shape} and {a.shape}")
    code = 0 if order == "morf" else 1
    k = road_pixels(x.shape[1] * x.shape[2], percentages)
    probs = _class_probs(predict, lambda i: road_images(x[i], a[i], percentages, order, noise,
                                                        (int(seed), i, code)),
                         len(x), len(k), class_index, batch_size)
    return k / float(x.shape[1] * x.shape[2]), probs


def road_auc(fractions: np.ndarray, values: np.ndarray) -> Union[float, np.ndarray]:
    """Summary of a ROAD curve: the trapezoid area divided by the width of the percentage range.

    S = curve_auc(f, v) / (f_last - f_first), the mean height of the curve, so a constant curve p
    scores p whichever percentages are used (a single percentage scores its own value). MoRF: lower
    is better; LeRF: higher is better; LeRF - MoRF: higher is better (both orders in one number: a
    map must make the prediction fall when its top pixels go and keep it when its bottom pixels go).
    """
    f = np.asarray(fractions, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if f.size == 1:
        out = v[..., 0]
        return float(out) if np.ndim(out) == 0 else out
    return curve_auc(f, v) / float(f[-1] - f[0])


# --------------------------------------------------------------------------------------------
# Localisation against masks
# --------------------------------------------------------------------------------------------
def energy_share(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Energy-based pointing game (Wang et al. 2020): share of the positive map energy inside a mask.

    E = sum_p a+(p) s(p) / sum_p a+(p),  a+ = max(a, 0)

    Only positive evidence counts (negative LIME weights argue against the class); Quantus'
    AttributionLocalisation takes |a| instead, which is the same for CAMs (a >= 0).

    Args:
        saliency: (H, W) map a.
        mask: (H, W) mask s (non-zero = inside).

    A map with no positive energy (an all-zero CAM, an all-negative LIME map) says nothing about
    where the evidence is, so it is scored as a uniform map: E = |s| / (H W), the chance level. It
    is not left out, which would excuse a method that fails on hard cells.

    Returns:
        E in [0, 1]; NaN only when the mask is empty (undefined).
    """
    a = np.maximum(_as_map(saliency), 0.0)
    s = _as_mask(mask, a.shape)
    if not s.any():
        return float("nan")
    total = float(a.sum())
    if total <= 0.0:
        return float(s.mean())
    return float(a[s].sum() / total)


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Grow a boolean mask by a disc: every pixel within Euclidean distance ``radius`` of the mask.

    Implemented as the union of the mask shifted by every integer offset (dy, dx) with
    dy^2 + dx^2 <= radius^2 (pure NumPy; cheap for the few-pixel tolerances of the pointing game).

    Args:
        mask: (H, W) mask.
        radius: tolerance in pixels (>= 0); 0 returns the mask.

    Returns:
        (H, W) bool mask.
    """
    s = np.asarray(mask).astype(bool)
    if radius < 0:
        raise XaiEvalError(f"tolerance: must be >= 0 pixels, got {radius}")
    r = int(np.floor(radius))
    if r == 0:
        return s.copy()
    h, w = s.shape
    padded = np.pad(s, r)
    out = np.zeros_like(s)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> float:
    """Pointing game (Zhang et al. 2018): does the map's maximum fall inside the mask?

    hit = share of the maximal pixels (a(p) = max a) that lie in the mask dilated by ``tolerance``
    pixels (:func:`dilate`): the hit probability of a maximal pixel drawn at random. With a single
    maximum this is 1 or 0. Ties matter for LIME, whose map is flat over each superpixel: counting
    a hit when ANY maximal pixel is inside (Quantus' rule) would let a 240-pixel superpixel that
    grazes the nucleus score 1 while a CAM's single-pixel peak must land inside. A constant map
    makes every pixel maximal and so scores the chance level :func:`area_fraction`.

    Args:
        saliency: (H, W) map.
        mask: (H, W) mask.
        tolerance: radius in pixels around the mask that still counts as a hit.

    Returns:
        a value in [0, 1]; NaN for an empty mask.
    """
    a = _as_map(saliency)
    s = _as_mask(mask, a.shape)
    if not s.any():
        return float("nan")
    region = dilate(s, tolerance)
    return float(region[a == a.max()].mean())


def area_fraction(mask: np.ndarray, tolerance: float = 0.0) -> float:
    """Chance level of the localisation metrics: |s| / (H W) (of the dilated mask for a tolerance).

    A uniform map has energy share exactly |s| / (H W), and a pixel drawn uniformly at random lands
    in the mask with that probability (the pointing game's chance hit rate).

    Args:
        mask: (H, W) mask.
        tolerance: as in :func:`pointing_hit`.

    Returns:
        fraction in [0, 1].
    """
    s = np.asarray(mask).astype(bool)
    if s.ndim != 2 or s.size == 0:
        raise XaiEvalError(f"mask: expected one 2-D mask, got shape {s.shape}")
    return float(dilate(s, tolerance).mean())


# --------------------------------------------------------------------------------------------
# Rank correlation
# --------------------------------------------------------------------------------------------
def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties given the average of their ranks.

    Example: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4].

    Returns:
        (n,) float64 ranks.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], x.size]
    average = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: the Pearson correlation of the (average-tie) ranks of a and b.

    rho = sum (R_a - mean R_a)(R_b - mean R_b) / sqrt(sum (R_a - mean)^2 sum (R_b - mean)^2)

    Args:
        a, b: arrays with the same number of elements (flattened).

    Returns:
        rho in [-1, 1]; NaN when either input is constant (undefined).
    """
    ra, rb = rankdata(a), rankdata(b)
    if ra.size != rb.size:
        raise XaiEvalError(f"a/b: {ra.size} and {rb.size} elements; compare maps of the same shape")
    da, db = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt(np.sum(da * da) * np.sum(db * db)))
    if den == 0.0:
        return float("nan")
    return float(np.sum(da * db) / den)


def map_similarity(original: np.ndarray, randomised: np.ndarray) -> float:
    """Spearman similarity used by the sanity check, with the constant-map cases made explicit.

    NaN when the original map is constant (nothing to compare: that cell is left out of the mean);
    0 when only the randomised map is constant (the structure is gone); else :func:`spearman`.
    """
    o = np.asarray(original, dtype=np.float64)
    r = np.asarray(randomised, dtype=np.float64)
    if o.max() == o.min():
        return float("nan")
    if r.max() == r.min():
        return 0.0
    return spearman(o, r)


# --------------------------------------------------------------------------------------------
# Cascading model-parameter randomisation (Adebayo et al. 2018)
# --------------------------------------------------------------------------------------------
def _is_float(variable: Any) -> bool:
    """True for floating-point variables (float16/32/64, bfloat16); False for counters and seeds."""
    dtype = variable.dtype
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", str(dtype))
    return "float" in str(name)


def _is_input_preprocessing(layer: Any) -> bool:
    """Keras preprocessing layers (Normalization, Rescaling, ...) and a frozen layer named
    "preprocess" (cervical.models' channel-reversing 1x1 convolution): fixed input transforms."""
    return ("preprocessing" in type(layer).__module__
            or (layer.name == "preprocess" and not layer.trainable))


def weighted_layers(model: Any) -> List[Tuple[str, Any]]:
    """Layers that hold floating-point weights, in forward order, nested models expanded in place.

    Input preprocessing (``Normalization`` and the like, and a frozen layer named "preprocess":
    fixed transforms of the data, not learned parameters) is left out. Each layer appears once even when shared.

    Args:
        model: a Keras model (functional, Sequential or with nested models).

    Returns:
        list of (path, layer), path = names joined by "/" from the outer model.
    """
    import keras

    out: List[Tuple[str, Any]] = []
    seen = set()

    def walk(m: Any, prefix: str) -> None:
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer, f"{prefix}{layer.name}/")
                continue
            if id(layer) in seen or _is_input_preprocessing(layer):
                continue
            if any(_is_float(v) for v in layer.weights):
                seen.add(id(layer))
                out.append((f"{prefix}{layer.name}", layer))

    walk(model, "")
    return out


def _randomise_layer(layer: Any, rng: np.random.Generator, mode: str) -> None:
    """Randomise every floating-point variable of one layer in place.

    "permute": a random permutation of all entries of each tensor (keeps the value distribution,
    e.g. positive BatchNorm variances, and destroys the learned structure; Quantus permutes along
    axis 0 only, a no-op for 1x1 convolutions).
    "reinit": draw each tensor again from the layer's own initializer (``<name>_initializer``,
    e.g. Glorot for kernels, zeros for biases, ones for BatchNorm variances) with a fresh seed, as
    Adebayo et al. did; tensors without an initializer attribute are permuted.
    """
    import keras

    for v in layer.weights:
        if not _is_float(v):
            continue
        w = np.asarray(v.numpy())
        new = None
        if mode == "reinit":
            short = v.name.split("/")[-1]
            init = getattr(layer, f"{short}_initializer", None)
            if init is not None:
                config = init.get_config()
                if "seed" in config:
                    init = type(init).from_config({**config, "seed": int(rng.integers(0, 2**31 - 1))})
                new = np.asarray(keras.ops.convert_to_numpy(init(shape=w.shape, dtype=w.dtype)))
        if new is None:
            new = rng.permutation(w.ravel()).reshape(w.shape)
        v.assign(new.astype(w.dtype))


def randomisation_check(model: Any, explain_fn: Callable[[Any, np.ndarray, np.ndarray], np.ndarray],
                        images: np.ndarray, class_index: Union[None, int, Sequence[int], np.ndarray] = None,
                        blocks: Optional[int] = None, mode: str = "permute", threshold: float = 0.9,
                        seed: int = 0, progress: Progress = None) -> Dict[str, Any]:
    """Cascading model-parameter randomisation sanity check (Adebayo et al., NeurIPS 2018).

    1. Maps M_0 = explain_fn(model, images, c) of the intact model (c fixed: the given classes or the
       intact model's predictions, so every step explains the same class).
    2. The layers with weights (:func:`weighted_layers`), from the output back, are split into
       ``blocks`` consecutive blocks (one layer per block if None). After randomising block j (blocks
       1..j stay randomised: cascading), maps M_j are recomputed and compared with M_0 per image:
           rho_j = mean over images of Spearman(M_0, M_j)   (:func:`map_similarity`)
    3. The method fails when rho is still above ``threshold`` once the whole model is random: its
       maps do not depend on what the model learned.

    The weights are randomised in place and restored exactly afterwards (also on error or
    interrupt), so the check works for any model (nested backbones, custom layers) and reuses
    compiled functions; do not use the model from another thread meanwhile.

    Args:
        model: a Keras model.
        explain_fn: callable(model, images, classes (B,) int array) -> (B, H, W) maps.
        images: (B, H, W, C) images as the model takes them.
        class_index: None (the intact model's predictions), an int, or one int per image.
        blocks: number of cascading steps (None = one per layer with weights).
        mode: "permute" or "reinit" (see ``_randomise_layer``).
        threshold: a method whose final similarity exceeds this fails.
        seed: seed of the randomisation.
        progress: None, or ``progress(step, done, total)`` after every block.

    Returns:
        dict with "layers" (forward order), "steps" (one per block: "randomised" layer paths,
        "n_randomised", "similarity" mean, "std", "per_image"), "final_similarity", "threshold",
        "passed" (True / False; None when every original map is constant, so nothing could be
        compared), "mode", "n_images".

    Raises:
        XaiEvalError: on a bad mode, threshold or blocks, or a model without weights.
    """
    if mode not in ("permute", "reinit"):
        raise XaiEvalError(f"mode: unknown value {mode!r}; use 'permute' or 'reinit'")
    layers = weighted_layers(model)
    if not layers:
        raise XaiEvalError("model: has no layers with weights; nothing to randomise")
    if blocks is not None and int(blocks) < 1:
        raise XaiEvalError(f"blocks: must be >= 1 or None, got {blocks}")
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise XaiEvalError(f"images: expected (B, H, W, C), got shape {x.shape}")
    if class_index is None:
        classes = _predict(model, x).argmax(axis=-1)
    else:
        classes = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (len(x),)).copy()
    top_down = layers[::-1]
    n_blocks = len(top_down) if blocks is None else min(int(blocks), len(top_down))
    groups = [list(g) for g in np.array_split(np.arange(len(top_down)), n_blocks)]
    rng = np.random.default_rng(seed)

    original = np.asarray(explain_fn(model, x, classes), dtype=np.float64)
    saved = [(v, np.array(v.numpy(), copy=True)) for _, layer in layers for v in layer.weights if _is_float(v)]
    steps: List[Dict[str, Any]] = []
    try:
        for j, group in enumerate(groups):
            for i in group:
                _randomise_layer(top_down[i][1], rng, mode)
            maps = np.asarray(explain_fn(model, x, classes), dtype=np.float64)
            sims = np.array([map_similarity(o, r) for o, r in zip(original, maps)])
            stats = mean_std(sims)
            steps.append({"randomised": [top_down[i][0] for i in group],
                          "n_randomised": int(group[-1] + 1),
                          "similarity": stats["mean"], "std": stats["std"],
                          "per_image": [None if np.isnan(s) else float(s) for s in sims]})
            if progress is not None:
                progress("randomisation", j + 1, len(groups))
    finally:
        for v, value in saved:
            v.assign(value)
    final = steps[-1]["similarity"]
    return {"layers": [p for p, _ in layers], "steps": steps, "final_similarity": final,
            "threshold": float(threshold), "passed": None if final is None else bool(final <= float(threshold)),
            "mode": mode, "n_images": int(len(x))}


# --------------------------------------------------------------------------------------------
# Aggregation and cost
# --------------------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> Dict[str, Any]:
    """Mean and standard deviation over cells, NaN (undefined) values left out.

    std uses ddof = 1 (sample standard deviation; 0.0 for a single value).

    Returns:
        {"mean": float | None, "std": float | None, "n": int} (None when no value is defined).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def timed(fn: Callable[..., Any], *args: Any, clock: Callable[[], float] = time.perf_counter,
          **kwargs: Any) -> Tuple[Any, float]:
    """Call fn(*args, **kwargs) and measure its wall time with ``clock``.

    Args:
        fn: the function.
        clock: a monotonic clock in seconds (injectable for tests).

    Returns:
        (result, seconds).
    """
    start = clock()
    result = fn(*args, **kwargs)
    return result, float(clock() - start)


# --------------------------------------------------------------------------------------------
# Paired comparisons with the controls
# --------------------------------------------------------------------------------------------
#: Scores for which lower is better (every other score: higher is better).
LOWER_IS_BETTER = frozenset({"deletion_auc", "road_morf_auc"})


def default_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """The comparisons of :func:`paired_comparisons`: every method against every reference map
    (names in ``REFERENCE_TITLES``), then every two methods in the given order (a before b)."""
    methods = [n for n in names if n not in REFERENCE_TITLES]
    refs = [n for n in names if n in REFERENCE_TITLES]
    pairs = [(m, r) for m in methods for r in refs]
    return pairs + [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]


def paired_comparisons(per_cell: Dict[str, Dict[str, Sequence[Optional[float]]]],
                       groups: Optional[Sequence] = None, n_boot: int = 1000, seed: int = 0,
                       pairs: Optional[Sequence[Tuple[str, str]]] = None,
                       alpha: float = 0.05) -> Dict[str, Any]:
    """Paired per-cell differences between maps, each with a cluster-bootstrap interval and a verdict.

    For a pair (a, b) and a score s both have, per cell i: d_i = s_a(i) - s_b(i) (the two maps of the
    same cell, so cell-to-cell spread cancels). Its mean and percentile interval come from
    :func:`cervical.metrics.cluster_mean_ci` (cells resampled by cluster image when ``groups`` is given:
    cells cut from one image are not independent), and :func:`cervical.metrics.verdict` says "beats"
    (interval entirely on the better side of 0), "loses" (entirely on the worse side) or "ties"
    (covers 0: no difference shown, which is not a proof of equality); the better side is below 0
    for the scores in ``LOWER_IS_BETTER``. Cells where either value is undefined (None / NaN, e.g.
    an empty mask) are left out. Intervals are per comparison, not adjusted for their number.

    Args:
        per_cell: {map name: {score: (N,) values}}, as in :func:`evaluate_methods`' "per_cell".
        groups: optional (N,) cluster ids of the cells.
        n_boot: bootstrap resamples (>= 1).
        seed: bootstrap seed (the same for every comparison).
        pairs: (a, b) comparisons (default :func:`default_pairs`).
        alpha: 1 - confidence level.

    Returns:
        JSON-ready {"difference", "interval_over" ("clusters" / "cells"), "n_cells", "n_clusters",
        "n_boot", "seed", "confidence", "lower_is_better", "comparisons": {a: {b: {score:
        {"estimate", "low", "high", "n", "n_groups", "verdict"}}}}}.

    Raises:
        XaiEvalError: on an unknown map name, cells of unequal number, or a bad groups or n_boot.
    """
    from cervical import metrics as M

    lengths = {len(v) for scores in per_cell.values() for v in scores.values()}
    n_cells = lengths.pop() if len(lengths) == 1 else (0 if not lengths else -1)
    if n_cells < 0:
        raise XaiEvalError(f"per_cell: score lists of unequal lengths {sorted(lengths)}; give one value per cell")
    if groups is not None and len(groups) != n_cells:
        raise XaiEvalError(f"groups: {len(groups)} ids for {n_cells} cells; give one per cell")
    if int(n_boot) < 1 or not 0.0 < float(alpha) < 1.0:
        raise XaiEvalError(f"n_boot/alpha: need n_boot >= 1 and 0 < alpha < 1, got {n_boot} and {alpha}")
    comparisons: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for a, b in (default_pairs(list(per_cell)) if pairs is None else pairs):
        if a not in per_cell or b not in per_cell:
            raise XaiEvalError(f"pairs: ({a!r}, {b!r}) names a map not in per_cell; choose from {sorted(per_cell)}")
        row = comparisons.setdefault(a, {}).setdefault(b, {})
        for score in (s for s in per_cell[a] if s in per_cell[b]):
            d = (np.asarray(per_cell[a][score], dtype=np.float64)
                 - np.asarray(per_cell[b][score], dtype=np.float64))
            ci = M.cluster_mean_ci(d, groups, n=int(n_boot), seed=seed, alpha=alpha)
            row[score] = {k: ci[k] for k in ("estimate", "low", "high", "n", "n_groups")}
            row[score]["verdict"] = M.verdict(ci, higher_is_better=score not in LOWER_IS_BETTER)
    return {"difference": "first map minus second, per cell",
            "interval_over": "cells" if groups is None else "clusters",
            "n_cells": n_cells,
            "n_clusters": n_cells if groups is None else int(len(set(groups))),
            "n_boot": int(n_boot), "seed": int(seed), "confidence": 1.0 - float(alpha),
            "lower_is_better": sorted(LOWER_IS_BETTER), "comparisons": comparisons}


def chance_comparisons(per_cell: Dict[str, Dict[str, Sequence[Optional[float]]]],
                       chance: Dict[str, Union[str, Sequence[float]]],
                       groups: Optional[Sequence] = None, n_boot: int = 1000, seed: int = 0,
                       alpha: float = 0.05) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Every map's per-cell score minus a per-cell chance level, with an interval and a verdict.

    For a map m and a score s in ``chance``: d_i = s_m(i) - c_i, where c_i is either given per cell
    (e.g. the mask's area fraction |s_i| / (H W): what a uniform map's energy share and a random
    point's hit rate equal) or, when ``chance[s]`` is a score name, that score of the same map on
    the same cell (e.g. the energy share in a placebo region drawn like the true one: the two are
    exchangeable when the image carries no evidence at the true place, so d then centres on 0).
    Mean, percentile cluster-bootstrap interval (:func:`cervical.metrics.cluster_mean_ci`) and
    verdict beats / ties / loses (:func:`cervical.metrics.verdict`; every score here is higher-is-
    better) as in :func:`paired_comparisons`. A map whose d is 0 on every cell (a constant map
    against the area fraction) gets the interval [0, 0]: ties.

    Args:
        per_cell: {map: {score: (N,) values}} (:func:`evaluate_methods`' "per_cell").
        chance: {score: (N,) chance values, or the name of another score of the same map}.
        groups, n_boot, seed, alpha: as in :func:`paired_comparisons`.
    Returns:
        {map: {score: {"estimate", "low", "high", "n", "n_groups", "verdict"}}} for the maps that
        have the score (and the named chance score).
    Raises:
        XaiEvalError: chance values of the wrong length.
    """
    from cervical import metrics as M

    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for name, scores in per_cell.items():
        for score, ref in chance.items():
            if score not in scores or (isinstance(ref, str) and ref not in scores):
                continue
            c = np.asarray(scores[ref] if isinstance(ref, str) else ref, dtype=np.float64)
            v = np.asarray(scores[score], dtype=np.float64)
            if c.shape != v.shape:
                raise XaiEvalError(f"chance[{score!r}]: {c.size} values for {v.size} cells; give one per cell")
            ci = M.cluster_mean_ci(v - c, groups, n=int(n_boot), seed=seed, alpha=alpha)
            row = {k: ci[k] for k in ("estimate", "low", "high", "n", "n_groups")}
            row["verdict"] = M.verdict(ci, higher_is_better=True)
            out.setdefault(name, {})[score] = row
    return out


#: Columns of :func:`localisation_comparisons`: the reference maps, then the two chance levels.
LOCALISATION_CONTROLS = ("centre", "darkness", "edges", "random", "area", "placebo")
CONTROL_NAMES_LONG = {"area": "area fraction (chance)", "placebo": "placebo site"}


def localisation_comparisons(metrics: Dict[str, Any], region: str = "nucleus",
                             placebo: Optional[str] = None, groups: Optional[Sequence] = None
                             ) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Each method's localisation against every control: the table of the ground-truth benchmark.

    For the scores "<region>_energy" and "<region>_pointing" of :func:`evaluate_methods`' result:
    the paired differences with the reference maps (its "paired" comparisons: method minus
    centre / darkness / edges / random), the difference with the region's area fraction per cell
    ("area": a uniform map's energy, a random point's hit rate; :func:`chance_comparisons`) and,
    with ``placebo`` (the name of an extra region passed to evaluate_methods), the difference with
    the same map's score in that region ("placebo").

    Args:
        metrics: the result of :func:`evaluate_methods` (with masks or ``regions``).
        region: the ground-truth region ("nucleus": mask == 2).
        placebo: name of the placebo region, or None.
        groups: cluster ids for the chance intervals (as given to evaluate_methods).
    Returns:
        {method: {score: {control: {"estimate", "low", "high", "n", "n_groups", "verdict"}}}}.
    Raises:
        XaiEvalError: when the region was not scored.
    """
    per_cell = metrics["per_cell"]
    scores = [f"{region}_energy", f"{region}_pointing"]
    if not any(scores[0] in v for v in per_cell.values()):
        raise XaiEvalError(f"region: {region!r} was not scored; pass masks or regions to evaluate_methods")
    n_boot, seed = metrics["settings"]["paired_n_boot"], metrics["settings"]["seed"]
    areas = metrics["chance_per_cell"][region]
    chance = {scores[0]: areas["area"], scores[1]: areas["pointing"]}
    vs_area = chance_comparisons(per_cell, chance, groups, n_boot, seed)
    vs_placebo = {} if placebo is None else chance_comparisons(
        per_cell, {s: s.replace(region, placebo, 1) for s in scores}, groups, n_boot, seed)
    comp = metrics["paired"]["comparisons"]
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for m in metrics["methods"]:
        for s in scores:
            row = {r: comp[m][r][s] for r in REFERENCE_TITLES if s in comp.get(m, {}).get(r, {})}
            row["area"] = vs_area[m][s]
            if placebo is not None:
                row["placebo"] = vs_placebo[m][s]
            out.setdefault(m, {})[s] = row
    return out


# --------------------------------------------------------------------------------------------
# Several methods on a set of cells
# --------------------------------------------------------------------------------------------
#: ``explain(model, images (B, H, W, C), classes (B,)) -> maps (B, H, W)``: one method.
ExplainFn = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]

#: Display names of the reference maps.
REFERENCE_TITLES = {"random": "random map (reference)", "centre": "centred Gaussian (reference)",
                    "darkness": "darkness (reference)", "edges": "Sobel edges (reference)"}


def _grey_unit(image: np.ndarray) -> np.ndarray:
    """g = (m - min m) / (max m - min m), m the mean over channels; zeros for a constant image."""
    m = _as_image(image).astype(np.float64).mean(axis=-1)
    span = float(m.max() - m.min())
    return np.zeros_like(m) if span == 0.0 else (m - m.min()) / span


def darkness_map(image: np.ndarray) -> np.ndarray:
    """Model-free nucleus finder: 1 - the grey level normalised to [0, 1] within the image.

    d(p) = 1 - g(p), g = (m - min m) / (max m - min m), m = mean of the colour channels: 1 at the
    darkest pixel, 0 at the brightest. Nuclei are the darkest parts of a Pap-smear cell, so a saliency
    method that only finds dark pixels scores like this map. A constant image gives zeros (no energy:
    scored as uniform by :func:`energy_share`).

    Returns:
        (H, W) float64 map in [0, 1].
    """
    g = _grey_unit(image)
    return 1.0 - g if g.max() > 0.0 else g             # g.max() = 1 unless the image is constant


def sobel_edges(image: np.ndarray) -> np.ndarray:
    """Model-free edge map: Sobel gradient magnitude of the normalised grey image g (see :func:`darkness_map`).

    G_x(p) = sum_{dy} k_dy (g(r + dy, c + 1) - g(r + dy, c - 1)),  k = (1, 2, 1) for dy = -1, 0, 1;
    G_y likewise down minus up; E = sqrt(G_x^2 + G_y^2); borders extended by the nearest pixel. A unit
    step between columns c0 - 1 and c0 gives E = 4 on those two columns and 0 elsewhere. This is the
    kind of map a method that "passes through" the image produces (Adebayo et al. 2018).

    Returns:
        (H, W) float64 map >= 0.
    """
    g = np.pad(_grey_unit(image), 1, mode="edge")
    h, w = g.shape[0] - 2, g.shape[1] - 2
    k = ((0, 1.0), (1, 2.0), (2, 1.0))
    gx = sum(wt * (g[i:i + h, 2:] - g[i:i + h, :w]) for i, wt in k)
    gy = sum(wt * (g[2:, i:i + w] - g[:h, i:i + w]) for i, wt in k)
    return np.hypot(gx, gy)


def reference_maps(shape: Tuple[int, int, int], seed: int = 0,
                   images: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Model-free maps that frame the metrics: a method must beat them to count as informative.

    "random": i.i.d. uniform values (seeded), the chance level of every metric;
    "centre": exp(-r^2 / (2 s^2)), r the distance to the image centre, s = min(H, W) / 6 - cells are
    cropped around their nucleus, so this is what knowing only the crop scores;
    with ``images``: "darkness" (:func:`darkness_map`, dark pixels high: nuclei are dark) and "edges"
    (:func:`sobel_edges`), computed from each image alone.

    Args:
        shape: (B, H, W).
        seed: seed of the random map.
        images: optional (B, H, W, C) images for the two image-based maps.

    Returns:
        {name: float32 (B, H, W)}: "random" and "centre", plus "darkness" and "edges" with images.

    Raises:
        XaiEvalError: when the images do not match ``shape``.
    """
    b, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    s = min(h, w) / 6.0
    centre = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * s * s))
    out = {"random": rng.uniform(size=(b, h, w)).astype(np.float32),
           "centre": np.broadcast_to(centre, (b, h, w)).astype(np.float32)}
    if images is not None:
        x = np.asarray(images)
        if x.ndim != 4 or x.shape[:3] != (b, h, w):
            raise XaiEvalError(f"images: shape {x.shape} does not match the maps' {(b, h, w)} (+ channels)")
        out["darkness"] = np.array([darkness_map(im) for im in x], dtype=np.float32).reshape(b, h, w)
        out["edges"] = np.array([sobel_edges(im) for im in x], dtype=np.float32).reshape(b, h, w)
    return out


def choose_eval_cells(y: np.ndarray, n: int, seed: int = 0,
                      eligible: Optional[np.ndarray] = None) -> np.ndarray:
    """A class-balanced, seeded choice of n cells for the quantitative evaluation.

    Each class's rows are shuffled with ``numpy.random.default_rng(seed)``; rows are then taken
    round-robin over the classes (one of each class in turn) until n are chosen.

    Returns:
        sorted (min(n, N),) int64 row indices.
    """
    y = np.asarray(y, dtype=np.int64)
    ok = np.ones(len(y), bool) if eligible is None else np.asarray(eligible, bool)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero((y == c) & ok)) for c in np.unique(y[ok])]
    order: List[int] = []
    for j in range(max((len(pl) for pl in pools), default=0)):
        order.extend(int(pl[j]) for pl in pools if j < len(pl))
    return np.sort(np.array(order[: int(n)], dtype=np.int64))


@dataclasses.dataclass
class EvalSettings:
    """Settings of :func:`evaluate_methods` (recorded in its result).

    Attributes:
        steps, baseline: deletion/insertion curves (see :func:`perturbation_curves`).
        tolerance: pointing-game tolerance in pixels.
        n_sanity: cells in the randomisation check (0 skips it).
        sanity_blocks, sanity_mode, sanity_threshold: see :func:`randomisation_check`.
        batch_size: largest model batch of the perturbation curves.
        seed: seed of the reference map, the sanity cells, the randomisation, the ROAD noise and
            the bootstrap of the paired comparisons.
        road: compute the ROAD curves (MoRF and LeRF, :func:`road_curves`).
        road_percentages: their removed shares in percent.
        road_noise: relative noise sd of ROAD's imputation (:func:`noisy_linear_imputation`).
        n_boot: bootstrap resamples of the paired comparisons (:func:`paired_comparisons`).
    """

    steps: int = STEPS
    baseline: str = "blur"
    tolerance: float = 0.0
    n_sanity: int = 5
    sanity_blocks: Optional[int] = 5
    sanity_mode: str = "permute"
    sanity_threshold: float = 0.9
    batch_size: int = 126
    seed: int = 0
    road: bool = True
    road_percentages: Tuple[float, ...] = ROAD_PERCENTAGES
    road_noise: float = 0.01
    n_boot: int = 1000

    def as_dict(self) -> Dict[str, Any]:
        return {"steps": int(self.steps), "baseline": self.baseline,
                "blur_sigma": "max(H, W) / 10" if self.baseline == "blur" else None,
                "pointing_tolerance_px": float(self.tolerance), "seed": int(self.seed),
                "sanity_blocks": self.sanity_blocks, "sanity_mode": self.sanity_mode,
                "sanity_threshold": float(self.sanity_threshold),
                "road_percentages": [float(p) for p in self.road_percentages] if self.road else None,
                "road_noise": float(self.road_noise) if self.road else None,
                "paired_n_boot": int(self.n_boot)}


def evaluate_methods(model: Any, images: np.ndarray, labels: np.ndarray,
                     masks: Optional[np.ndarray], explainers: Dict[str, ExplainFn],
                     predict: Any = None, settings: Optional[EvalSettings] = None,
                     extra_seconds: Optional[Dict[str, float]] = None,
                     progress: Progress = None, groups: Optional[Sequence] = None,
                     regions: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, Any]:
    """Every metric of this module for every explainer on a set of cells (the predicted class).

    Per cell and method: deletion and insertion AUC; ROAD MoRF and LeRF scores and their difference
    (with ``settings.road``); with masks (0 background, 1 cytoplasm, 2 nucleus) the energy share and
    pointing hit for the nucleus (mask == 2) and the whole cell (mask >= 1), with their chance levels
    (area fractions); the time per cell (after one warm-up call). Then mean +/- std over cells, the
    mean curves, the model-free reference maps (:func:`reference_maps`, with the images) scored
    alike, the paired comparison of every method with every reference map and every other method
    (:func:`paired_comparisons`, intervals over the cluster images in ``groups`` when given), and
    the cascading randomisation check of each method on ``n_sanity`` class-balanced cells.
    ``regions`` adds named (N, H, W) regions scored like the nucleus ("<name>_energy",
    "<name>_pointing" per map and cell, with their chance levels), e.g. a placebo site.

    Args:
        model: the Keras model (randomised in place by the sanity check, then restored).
        images: (N, H, W, 3) raw images as the explainers take them.
        labels: (N,) true labels (for the accuracy on these cells only).
        masks: (N, H, W) label masks, or None (localisation then reported as unavailable).
        explainers: {method name: explain(model, images, classes) -> maps}.
        predict: images -> (N, K) probabilities (default: the model's own outputs).
        settings: see :class:`EvalSettings` (default: its defaults).
        extra_seconds: per-cell seconds to add to a method's time (work it shares across
            calls, e.g. LIME's superpixels).
        progress: None, or ``progress(step, done, total)``.
        groups: optional (N,) cluster ids of the cells (e.g. their cluster image).
        regions: optional {name: (N, H, W) masks, non-zero = inside}; names other than
            "nucleus" and "cell".

    Returns:
        JSON-ready dict: "n_cells", "accuracy_on_cells", "labels", "predicted" (per cell),
        "settings", "fractions", "road_fractions",
        "chance", "chance_per_cell" ({region: {"area", "pointing"}: (N,) area fractions, of the
        mask dilated by the tolerance for pointing}), "methods", "reference", "paired", "sanity",
        "per_cell", "localisation_available".
    """
    predict = model if predict is None else predict
    settings = settings or EvalSettings()
    x = np.asarray(images)
    clash = sorted(set(explainers) & set(REFERENCE_TITLES))
    if clash:
        raise XaiEvalError(f"explainers: {clash} are names of reference maps; rename the method")
    if groups is not None and len(groups) != len(x):
        raise XaiEvalError(f"groups: {len(groups)} ids for {len(x)} cells; give one per cell")
    inside = _regions(masks, regions, x.shape[:3])
    chance = _chance_per_cell(inside, settings.tolerance)
    pred = _predict(predict, x.astype(np.float32)).argmax(axis=1)
    maps, seconds = _timed_maps(model, x, pred, explainers, extra_seconds or {}, progress)
    refs = reference_maps(x.shape[:3], seed=settings.seed, images=x)
    every = {**maps, **refs}
    fractions, curves = _faithfulness(predict, x, every, pred, settings, progress)
    scores, per_cell = _scores(every, curves, fractions, inside, settings.tolerance)
    for name in every:
        scores[name]["seconds_per_cell"] = seconds.get(name)
    paired = paired_comparisons(per_cell, None if groups is None else list(groups),
                                n_boot=settings.n_boot, seed=settings.seed)
    sanity, k = _sanity_checks(model, x, labels, pred, explainers, settings, progress)
    return {
        "n_cells": len(x),
        "accuracy_on_cells": float(np.mean(pred == np.asarray(labels))) if len(x) else None,
        "explained_class": "predicted",
        "labels": [int(v) for v in np.asarray(labels).reshape(-1)],
        "predicted": [int(v) for v in pred],
        "settings": {**settings.as_dict(), "sanity_cells": k},
        "fractions": fractions["deletion"].tolist(),
        "road_fractions": None if "road" not in fractions else fractions["road"].tolist(),
        "localisation_available": masks is not None,
        "chance": {f"{r}_{k if k == 'pointing' else 'area'}": mean_std(v)
                   for r, c in chance.items() for k, v in c.items()},
        "chance_per_cell": chance,
        "methods": {m: scores[m] for m in explainers},
        "reference": {r: scores[r] for r in refs},
        "paired": paired,
        "sanity": sanity,
        "per_cell": per_cell,
    }


def pool_evaluations(parts: Sequence[Dict[str, Any]], keep: Optional[Sequence[bool]] = None,
                     groups: Optional[Sequence] = None) -> Dict[str, Any]:
    """Several :func:`evaluate_methods` results pooled cell by cell, optionally restricted to some cells.

    For a K-fold cross-validation (each cell explained by the model that did not train on it) the
    parts are the folds; ``keep`` then selects cells of the pooled set (e.g. one class, or the
    misclassified cells). The per-cell scores and chance levels of the kept cells are concatenated
    in part order, and everything computed from them is computed again from them: mean +/- std
    per map, the chance levels, the accuracy, and the paired comparisons
    (:func:`paired_comparisons`, intervals over ``groups`` of the kept cells when given). Not pooled:
    the mean curves (kept only for the unrestricted pool, as the cell-weighted mean of the parts'
    mean curves), the timings (cell-weighted mean) and the sanity check (the first part's).

    Args:
        parts: results of evaluate_methods with the same maps and settings.
        keep: optional (N,) booleans over the pooled cells.
        groups: optional (N,) cluster ids over the pooled cells.
    Returns:
        A dict of evaluate_methods' form.
    Raises:
        XaiEvalError: no parts, parts with other maps, or keep / groups of the wrong length.
    """
    if not parts or any(set(p["per_cell"]) != set(parts[0]["per_cell"]) for p in parts):
        raise XaiEvalError("parts: give one or more evaluate_methods results of the same maps")
    n = sum(p["n_cells"] for p in parts)
    k = np.ones(n, bool) if keep is None else np.asarray(keep, bool).reshape(-1)
    if k.size != n or (groups is not None and len(groups) != n):
        raise XaiEvalError(f"keep/groups: need one value per pooled cell ({n})")
    cat = lambda lists: [v for lst in lists for v in lst]                     # noqa: E731
    pick = lambda values: [v for v, ok in zip(values, k) if ok]               # noqa: E731
    per_cell = {m: {s: pick(cat(p["per_cell"][m][s] for p in parts)) for s in sc}
                for m, sc in parts[0]["per_cell"].items()}
    chance = {r: {c: pick(cat(p["chance_per_cell"][r][c] for p in parts)) for c in v}
              for r, v in parts[0]["chance_per_cell"].items()}
    labels, pred = pick(cat(p["labels"] for p in parts)), pick(cat(p["predicted"] for p in parts))
    weights = np.array([p["n_cells"] for p in parts], dtype=np.float64) / max(n, 1)
    first = parts[0]
    out = {**first, "n_cells": len(labels), "labels": labels, "predicted": pred,
           "accuracy_on_cells": float(np.mean(np.equal(labels, pred))) if labels else None,
           "per_cell": per_cell, "chance_per_cell": chance,
           "chance": {f"{r}_{c if c == 'pointing' else 'area'}": mean_std(v)
                      for r, cv in chance.items() for c, v in cv.items()},
           "paired": paired_comparisons(per_cell, None if groups is None else pick(groups),
                                        n_boot=first["settings"]["paired_n_boot"],
                                        seed=first["settings"]["seed"])}
    for group in ("methods", "reference"):
        out[group] = {m: {s: mean_std(per_cell[m][s]) for s in per_cell[m]} for m in first[group]}
        for m, r in out[group].items():
            secs = [p[group][m].get("seconds_per_cell") for p in parts]
            r["seconds_per_cell"] = None if None in secs else float(np.dot(weights, secs))
            for curve in (c for c in first[group][m] if c.startswith("mean_") and keep is None):
                r[curve] = np.tensordot(weights, [p[group][m][curve] for p in parts], 1).tolist()
    return out


def _timed_maps(model: Any, x: np.ndarray, pred: np.ndarray, explainers: Dict[str, ExplainFn],
                extra_seconds: Dict[str, float], progress: Progress):
    """Each method's maps and seconds per cell (after one warm-up call on the first cell)."""
    maps, seconds = {}, {}
    for j, (name, explain) in enumerate(explainers.items()):
        explain(model, x[:1], pred[:1])                         # compile / trace outside the clock
        m, secs = timed(explain, model, x, pred)
        maps[name] = np.asarray(m, dtype=np.float32)
        seconds[name] = secs / max(len(x), 1) + extra_seconds.get(name, 0.0)
        if progress is not None:
            progress("evaluate: maps", j + 1, len(explainers))
    return maps, seconds


def _faithfulness(predict: Any, x: np.ndarray, every: Dict[str, np.ndarray], pred: np.ndarray,
                  settings: EvalSettings, progress: Progress):
    """({"deletion": fractions, "road": fractions}, {name: {curve: (N, points)}}) for every map.

    Curves "deletion" and "insertion", and with ``settings.road`` "road_morf" and "road_lerf".
    """
    curves: Dict[str, Dict[str, np.ndarray]] = {}
    fractions = {"deletion": np.linspace(0.0, 1.0, int(settings.steps) + 1)}
    for j, (name, a) in enumerate(every.items()):
        curves[name] = {}
        for mode in ("deletion", "insertion"):
            fractions["deletion"], curves[name][mode] = perturbation_curves(
                predict, x.astype(np.float32), a, pred, mode=mode, baseline=settings.baseline,
                steps=settings.steps, batch_size=settings.batch_size)
        for order in ("morf", "lerf") if settings.road else ():
            fractions["road"], curves[name][f"road_{order}"] = road_curves(
                predict, x.astype(np.float32), a, pred, order=order,
                percentages=settings.road_percentages, noise=settings.road_noise,
                seed=settings.seed, batch_size=settings.batch_size)
        if progress is not None:
            progress("evaluate: deletion/insertion/ROAD", j + 1, len(every))
    return fractions, curves


def _regions(masks: Optional[np.ndarray], regions: Optional[Dict[str, np.ndarray]],
             shape: Tuple[int, ...]) -> Dict[str, np.ndarray]:
    """{name: (N, H, W) bool}: "nucleus" (mask == 2) and "cell" (mask >= 1) with masks, then the
    extra ``regions``."""
    out = {} if masks is None else {"nucleus": np.asarray(masks) == 2, "cell": np.asarray(masks) >= 1}
    for name, r in (regions or {}).items():
        if name in ("nucleus", "cell") or np.shape(r) != tuple(shape):
            raise XaiEvalError(f"regions: {name!r} must be a new name with shape {tuple(shape)}, "
                               f"got {np.shape(r)}")
        out[str(name)] = np.asarray(r).astype(bool)
    return out


def _chance_per_cell(inside: Dict[str, np.ndarray], tolerance: float) -> Dict[str, Dict[str, list]]:
    """What a uniform map (energy) or a random point (pointing) scores on each cell: {region:
    {"area": area fractions, "pointing": area fractions of the mask dilated by the tolerance}}."""
    return {region: {"area": [area_fraction(r) for r in m],
                     "pointing": [area_fraction(r, tolerance) for r in m]}
            for region, m in inside.items()}


def _scores(every: Dict[str, np.ndarray], curves: Dict[str, Dict[str, np.ndarray]],
            fractions: Dict[str, np.ndarray], inside: Dict[str, np.ndarray], tolerance: float):
    """Per method: mean +/- std of every score and the mean curves; and the per-cell values."""
    results: Dict[str, Dict[str, Any]] = {}
    per_cell: Dict[str, Dict[str, List[Optional[float]]]] = {}
    f = fractions["deletion"]
    for name, a in every.items():
        values = {"deletion_auc": curve_auc(f, curves[name]["deletion"]),
                  "insertion_auc": curve_auc(f, curves[name]["insertion"])}
        if "road_morf" in curves[name]:
            values["road_morf_auc"] = road_auc(fractions["road"], curves[name]["road_morf"])
            values["road_lerf_auc"] = road_auc(fractions["road"], curves[name]["road_lerf"])
            values["road_lerf_minus_morf"] = values["road_lerf_auc"] - values["road_morf_auc"]
        for region, m in inside.items():
            values[f"{region}_energy"] = np.array([energy_share(a[i], m[i]) for i in range(len(a))])
            values[f"{region}_pointing"] = np.array(
                [pointing_hit(a[i], m[i], tolerance) for i in range(len(a))])
        results[name] = {k: mean_std(v) for k, v in values.items()}
        results[name]["mean_deletion_curve"] = curves[name]["deletion"].mean(axis=0).tolist()
        results[name]["mean_insertion_curve"] = curves[name]["insertion"].mean(axis=0).tolist()
        for order in ("morf", "lerf"):
            if f"road_{order}" in curves[name]:
                results[name][f"mean_road_{order}_curve"] = curves[name][f"road_{order}"].mean(axis=0).tolist()
        per_cell[name] = {k: [None if np.isnan(v) else float(v)
                              for v in np.asarray(vals, dtype=np.float64)]
                          for k, vals in values.items()}
    return results, per_cell


def _sanity_checks(model: Any, x: np.ndarray, labels: np.ndarray, pred: np.ndarray,
                   explainers: Dict[str, ExplainFn], settings: EvalSettings, progress: Progress):
    """The randomisation check of every method on class-balanced cells: (results, n cells)."""
    k = min(int(settings.n_sanity), len(x))
    if k <= 0:
        return {}, 0
    # class-balanced among the evaluated cells (their rows are ordered by class: the first k would
    # all be one cell type)
    sel = choose_eval_cells(np.asarray(labels), k, seed=settings.seed)
    out = {}
    for name, explain in explainers.items():
        def blocks_done(step: str, done: int, total: int, name: str = name) -> None:
            if progress is not None:
                progress(f"evaluate: sanity {name} blocks", done, total)

        out[name] = randomisation_check(model, explain, x[sel], class_index=pred[sel],
                                        blocks=settings.sanity_blocks, mode=settings.sanity_mode,
                                        threshold=settings.sanity_threshold, seed=settings.seed,
                                        progress=blocks_done)
    return out, k


def _fmt(stat: Optional[Dict[str, Any]], digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _rate(stat: Dict[str, Any]) -> str:
    """A mean hit rate with its number of cells, e.g. "0.80 (n 30)" (ties make hits fractional)."""
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.2f} (n {stat['n']})"


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _verdict(sanity: Dict[str, Any]) -> str:
    if sanity["passed"] is None:
        return "n/a (constant maps)"
    return "pass" if sanity["passed"] else "**FAIL**"


def format_metrics_md(metrics: Dict[str, Any], title: str = "XAI evaluation",
                      titles: Optional[Dict[str, str]] = None) -> str:
    """The Markdown report of :func:`evaluate_methods`: the metrics table, the paired comparisons
    with the reference maps (with a verdict written from their intervals) and the sanity table.

    Args:
        metrics: its result (with "layer" when the caller added one).
        title: the page title.
        titles: display names of the methods (default: the keys).
    """
    names = {**REFERENCE_TITLES, **(titles or {})}
    lines = [f"# {title}", ""] + _method_notes(metrics) + _metrics_table(metrics, names)
    if metrics.get("paired"):
        lines += _paired_section(metrics, {**CONTROL_NAMES, **(titles or {})})
    if metrics["sanity"]:
        lines += _sanity_table(metrics, names)
    return "\n".join(lines) + "\n"


def _method_notes(metrics: Dict[str, Any]) -> List[str]:
    s = metrics["settings"]
    blur = " (Gaussian, sigma = max(H, W) / 10)" if s["baseline"] == "blur" else ""
    tol = s["pointing_tolerance_px"]
    tol_text = f" (tolerance {tol:g} px)" if tol else ""
    layer = f"; CAM layer `{metrics['layer']}`" if metrics.get("layer") else ""
    return [f"{metrics['n_cells']} cells; the predicted class is explained (accuracy on these "
            f"cells {metrics['accuracy_on_cells']:.3f}){layer}.", "",
            f"- Deletion / insertion (Petsiuk et al. 2018): pixels removed / revealed in decreasing "
            f"map order in {100 / s['steps']:g} % steps, baseline = {s['baseline']} image{blur}; "
            f"area under the predicted-class probability. Deletion: lower is better; insertion: "
            f"higher is better.",
            f"- Energy share (energy-based pointing game): share of the positive map energy inside "
            f"the mask (a map with no positive energy counts as uniform); pointing: share of the "
            f"map's maximal pixels inside the mask{tol_text} (1 or 0 for a single peak; a LIME "
            f"superpixel plateau counts pro rata). Chance = mask area fraction (what a uniform map "
            f"or a random point scores).",
            *_road_note(s),
            "- Time: wall seconds per cell after one warm-up call.", ""]


def _road_note(s: Dict[str, Any]) -> List[str]:
    if not s.get("road_percentages"):
        return []
    pct = ", ".join(f"{p:g}" for p in s["road_percentages"])
    return [f"- ROAD (Rong et al. 2022, remove and debias): the {pct} % most (MoRF) or least (LeRF) "
            f"salient pixels are replaced by noisy linear imputation from their neighbours (noise sd "
            f"{s['road_noise']:g} x the image's value range); score = mean predicted-class "
            f"probability over the percentages (trapezoid). MoRF: lower is better; LeRF and "
            f"LeRF - MoRF: higher is better."]


def _metrics_table(metrics: Dict[str, Any], names: Dict[str, str]) -> List[str]:
    loc = metrics["localisation_available"]
    road = bool(metrics.get("road_fractions"))
    head = "| method | deletion AUC ↓ | insertion AUC ↑ |"
    rule = "|---|---|---|"
    if road:
        head += " ROAD MoRF ↓ | ROAD LeRF ↑ | LeRF − MoRF ↑ |"
        rule += "---|---|---|"
    if loc:
        head += " nucleus energy ↑ | cell energy ↑ | nucleus pointing ↑ | cell pointing ↑ |"
        rule += "---|---|---|---|"
    else:
        head += " localisation |"
        rule += "---|"
    lines = [head + " s / cell | sanity |", rule + "---|---|"]
    ch = metrics.get("chance", {})
    rows = [(m, r, False) for m, r in metrics["methods"].items()]
    rows += [(m, r, True) for m, r in metrics["reference"].items()]
    for name, r, is_ref in rows:
        cells = [names.get(name, name), _fmt(r["deletion_auc"]), _fmt(r["insertion_auc"])]
        if road:
            cells += [_fmt(r.get(k)) for k in ("road_morf_auc", "road_lerf_auc", "road_lerf_minus_morf")]
        if loc:
            cells += [f"{_fmt(r['nucleus_energy'])} (chance {_fmt(ch['nucleus_area'])})",
                      f"{_fmt(r['cell_energy'])} (chance {_fmt(ch['cell_area'])})",
                      f"{_rate(r['nucleus_pointing'])} (chance {_num(ch['nucleus_pointing']['mean'])})",
                      f"{_rate(r['cell_pointing'])} (chance {_num(ch['cell_pointing']['mean'])})"]
        else:
            cells.append("unavailable (no masks)")
        sec = r.get("seconds_per_cell")
        cells.append("-" if sec is None else f"{sec:.3g}")
        san = None if is_ref else metrics["sanity"].get(name)
        cells.append("-" if san is None else f"{_verdict(san)} (ρ {_num(san['final_similarity'])})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


#: Short names of the reference maps in the paired table and the verdict.
CONTROL_NAMES = {"centre": "centred Gaussian", "darkness": "darkness map", "edges": "Sobel edge map",
                 "random": "random map"}

#: Scores of the paired table and the verdict, in order.
HEADLINE_SCORES = (("nucleus_energy", "nucleus energy"), ("nucleus_pointing", "nucleus pointing"),
                   ("deletion_auc", "deletion AUC"), ("insertion_auc", "insertion AUC"),
                   ("road_morf_auc", "ROAD MoRF"), ("road_lerf_auc", "ROAD LeRF"),
                   ("road_lerf_minus_morf", "ROAD LeRF − MoRF"))


def _diff(c: Optional[Dict[str, Any]]) -> str:
    """A paired difference with its interval, e.g. "+0.120 [+0.050, +0.190]".

    Three decimals, or as many as give the largest of the three numbers 3 significant digits when
    it is below 0.01 ("-0.000146 [-0.000171, -0.000121]"), so a verdict on a tiny difference is
    visibly about a tiny difference.
    """
    if not c or c.get("estimate") is None:
        return "n/a"
    values = (c["estimate"], c["low"], c["high"])
    top = max(abs(v) for v in values)
    d = 3 if top == 0.0 or top >= 0.01 else min(10, 2 - int(np.floor(np.log10(top))))
    return "{:+.{d}f} [{:+.{d}f}, {:+.{d}f}]".format(*values, d=d)


def _arrow(score: str) -> str:
    return "↓" if score in LOWER_IS_BETTER else "↑"


def _paired_section(metrics: Dict[str, Any], names: Dict[str, str]) -> List[str]:
    """The table of method-minus-reference differences and the verdict paragraph."""
    p = metrics["paired"]
    comp = p["comparisons"]
    methods = list(metrics["methods"])
    refs = [r for r in CONTROL_NAMES if r in metrics["reference"]]
    scores = [(k, t) for k, t in HEADLINE_SCORES
              if any(k in comp.get(m, {}).get(r, {}) for m in methods for r in refs)]
    over = (f"{p['n_clusters']} cluster images (cells of one image resampled together)"
            if p["interval_over"] == "clusters" else f"{p['n_cells']} cells (treated as independent)")
    lines = ["", "## Paired comparisons with the reference maps", "",
             f"Per cell, method minus reference map; mean difference with a "
             f"{100 * p['confidence']:g} % percentile bootstrap interval over {over}, "
             f"{p['n_boot']} resamples. beats / loses: the interval lies entirely on the better / "
             f"worse side of 0 (↓: lower is better, so a negative difference is better); ties: it "
             f"covers 0 - no difference shown, not a proof that the two are equal. Intervals are "
             f"per comparison, not adjusted for their number.", "",
             "| score | method | " + " | ".join(f"vs {CONTROL_NAMES[r]}" for r in refs) + " |",
             "|---|---|" + "---|" * len(refs)]
    for key, label in scores:
        for m in methods:
            cells = [f"{_diff(c)} {c['verdict']}" if c and c.get("estimate") is not None else "n/a"
                     for c in (comp.get(m, {}).get(r, {}).get(key) for r in refs)]
            lines.append(f"| {label} {_arrow(key)} | {names.get(m, m)} | " + " | ".join(cells) + " |")
    return lines + ["", "**Verdict.** " + " ".join(verdict_sentences(metrics, names))]


def verdict_sentences(metrics: Dict[str, Any], names: Optional[Dict[str, str]] = None) -> List[str]:
    """The plain-language verdict of the paired comparisons, one sentence per headline score and
    one overall, built only from the verdicts (what beats, ties with or loses to each control)."""
    names = {**REFERENCE_TITLES, **(names or {})}
    comp = metrics["paired"]["comparisons"]
    methods = list(metrics["methods"])
    refs = [r for r in CONTROL_NAMES if r in metrics["reference"]]
    scores = [(k, t) for k, t in HEADLINE_SCORES
              if any(k in comp.get(m, {}).get(r, {}) for m in methods for r in refs)]
    sentences = [_score_sentence(comp, methods, refs, key, label, names) for key, label in scores]
    sentences.append(_overall_sentence(comp, methods, refs, scores, names))
    return [s for s in sentences if s]


_PLURAL = {"loses": "lose", "ties": "tie", "n/a": "n/a"}


def _control_clause(comp: Dict[str, Any], methods: List[str], ref: str, key: str,
                    names: Dict[str, str]) -> str:
    """E.g. "no method beats the centred Gaussian (5 lose, 1 ties)" or
    "Grad-CAM (+0.120 [+0.050, +0.190]) beats the random map (the other 5 do not)"."""
    rows = [(m, comp.get(m, {}).get(ref, {}).get(key)) for m in methods]
    rows = [(m, c) for m, c in rows if c and c.get("estimate") is not None]
    if not rows:
        return ""
    control = CONTROL_NAMES.get(ref, ref)
    wins = [(m, c) for m, c in rows if c["verdict"] == "beats"]
    if not wins:
        counts = {v: sum(c["verdict"] == v for _, c in rows) for v in ("loses", "ties", "n/a")}
        detail = ", ".join(f"{n} {v if n == 1 else _PLURAL[v]}" for v, n in counts.items() if n)
        return f"no method beats the {control} ({detail})"
    text = ", ".join(f"{names.get(m, m)} ({_diff(c)})" for m, c in wins)
    rest = len(rows) - len(wins)
    tail = "" if not rest else " (the other does not)" if rest == 1 else f" (the other {rest} do not)"
    return f"{text} {'beats' if len(wins) == 1 else 'beat'} the {control}{tail}"


def _score_sentence(comp: Dict[str, Any], methods: List[str], refs: List[str], key: str,
                    label: str, names: Dict[str, str]) -> str:
    clauses = [c for c in (_control_clause(comp, methods, r, key, names) for r in refs) if c]
    if not clauses:
        return ""
    return f"{label[0].upper()}{label[1:]} ({_arrow(key)}): " + "; ".join(clauses) + "."


def _overall_sentence(comp: Dict[str, Any], methods: List[str], refs: List[str],
                      scores: List[Tuple[str, str]], names: Dict[str, str]) -> str:
    """Which method beats every reference map on which score (or that none does)."""
    found = []
    for m in methods:
        won = [label for key, label in scores
               if all((comp.get(m, {}).get(r, {}).get(key) or {}).get("verdict") == "beats" for r in refs)]
        if won:
            found.append(f"{names.get(m, m)} on {', '.join(won)}")
    if not refs or not scores:
        return ""
    if not found:
        return f"No method beats all {len(refs)} reference maps on any of these scores."
    return f"Beating all {len(refs)} reference maps: " + "; ".join(found) + "."


def _sanity_table(metrics: Dict[str, Any], names: Dict[str, str]) -> List[str]:
    s = metrics["settings"]
    lines = ["", f"## Sanity check (Adebayo et al. 2018, cascading randomisation, mode "
             f"{s['sanity_mode']})", "",
             f"Spearman ρ between the maps of the trained model and those after randomising the "
             f"layers with weights from the output back, cumulatively ({s['sanity_cells']} cells; "
             f"in brackets the number of layers randomised so far). A method whose ρ stays above "
             f"{s['sanity_threshold']:g} with the whole model random does not depend on what the "
             f"model learned and FAILS.", "",
             "| method | ρ after each block | final ρ | verdict |", "|---|---|---|---|"]
    for name, san in metrics["sanity"].items():
        seq = " → ".join(f"{_num(st['similarity'])} ({st['n_randomised']})" for st in san["steps"])
        verdict = _verdict(san) + (": maps do not depend on the weights"
                                   if san["passed"] is False else "")
        lines.append(f"| {names.get(name, name)} | {seq} | {_num(san['final_similarity'])} | "
                     f"{verdict} |")
    return lines


def format_localisation_md(table: Dict[str, Dict[str, Dict[str, Any]]],
                           titles: Optional[Dict[str, str]] = None,
                           score_titles: Optional[Dict[str, str]] = None) -> str:
    """The Markdown table of :func:`localisation_comparisons` and a sentence per score naming the
    methods that beat every control (or saying that none does).

    Args:
        table: its result.
        titles: display names of the methods.
        score_titles: display names of the scores (e.g. {"nucleus_energy": "cue energy share"}).
    Returns:
        Markdown text: one row per score and method, "+0.120 [+0.050, +0.190] beats" per control.
    """
    names = {**CONTROL_NAMES, **CONTROL_NAMES_LONG}
    titles, score_titles = titles or {}, score_titles or {}
    controls = [c for c in LOCALISATION_CONTROLS
                if any(c in row for scores in table.values() for row in scores.values())]
    scores = list(dict.fromkeys(s for v in table.values() for s in v))
    lines = ["| score | method | " + " | ".join(f"vs {names[c]}" for c in controls) + " |",
             "|---|---|" + "---|" * len(controls)]
    summary = []
    for score in scores:
        label = score_titles.get(score, score.replace("_", " "))
        winners = []
        for m, v in table.items():
            row = v.get(score, {})
            cells = [f"{_diff(row[c])} {row[c]['verdict']}" if c in row else "n/a" for c in controls]
            lines.append(f"| {label} ↑ | {titles.get(m, m)} | " + " | ".join(cells) + " |")
            if row and all(row.get(c, {}).get("verdict") == "beats" for c in controls):
                winners.append(titles.get(m, m))
        summary.append(f"{label}: " + (", ".join(winners) + " beat" + ("s" if len(winners) == 1 else "")
                                       + " every control" if winners else "no method beats every control"))
    return "\n".join(lines + ["", "**Verdict.** " + "; ".join(summary) + "."]) + "\n"


def plot_curves(metrics: Dict[str, Any], titles: Optional[Dict[str, str]] = None):
    """The mean deletion and insertion curves (and ROAD MoRF / LeRF curves when computed) of every
    method and reference map, as a Figure.

    Args:
        metrics: the result of :func:`evaluate_methods`.
        titles: display names of the methods.
    Returns:
        a matplotlib Figure (the caller saves it).
    """
    from matplotlib.figure import Figure

    names = {**REFERENCE_TITLES, **(titles or {})}
    panels = [("mean_deletion_curve", "fractions", "Deletion (lower area is better)"),
              ("mean_insertion_curve", "fractions", "Insertion (higher area is better)")]
    if metrics.get("road_fractions"):
        panels += [("mean_road_morf_curve", "road_fractions", "ROAD MoRF (lower is better)"),
                   ("mean_road_lerf_curve", "road_fractions", "ROAD LeRF (higher is better)")]
    fig = Figure(figsize=(4.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels))
    for group, style in (("methods", "-"), ("reference", ":")):
        for name, r in metrics[group].items():
            for ax, (key, fkey, _) in zip(axes, panels):
                ax.plot(metrics[fkey], r[key], style, label=names.get(name, name))
    for ax, (_, _, t) in zip(axes, panels):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("fraction of pixels removed / revealed")
        ax.set_ylabel("predicted-class probability")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig
