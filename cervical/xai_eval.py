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

Several methods at once
    :func:`evaluate_methods` runs all of the above for a set of explainers (small callables
    ``explain(model, images, classes) -> maps``) on a set of cells, beside two model-free reference
    maps (:func:`reference_maps`), and :func:`format_metrics_md` writes the tables.

This module imports only NumPy at import time; Keras is imported inside :func:`weighted_layers` and the
randomisation check, scikit-image inside :func:`blur_baseline`, Matplotlib inside :func:`plot_curves`.
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
    "reference_maps",
    "choose_eval_cells",
    "EvalSettings",
    "evaluate_methods",
    "format_metrics_md",
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
    classes = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (len(x),))
    if int(batch_size) < 1:
        raise XaiEvalError(f"batch_size: must be >= 1, got {batch_size}")
    per_cell = int(steps) + 1
    cells_per_batch = max(1, int(batch_size) // per_cell)
    probs = np.zeros((len(x), per_cell), dtype=np.float64)
    for start in range(0, len(x), cells_per_batch):
        idx = range(start, min(start + cells_per_batch, len(x)))
        batch = np.concatenate([
            perturbation_images(x[i], a[i], make_baseline(x[i], baseline, sigma), mode, steps) for i in idx])
        out = _predict(predict, batch).reshape(len(idx), per_cell, -1)
        if classes.min() < 0 or classes.max() >= out.shape[-1]:
            raise XaiEvalError(f"class_index: values must lie in [0, {out.shape[-1] - 1}], got {class_index!r}")
        probs[start:start + len(idx)] = out[np.arange(len(idx)), :, classes[start:start + len(idx)]]
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
# Several methods on a set of cells
# --------------------------------------------------------------------------------------------
#: ``explain(model, images (B, H, W, C), classes (B,)) -> maps (B, H, W)``: one method.
ExplainFn = Callable[[Any, np.ndarray, np.ndarray], np.ndarray]

#: Display names of the reference maps.
REFERENCE_TITLES = {"random": "random map (reference)", "centre": "centred Gaussian (reference)"}


def reference_maps(shape: Tuple[int, int, int], seed: int = 0) -> Dict[str, np.ndarray]:
    """Two model-free maps that frame the metrics.

    "random": i.i.d. uniform values (seeded), the chance level of every metric;
    "centre": exp(-r^2 / (2 s^2)), r the distance to the image centre, s = min(H, W) / 6 - cells are
    cropped around their nucleus, so this is what knowing only the crop scores.

    Args:
        shape: (B, H, W).
        seed: seed of the random map.

    Returns:
        {"random": float32 (B, H, W), "centre": float32 (B, H, W)}.
    """
    b, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    s = min(h, w) / 6.0
    centre = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * s * s))
    return {"random": rng.uniform(size=(b, h, w)).astype(np.float32),
            "centre": np.broadcast_to(centre, (b, h, w)).astype(np.float32)}


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
        seed: seed of the reference map, the sanity cells and the randomisation.
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

    def as_dict(self) -> Dict[str, Any]:
        return {"steps": int(self.steps), "baseline": self.baseline,
                "blur_sigma": "max(H, W) / 10" if self.baseline == "blur" else None,
                "pointing_tolerance_px": float(self.tolerance), "seed": int(self.seed),
                "sanity_blocks": self.sanity_blocks, "sanity_mode": self.sanity_mode,
                "sanity_threshold": float(self.sanity_threshold)}


def evaluate_methods(model: Any, images: np.ndarray, labels: np.ndarray,
                     masks: Optional[np.ndarray], explainers: Dict[str, ExplainFn],
                     predict: Any = None, settings: Optional[EvalSettings] = None,
                     extra_seconds: Optional[Dict[str, float]] = None,
                     progress: Progress = None) -> Dict[str, Any]:
    """Every metric of this module for every explainer on a set of cells (the predicted class).

    Per cell and method: deletion and insertion AUC; with masks (0 background, 1 cytoplasm,
    2 nucleus) the energy share and pointing hit for the nucleus (mask == 2) and the whole cell
    (mask >= 1), with their chance levels (area fractions); the time per cell (after one warm-up
    call). Then mean +/- std over cells, the mean curves, the two reference maps scored alike, and
    the cascading randomisation check of each method on ``n_sanity`` class-balanced cells.

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

    Returns:
        JSON-ready dict: "n_cells", "accuracy_on_cells", "settings", "fractions", "chance",
        "methods", "reference", "sanity", "per_cell", "localisation_available".
    """
    predict = model if predict is None else predict
    settings = settings or EvalSettings()
    x = np.asarray(images)
    pred = _predict(predict, x.astype(np.float32)).argmax(axis=1)
    maps, seconds = _timed_maps(model, x, pred, explainers, extra_seconds or {}, progress)
    every = {**maps, **reference_maps(x.shape[:3], seed=settings.seed)}
    fractions, curves = _faithfulness(predict, x, every, pred, settings, progress)
    scores, per_cell = _scores(every, curves, fractions, masks, settings.tolerance)
    for name in every:
        scores[name]["seconds_per_cell"] = seconds.get(name)
    sanity, k = _sanity_checks(model, x, labels, pred, explainers, settings, progress)
    return {
        "n_cells": len(x),
        "accuracy_on_cells": float(np.mean(pred == np.asarray(labels))) if len(x) else None,
        "explained_class": "predicted",
        "settings": {**settings.as_dict(), "sanity_cells": k},
        "fractions": fractions.tolist(),
        "localisation_available": masks is not None,
        "chance": {} if masks is None else _chance_levels(masks, settings.tolerance),
        "methods": {m: scores[m] for m in explainers},
        "reference": {r: scores[r] for r in REFERENCE_TITLES},
        "sanity": sanity,
        "per_cell": per_cell,
    }


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
    """(fractions, {name: {"deletion": (N, T+1), "insertion": (N, T+1)}}) for every map."""
    curves: Dict[str, Dict[str, np.ndarray]] = {}
    fractions = np.linspace(0.0, 1.0, int(settings.steps) + 1)
    for j, (name, a) in enumerate(every.items()):
        curves[name] = {}
        for mode in ("deletion", "insertion"):
            fractions, curves[name][mode] = perturbation_curves(
                predict, x.astype(np.float32), a, pred, mode=mode, baseline=settings.baseline,
                steps=settings.steps, batch_size=settings.batch_size)
        if progress is not None:
            progress("evaluate: deletion/insertion", j + 1, len(every))
    return fractions, curves


