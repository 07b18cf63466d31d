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

This module imports only NumPy at import time; Keras is imported inside :func:`weighted_layers` and the
randomisation check, and scikit-image inside :func:`blur_baseline`.
"""

from __future__ import annotations

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
    "summarize",
    "timed",
]

#: Number of 5 % steps of the deletion and insertion curves (21 points including 0 % and 100 %).
STEPS = 20

Baseline = Union[str, float, np.ndarray]
Progress = Optional[Callable[..., None]]


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


def weighted_layers(model: Any) -> List[Tuple[str, Any]]:
    """Layers that hold floating-point weights, in forward order, nested models expanded in place.

    Preprocessing layers (``Normalization`` and the like: statistics of the data, not learned
    parameters) are left out. Each layer appears once even when shared.

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
            if id(layer) in seen or "preprocessing" in type(layer).__module__:
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
        progress: optional callable(done, total, note).

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
            stats = summarize(sims)
            steps.append({"randomised": [top_down[i][0] for i in group],
                          "n_randomised": int(group[-1] + 1),
                          "similarity": stats["mean"], "std": stats["std"],
                          "per_image": [None if np.isnan(s) else float(s) for s in sims]})
            if progress is not None:
                progress(j + 1, len(groups), "randomisation")
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
def summarize(values: Sequence[float]) -> Dict[str, Any]:
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