def _chance_levels(masks: np.ndarray, tolerance: float) -> Dict[str, Any]:
    """What a uniform map (energy) or a random point (pointing) scores: the mask area fractions."""
    nucleus, cell = np.asarray(masks) == 2, np.asarray(masks) >= 1
    return {"nucleus_area": mean_std([area_fraction(m) for m in nucleus]),
            "cell_area": mean_std([area_fraction(m) for m in cell]),
            "nucleus_pointing": mean_std([area_fraction(m, tolerance) for m in nucleus]),
            "cell_pointing": mean_std([area_fraction(m, tolerance) for m in cell])}


def _scores(every: Dict[str, np.ndarray], curves: Dict[str, Dict[str, np.ndarray]],
            fractions: np.ndarray, masks: Optional[np.ndarray], tolerance: float):
    """Per method: mean +/- std of every score and the mean curves; and the per-cell values."""
    results: Dict[str, Dict[str, Any]] = {}
    per_cell: Dict[str, Dict[str, List[Optional[float]]]] = {}
    for name, a in every.items():
        values = {"deletion_auc": curve_auc(fractions, curves[name]["deletion"]),
                  "insertion_auc": curve_auc(fractions, curves[name]["insertion"])}
        if masks is not None:
            for region, inside in (("nucleus", np.asarray(masks) == 2),
                                   ("cell", np.asarray(masks) >= 1)):
                values[f"{region}_energy"] = np.array(
                    [energy_share(a[i], inside[i]) for i in range(len(a))])
                values[f"{region}_pointing"] = np.array(
                    [pointing_hit(a[i], inside[i], tolerance) for i in range(len(a))])
        results[name] = {k: mean_std(v) for k, v in values.items()}
        results[name]["mean_deletion_curve"] = curves[name]["deletion"].mean(axis=0).tolist()
        results[name]["mean_insertion_curve"] = curves[name]["insertion"].mean(axis=0).tolist()
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
    """The Markdown report of :func:`evaluate_methods`: one metrics table and one sanity table.

    Args:
        metrics: its result (with "layer" when the caller added one).
        title: the page title.
        titles: display names of the methods (default: the keys).
    """
    names = {**REFERENCE_TITLES, **(titles or {})}
    lines = [f"# {title}", ""] + _method_notes(metrics) + _metrics_table(metrics, names)
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
            "- Time: wall seconds per cell after one warm-up call.", ""]


def _metrics_table(metrics: Dict[str, Any], names: Dict[str, str]) -> List[str]:
    loc = metrics["localisation_available"]
    head = "| method | deletion AUC ↓ | insertion AUC ↑ |"
    rule = "|---|---|---|"
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


def plot_curves(metrics: Dict[str, Any], titles: Optional[Dict[str, str]] = None):
    """The mean deletion and insertion curves of every method and reference map, as a Figure.

    Args:
        metrics: the result of :func:`evaluate_methods`.
        titles: display names of the methods.
    Returns:
        a matplotlib Figure (the caller saves it).
    """
    from matplotlib.figure import Figure

    names = {**REFERENCE_TITLES, **(titles or {})}
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    f = metrics["fractions"]
    for group, style in (("methods", "-"), ("reference", ":")):
        for name, r in metrics[group].items():
            for ax, key in zip(axes, ("mean_deletion_curve", "mean_insertion_curve")):
                ax.plot(f, r[key], style, label=names.get(name, name))
    for ax, t in zip(axes, ("Deletion (lower area is better)", "Insertion (higher area is better)")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("fraction of pixels removed / revealed")
        ax.set_ylabel("predicted-class probability")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return fig
