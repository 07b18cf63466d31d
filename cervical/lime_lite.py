"""LIME for images on SLIC superpixels, in NumPy: exact, deterministic, batched.

LIME (Ribeiro, Singh & Guestrin, "Why should I trust you?", KDD 2016) explains one prediction
f(x) of a black-box classifier with a weighted linear model fitted on random perturbations of x:

1. Segment the image into M superpixels (SLIC; Achanta et al., TPAMI 2012).
2. Draw a binary matrix Z in {0,1}^(N x M), Z_ij ~ Bernoulli(1/2), row 0 = all ones (x itself).
   Row z is the image in which every superpixel j with z_j = 0 is "switched off": its pixels are
   replaced by a hide colour (the superpixel's own mean colour by default).
3. Query the model on the N perturbed images: y_i = f(image(z_i))[class].
4. Weight each row by its closeness to x (paper eq. 1, kernel of the reference implementation):
       d(z)  = cosine distance(z, 1_M) = 1 - |z|_1 / sqrt(|z|_1 * M) = 1 - sqrt(|z|_1 / M)
       pi(z) = exp(-d(z)^2 / (2 w^2)),   w = kernel_width (0.25)
5. Fit the surrogate g(z) = b + beta . z by weighted ridge regression (paper eq. 2 with a ridge
   penalty, as the reference ``lime`` package does with ``Ridge(alpha=1)``):
       (beta, b) = argmin  sum_i pi_i (y_i - b - beta . z_i)^2 + alpha |beta|^2
   beta_j is the explanation: how much switching superpixel j on adds to the class score.

Compared with the ``lime`` package (marcotcr/lime) this module fixes its known traps: the sampler is
seeded (``lime`` seeds only the segmenter), SLIC labels are made contiguous 0..M-1 (with
``start_label=1`` one superpixel is never perturbed), predictions run in large balanced batches
(``lime`` defaults to batches of 10), and the ridge is solved in closed form.

Typical use with any Keras model or callable returning (N, K) probabilities::

    from cervical.lime_lite import explain
    exp = explain(model, image, num_samples=1000, seed=0)
    exp.top_features(5)                      # superpixel ids, strongest first
    rgb = exp.render(5, mode="pros_cons")    # green = for the class, red = against

A check by hand (``python -m doctest lime_lite.py`` on this file alone): four horizontal bands as
superpixels, and a "model" whose class-1 score is the visible share of band 0. Only band 0
matters, so its weight is about 1 (ridge shrinks it a little) and the others about 0:

>>> import numpy as np
>>> image = np.ones((8, 8, 3))
>>> bands = np.repeat(np.arange(4), 16).reshape(8, 8)
>>> def predict(batch):
...     p1 = batch[:, :2].mean(axis=(1, 2, 3))          # rows 0-1 are band 0
...     return np.stack([1 - p1, p1], axis=1)
>>> exp = explain(predict, image, class_index=1, segments=bands, hide_color=0.0, num_samples=200)
>>> round(float(exp.weights[0]), 1), bool(np.abs(exp.weights[1:]).max() < 0.05)
(1.0, True)

This module imports nothing from the rest of ``cervical`` and never imports TensorFlow: a Keras
model is recognised by its ``predict_on_batch`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "LimeError",
    "Explanation",
    "explain",
    "segment",
    "fudged_image",
    "sample_masks",
    "perturb",
    "cosine_distance_to_ones",
    "kernel_weights",
    "fit_surrogate",
    "weighted_r2",
]

HideColor = Union[str, float, Sequence[float]]
#: ``progress(step, done, total)``: told how many perturbed images have been predicted.
Progress = Optional[Callable[[str, int, int], None]]


class LimeError(ValueError):
    """Invalid argument or input for a LIME step (one-line message naming the argument and the fix)."""


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _unit_range(image: np.ndarray) -> np.ndarray:
    """Map an image to float64 in [0, 1] for segmentation and display.

    uint8 images are divided by 255; float images already inside [0, 1] are kept; anything else
    (e.g. 0..255 floats or a [-1, 1] preprocessed input) is min-max scaled globally (all channels
    together, so hues are preserved up to an offset).

    Args:
        image: (H, W, C) array.

    Returns:
        (H, W, C) float64 array in [0, 1].
    """
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    x = image.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return x
    if hi - lo <= 0.0:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _check_image(image: Any) -> np.ndarray:
    """Validate one (H, W, C) image and return it as an array.

    Raises:
        LimeError: if the image is not 3-D with at least one channel, or not finite.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 1 or image.shape[0] < 2 or image.shape[1] < 2:
        raise LimeError(
            f"image: expected one (H, W, C) image, got shape {image.shape}; "
            "pass a single image without the batch axis"
        )
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise LimeError(f"image: dtype {image.dtype} is not numeric; pass uint8 or float pixels")
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        raise LimeError("image: contains NaN or inf; clean the image before explaining it")
    return image


def _contiguous(labels: np.ndarray) -> np.ndarray:
    """Relabel an integer label map to 0..M-1 in order of first label value (np.unique order)."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


# --------------------------------------------------------------------------------------------
# 1. Segmentation
# --------------------------------------------------------------------------------------------
def segment(
    image: np.ndarray,
    n_segments: int = 50,
    compactness: float = 10.0,
    sigma: float = 0.0,
) -> np.ndarray:
    """Split an image into superpixels with SLIC, labelled contiguously 0..M-1.

    SLIC (Achanta et al., TPAMI 2012) runs k-means in (L*a*b*, x, y) space from a regular grid of
    ``n_segments`` seeds, with distance D = sqrt(d_lab^2 + (d_xy / S)^2 * m^2), S the grid step and
    m = ``compactness``. It is deterministic (no random initialisation), so the same image always
    gives the same superpixels. Labels are remapped to 0..M-1 so that column j of the sample
    matrix Z is exactly superpixel j (the ``start_label=1`` trap of scikit-image >= 0.19 leaves
    label 0 empty and label M never perturbed in the reference ``lime``).

    Args:
        image: (H, W, C) image, uint8 or float in any range (scaled to [0, 1] for SLIC). With
            C = 3 SLIC works in L*a*b*; otherwise on the raw channels.
        n_segments: approximate number of superpixels (SLIC may return fewer or more).
        compactness: colour/space trade-off m; higher gives squarer superpixels.
        sigma: Gaussian pre-smoothing of SLIC (0 = none).

    Returns:
        (H, W) int64 label map with values exactly 0..M-1, every label present.

    Raises:
        LimeError: on a malformed image or non-positive ``n_segments`` / ``compactness``.
    """
    from skimage.segmentation import slic  # local: keeps `import lime_lite` light

    image = _check_image(image)
    if int(n_segments) < 1:
        raise LimeError(f"n_segments: must be >= 1, got {n_segments}; use e.g. 50")
    if not compactness > 0:
        raise LimeError(f"compactness: must be > 0, got {compactness}; use e.g. 10.0")
    x = _unit_range(image)
    labels = slic(
        x,
        n_segments=int(n_segments),
        compactness=float(compactness),
        sigma=float(sigma),
        convert2lab=x.shape[-1] == 3,
        start_label=0,
        channel_axis=-1,
    )
    return _contiguous(labels)


def _check_segments(segments: Any, shape: Tuple[int, int]) -> np.ndarray:
    """Validate user segments and relabel them 0..M-1.

    Raises:
        LimeError: if the label map does not match the image or is not integer.
    """
    segments = np.asarray(segments)
    if segments.shape != tuple(shape):
        raise LimeError(
            f"segments: shape {segments.shape} does not match the image's {tuple(shape)}; "
            "pass one (H, W) integer label per pixel"
        )
    if not np.issubdtype(segments.dtype, np.integer):
        raise LimeError(f"segments: dtype {segments.dtype} is not integer; pass integer labels")
    return _contiguous(segments)


# --------------------------------------------------------------------------------------------
# 2. Hide colour and perturbed images
# --------------------------------------------------------------------------------------------
def fudged_image(
    image: np.ndarray,
    segments: np.ndarray,
    hide_color: HideColor = "mean",
    blur_sigma: Optional[float] = None,
) -> np.ndarray:
    """Build the image whose pixels replace switched-off superpixels.

    - ``"mean"``: each superpixel filled with its own per-channel mean colour
      (the reference ``lime`` default, ``hide_color=None``): F(p) = mean_{q in S(p)} x(q).
    - ``"blur"``: a Gaussian blur of the image, sigma = ``blur_sigma`` or, by default, half the
      mean superpixel side, sqrt(H * W / M) / 2 (keeps the colour, removes the texture).
    - a number or a length-C sequence: that constant colour everywhere (in the image's units).

    Args:
        image: (H, W, C) image as the model takes it.
        segments: (H, W) labels 0..M-1.
        hide_color: "mean", "blur", a scalar, or one value per channel.
        blur_sigma: Gaussian sigma in pixels for ``"blur"``.

    Returns:
        (H, W, C) array with the dtype of ``image`` (rounded and clipped for integer images).

    Raises:
        LimeError: on an unknown ``hide_color`` or a colour of the wrong length.
    """
    image = _check_image(image)
    segments = np.asarray(segments)
    h, w, c = image.shape
    x = image.astype(np.float64)
    if isinstance(hide_color, str):
        if hide_color == "mean":
            m = int(segments.max()) + 1
            flat = segments.ravel()
            counts = np.bincount(flat, minlength=m).astype(np.float64)
            counts[counts == 0] = 1.0
            means = np.stack(
                [np.bincount(flat, weights=x[..., k].ravel(), minlength=m) for k in range(c)],
                axis=1,
            ) / counts[:, None]
            fudged = means[segments]
        elif hide_color == "blur":
            from skimage.filters import gaussian

            m = int(segments.max()) + 1
            s = float(blur_sigma) if blur_sigma is not None else 0.5 * np.sqrt(h * w / m)
            if not s > 0:
                raise LimeError(f"blur_sigma: must be > 0, got {blur_sigma}; use e.g. 3.0")
            fudged = gaussian(x, sigma=s, channel_axis=-1, preserve_range=True)
        else:
            raise LimeError(
                f"hide_color: unknown value {hide_color!r}; use 'mean', 'blur', a number or an RGB triple"
            )
    else:
        colour = np.asarray(hide_color, dtype=np.float64).reshape(-1)
        if colour.size not in (1, c) or not np.all(np.isfinite(colour)):
            raise LimeError(
                f"hide_color: expected one finite value or {c} (one per channel), got {hide_color!r}"
            )
        fudged = np.broadcast_to(colour, (h, w, c)).copy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        fudged = np.clip(np.rint(fudged), info.min, info.max)
    return fudged.astype(image.dtype)


def sample_masks(num_samples: int, num_features: int, seed: int) -> np.ndarray:
    """Draw the LIME sample matrix Z: Bernoulli(1/2) entries, row 0 all ones.

    Args:
        num_samples: N, rows (row 0 is the unperturbed image).
        num_features: M, superpixels.
        seed: seed of a ``numpy.random.default_rng`` (same seed, same Z).

    Returns:
        (N, M) uint8 matrix of 0/1.

    Raises:
        LimeError: if N < 2 or M < 1.
    """
    if int(num_samples) < 2:
        raise LimeError(f"num_samples: must be >= 2, got {num_samples}; use e.g. 1000")
    if int(num_features) < 1:
        raise LimeError(f"num_features: must be >= 1, got {num_features}")
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, size=(int(num_samples), int(num_features)), dtype=np.uint8)
    z[0, :] = 1
    return z


def perturb(
    image: np.ndarray, fudged: np.ndarray, segments: np.ndarray, samples: np.ndarray
) -> np.ndarray:
    """Build the perturbed images of a block of rows of Z, vectorised.

    With P = H * W pixels and a lookup table T = [fudged pixels; original pixels] of shape (2P, C),
        keep[i, p]  = Z[i, segments[p]]            (one fancy-index lookup per block)
        out[i, p]   = T[keep[i, p] * P + p]        (= image[p] if kept, fudged[p] if switched off)
    a single gather, with no Python loop over superpixels or pixels.

    Args:
        image: (H, W, C) original image.
        fudged: (H, W, C) replacement image (see ``fudged_image``).
        segments: (H, W) labels 0..M-1.
        samples: (B, M) 0/1 rows of Z.

    Returns:
        (B, H, W, C) array (dtype of ``image`` when ``fudged`` has the same dtype).
    """
    h, w, c = image.shape
    p = h * w
    table = np.ascontiguousarray(np.concatenate([fudged.reshape(p, c), image.reshape(p, c)]))
    # One pixel (C values) as one opaque item, so the gather copies whole pixels at once.
    pixels = table.view(np.dtype((np.void, table.dtype.itemsize * c))).reshape(2 * p)
    keep = np.asarray(samples)[:, np.asarray(segments).ravel()] != 0  # (B, P)
    pixel = np.arange(p, dtype=np.int32 if 2 * p < 2 ** 31 else np.int64)
    index = np.where(keep, pixel + p, pixel)
    out = np.take(pixels, index)  # (B, P) opaque pixels
    return out.view(table.dtype).reshape((keep.shape[0], h, w, c))


# --------------------------------------------------------------------------------------------
# 3. Model queries
# --------------------------------------------------------------------------------------------
def _call_model(predict: Any, batch: np.ndarray) -> np.ndarray:
    """Run the model on one batch; Keras models via ``predict_on_batch`` (compiled, no TF import)."""
    out = predict.predict_on_batch(batch) if hasattr(predict, "predict_on_batch") else predict(batch)
    if hasattr(out, "numpy"):
        out = out.numpy()
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise LimeError(
            f"predict: returned shape {out.shape} for a batch of {batch.shape[0]} images; "
            "it must map (N, H, W, C) images to (N, K) class scores"
        )
    return out


def _batch_bounds(n: int, batch_size: int) -> list:
    """Split n rows into ceil(n / batch_size) balanced batches (sizes differ by at most one)."""
    n_batches = -(-n // batch_size)
    edges = np.linspace(0, n, n_batches + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def _predict_samples(
    predict: Any,
    image: np.ndarray,
    fudged: np.ndarray,
    segments: np.ndarray,
    samples: np.ndarray,
    batch_size: int,
    progress: Progress,
) -> np.ndarray:
    """Predict f(image(z)) for every row of Z in balanced batches (equal shapes avoid retracing).

    Returns:
        (N, K) float64 model outputs.
    """
    n = samples.shape[0]
    bounds = _batch_bounds(n, batch_size)
    full = max(stop - start for start, stop in bounds)
    outputs = []
    for start, stop in bounds:
        rows = samples[start:stop]
        pad = full - (stop - start)
        if pad:  # repeat the last row so every call sees the same batch shape
            rows = np.concatenate([rows, np.repeat(rows[-1:], pad, axis=0)])
        out = _call_model(predict, perturb(image, fudged, segments, rows))
        outputs.append(out[: stop - start])
        if progress is not None:
            progress("lime samples", stop, n)
    widths = {o.shape[1] for o in outputs}
    if len(widths) != 1:
        raise LimeError("predict: returned a different number of classes between batches")
    return np.concatenate(outputs, axis=0)


# --------------------------------------------------------------------------------------------
# 4. Kernel
# --------------------------------------------------------------------------------------------
def cosine_distance_to_ones(samples: np.ndarray) -> np.ndarray:
    """Cosine distance of each 0/1 row z to the all-ones row 1_M.

    d(z) = 1 - (z . 1) / (|z|_2 |1|_2) = 1 - |z|_1 / sqrt(|z|_1 M) = 1 - sqrt(|z|_1 / M);
    the all-zero row gets d = 1 (similarity 0), as scikit-learn's ``cosine_distances`` does.

    Args:
        samples: (N, M) binary matrix Z.

    Returns:
        (N,) float64 distances in [0, 1].
    """
    z = np.asarray(samples, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise LimeError(f"samples: expected an (N, M) matrix, got shape {z.shape}")
    return 1.0 - np.sqrt(z.sum(axis=1) / z.shape[1])


def kernel_weights(samples: np.ndarray, kernel_width: float = 0.25) -> np.ndarray:
    """LIME's exponential kernel on the cosine distance to the original image.

    pi(z) = sqrt(exp(-d(z)^2 / w^2)) = exp(-d(z)^2 / (2 w^2)),   w = ``kernel_width``
    (Ribeiro et al. 2016, eq. 1 and section 3.3; the ``lime`` image explainer's definition).

    Args:
        samples: (N, M) binary matrix Z.
        kernel_width: w > 0 (0.25 in ``lime``).

    Returns:
        (N,) float64 weights in (0, 1]; the all-ones row has weight 1.

    Raises:
        LimeError: if ``kernel_width`` is not positive.
    """
    if not kernel_width > 0:
        raise LimeError(f"kernel_width: must be > 0, got {kernel_width}; use e.g. 0.25")
    d = cosine_distance_to_ones(samples)
    return np.exp(-(d ** 2) / (2.0 * float(kernel_width) ** 2))


# --------------------------------------------------------------------------------------------
# 5. Surrogate
# --------------------------------------------------------------------------------------------
def weighted_r2(targets: np.ndarray, fitted: np.ndarray, weights: np.ndarray) -> float:
    """Weighted coefficient of determination.

    R^2 = 1 - sum_i pi_i (y_i - yhat_i)^2 / sum_i pi_i (y_i - ybar)^2,  ybar = sum pi y / sum pi.
    A constant target gives 1.0 if it is fitted exactly and 0.0 otherwise (scikit-learn's
    ``r2_score`` convention).

    Args:
        targets: (N,) y.
        fitted: (N,) surrogate predictions.
        weights: (N,) sample weights pi.

    Returns:
        The weighted R^2 as a float.
    """
    y = np.asarray(targets, dtype=np.float64)
    f = np.asarray(fitted, dtype=np.float64)
    pi = np.asarray(weights, dtype=np.float64)
    ybar = np.sum(pi * y) / np.sum(pi)
    num = float(np.sum(pi * (y - f) ** 2))
    den = float(np.sum(pi * (y - ybar) ** 2))
    if den == 0.0:
        return 1.0 if num == 0.0 else 0.0
    return 1.0 - num / den


def _weighted_ridge(
    x: np.ndarray, y: np.ndarray, pi: np.ndarray, alpha: float
) -> Tuple[np.ndarray, float]:
    """Weighted ridge with an unpenalised intercept, closed form (normal equations).

    Centre by the weighted means xbar = sum pi x / sum pi, ybar likewise; with
    Xs = sqrt(pi) (X - xbar) and ys = sqrt(pi) (y - ybar):
        beta = (Xs^T Xs + alpha I)^-1 Xs^T ys,      b = ybar - xbar . beta
    (the system scikit-learn's Ridge solves with its Cholesky solver). Only an M x M system is
    factorised (M = superpixels, ~50): no SVD of the tall N x M matrix, whose multithreaded
    LAPACK call took 0.3-3 s instead of ~1 ms on a loaded 2-core machine. For alpha = 0 the
    pseudo-inverse is used (eigen-decomposition of the Gram matrix), giving the minimum-norm
    beta on rank-deficient Z.
    """
    xbar = pi @ x / pi.sum()
    ybar = float(pi @ y / pi.sum())
    r = np.sqrt(pi)
    xs = (x - xbar) * r[:, None]
    ys = (y - ybar) * r
    gram = xs.T @ xs
    rhs = xs.T @ ys
    if alpha > 0:
        beta = np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), rhs)
    else:
        lam, vec = np.linalg.eigh(gram)
        usable = lam > lam.max(initial=0.0) * gram.shape[0] * np.finfo(np.float64).eps * 10
        inv = np.divide(1.0, lam, out=np.zeros_like(lam), where=usable)
        beta = vec @ (inv * (vec.T @ rhs))
    return beta, ybar - float(xbar @ beta)


def fit_surrogate(
    samples: np.ndarray,
    targets: np.ndarray,
    kernel_width: float = 0.25,
    alpha: float = 1.0,
) -> Tuple[np.ndarray, float, float, float]:
    """Fit LIME's local linear surrogate on (Z, y) with the cosine kernel, in closed form.

    minimise over (beta, b):  sum_i pi(z_i) (y_i - b - beta . z_i)^2 + alpha |beta|_2^2
    with pi from ``kernel_weights`` (Ribeiro et al. 2016, eq. 2; equal to the reference
    ``lime``'s ``Ridge(alpha=1, fit_intercept=True).fit(Z, y, sample_weight=pi)`` with feature
    selection "none").

    Args:
        samples: (N, M) binary matrix Z (row 0 conventionally all ones).
        targets: (N,) model scores y for the explained class.
        kernel_width: w of the kernel.
        alpha: ridge penalty (>= 0, not applied to the intercept).

    Returns:
        (weights, intercept, score, local_pred): weights (M,) = beta; intercept b; score = the
        pi-weighted R^2 on the same samples; local_pred = b + sum_j beta_j, the surrogate at z = 1_M.
        Exactly constant targets give the exact answer beta = 0, b = y_0, score = 1.

    Raises:
        LimeError: on mismatched shapes, non-finite targets or negative ``alpha``.
    """
    z = np.asarray(samples, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise LimeError(f"samples: expected an (N, M) matrix with N >= 2, got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise LimeError(
            f"targets: expected shape ({z.shape[0]},) to match samples, got {y.shape}"
        )
    if not np.all(np.isfinite(y)):
        raise LimeError("targets: contain NaN or inf; check the model's outputs")
    if not alpha >= 0:
        raise LimeError(f"alpha: must be >= 0, got {alpha}; use 1.0 as in lime")
    pi = kernel_weights(z, kernel_width)
    if np.all(y == y[0]):
        # A flat model (e.g. an untrained net that outputs 1/K for every image): the exact
        # solution is beta = 0, b = y; centring would only turn round-off into fake weights.
        return np.zeros(z.shape[1]), float(y[0]), 1.0, float(y[0])
    beta, b = _weighted_ridge(z, y, pi, float(alpha))
    score = weighted_r2(y, z @ beta + b, pi)
    local_pred = b + float(beta.sum())
    return beta, float(b), float(score), float(local_pred)


# --------------------------------------------------------------------------------------------
# Explanation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Explanation:
    """One LIME explanation and everything needed to reproduce or re-fit it.

    Attributes:
        image: (H, W, C) explained image, as given.
        segments: (H, W) int64 superpixel labels 0..M-1.
        weights: (M,) surrogate coefficients beta for ``class_index``.
        intercept: surrogate intercept b.
        score: kernel-weighted R^2 of the surrogate.
        local_pred: surrogate prediction at the original image, b + sum(beta).
        class_index: explained class.
        samples: (N, M) uint8 sample matrix Z (row 0 = all ones).
        predictions: (N, K) model outputs on the perturbed images.
        kernel_width: kernel width w used for the fit.
        alpha: ridge penalty used for the fit.
    """

    image: np.ndarray
    segments: np.ndarray
    weights: np.ndarray
    intercept: float
    score: float
    local_pred: float
    class_index: int
    samples: np.ndarray
    predictions: np.ndarray
    kernel_width: float = 0.25
    alpha: float = 1.0

    @property
    def num_features(self) -> int:
        """M, the number of superpixels."""
        return int(self.weights.shape[0])

    def refit(self, class_index: int) -> "Explanation":
        """Explain another class from the same samples, without querying the model again.

        Args:
            class_index: column of ``predictions`` to explain.

        Returns:
            A new ``Explanation`` for that class.

        Raises:
            LimeError: if ``class_index`` is out of range.
        """
        k = self.predictions.shape[1]
        if not 0 <= int(class_index) < k:
            raise LimeError(f"class_index: {class_index} is out of range for {k} classes")
        w, b, r2, lp = fit_surrogate(
            self.samples, self.predictions[:, int(class_index)], self.kernel_width, self.alpha
        )
        return Explanation(self.image, self.segments, w, b, r2, lp, int(class_index),
                           self.samples, self.predictions, self.kernel_width, self.alpha)

    def top_features(self, k: int = 5, positive_only: bool = True,
                     min_weight: float = 0.0) -> np.ndarray:
        """Superpixel ids of the strongest weights, strongest first.

        Order is by |beta_j| descending (ties by id), as ``lime``'s ``local_exp``.
        ``positive_only``: the first k with beta_j > max(0, min_weight) (the "pros");
        otherwise the first k with |beta_j| >= min_weight, pros and cons together.

        Args:
            k: at most this many superpixels (fewer if not enough qualify).
            positive_only: keep only superpixels that support the class.
            min_weight: drop superpixels weaker than this (compare explanations by a weight
                threshold rather than a fixed k).

        Returns:
            (<= k,) int64 array of superpixel ids.

        Raises:
            LimeError: if ``k`` is negative.
        """
        if int(k) < 0:
            raise LimeError(f"k: must be >= 0, got {k}")
        order = np.argsort(-np.abs(self.weights), kind="stable")
        w = self.weights[order]
        if positive_only:
            keep = (w > 0) & (w > min_weight)
        else:
            keep = np.abs(w) >= min_weight
        return order[keep][: int(k)].astype(np.int64)

    def mask(self, k: int = 5, positive_only: bool = True, min_weight: float = 0.0) -> np.ndarray:
        """Pixel mask of the top superpixels: +1 where beta > 0, -1 where beta < 0, 0 elsewhere.

        Args:
            k: number of superpixels (see ``top_features``).
            positive_only: only the superpixels supporting the class.
            min_weight: minimum |beta|.

        Returns:
            (H, W) int8 mask.
        """
        chosen = self.top_features(k, positive_only, min_weight)
        per_feature = np.zeros(self.num_features, dtype=np.int8)
        per_feature[chosen] = np.sign(self.weights[chosen]).astype(np.int8)
        return per_feature[self.segments]

    def render(self, k: int = 5, mode: str = "positive", hide_rest: bool = False,
               min_weight: float = 0.0, boundaries: str = "selected",
               boundary_color: Tuple[float, float, float] = (1.0, 1.0, 0.0)) -> np.ndarray:
        """RGB picture of the explanation, as in LIME figures (thesis Fig. 3.10).

        The image is shown in [0, 1]; superpixels for the class get their green channel set to
        1 (pros), those against it their red channel set to 1 (cons, ``mode="pros_cons"``);
        ``hide_rest`` paints every other pixel black. Boundaries (scikit-image
        ``mark_boundaries``, mode "inner") are drawn around the selected superpixels, around
        all superpixels (``"all"``), or not at all (``"none"``).

        Args:
            k: number of superpixels shown.
            mode: "positive" (top k pros) or "pros_cons" (top k by |beta|, both signs).
            hide_rest: black out the unselected superpixels.
            min_weight: minimum |beta| shown.
            boundaries: "selected", "all" or "none".
            boundary_color: RGB in [0, 1] of the boundary lines.

        Returns:
            (H, W, 3) float64 RGB image in [0, 1].

        Raises:
            LimeError: on an unknown ``mode`` or ``boundaries``.
        """
        if mode not in ("positive", "pros_cons"):
            raise LimeError(f"mode: unknown value {mode!r}; use 'positive' or 'pros_cons'")
        if boundaries not in ("selected", "all", "none"):
            raise LimeError(f"boundaries: unknown value {boundaries!r}; use 'selected', 'all' or 'none'")
        m = self.mask(k, positive_only=(mode == "positive"), min_weight=min_weight)
        rgb = _unit_range(np.asarray(self.image))
        if rgb.shape[-1] == 1:
            rgb = np.repeat(rgb, 3, axis=-1)
        elif rgb.shape[-1] != 3:
            rgb = rgb[..., :3] if rgb.shape[-1] > 3 else np.repeat(rgb[..., :1], 3, axis=-1)
        out = rgb.copy()
        if hide_rest:
            out[m == 0] = 0.0
        out[m > 0, 1] = 1.0
        out[m < 0, 0] = 1.0
        if boundaries != "none":
            from skimage.segmentation import mark_boundaries

            labels = self.segments + 1 if boundaries == "all" else np.where(m != 0, self.segments + 1, 0)
            out = mark_boundaries(out, labels, color=boundary_color, mode="inner")
        return np.clip(out, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------
def explain(
    predict: Any,
    image: np.ndarray,
    class_index: Optional[int] = None,
    num_samples: int = 1000,
    n_segments: int = 50,
    compactness: float = 10.0,
    hide_color: HideColor = "mean",
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    segments: Optional[np.ndarray] = None,
    blur_sigma: Optional[float] = None,
    progress: Progress = None,
) -> Explanation:
    """Explain one prediction with LIME on superpixels (Ribeiro et al., KDD 2016).

    Steps: SLIC superpixels (or ``segments``) -> Z ~ Bernoulli(1/2)^(N x M) with row 0 = 1 ->
    perturbed images (off superpixels take ``hide_color``) -> y = f(images)[:, class] in batches
    -> pi = exp(-d^2 / (2 w^2)) on the cosine distance to 1_M -> weighted ridge (closed form).

    Args:
        predict: a Keras model (called with ``predict_on_batch``) or any callable mapping an
            (N, H, W, C) array to (N, K) class probabilities/scores.
        image: one (H, W, C) image exactly as the model takes it (preprocessed).
        class_index: class to explain; None = the class predicted for ``image``.
        num_samples: N, perturbed images (row 0 is the image itself).
        n_segments: SLIC's approximate number of superpixels.
        compactness: SLIC compactness.
        hide_color: "mean" (each superpixel's mean colour), "blur" or a constant colour.
        kernel_width: kernel width w.
        alpha: ridge penalty (1.0 as the reference ``lime``).
        seed: seed of the sampler (SLIC is deterministic); same seed, same explanation.
        batch_size: largest model batch; batches are balanced so all have the same shape.
        segments: optional (H, W) integer superpixel labels to use instead of SLIC.
        blur_sigma: Gaussian sigma for ``hide_color="blur"``.
        progress: None (quiet) or ``progress(step, done, total)`` after every model batch.

    Returns:
        An ``Explanation``.

    Raises:
        LimeError: on invalid arguments, fewer than 2 superpixels, or a malformed model output.
    """
    image = _check_image(image)
    if int(batch_size) < 1:
        raise LimeError(f"batch_size: must be >= 1, got {batch_size}; use e.g. 256")
    if segments is None:
        segments = segment(image, n_segments=n_segments, compactness=compactness)
    else:
        segments = _check_segments(segments, image.shape[:2])
    m = int(segments.max()) + 1
    if m < 2:
        raise LimeError(
            f"n_segments: the image gave {m} superpixel; raise n_segments or lower compactness"
        )
    z = sample_masks(num_samples, m, seed)
    fudged = fudged_image(image, segments, hide_color, blur_sigma)
    preds = _predict_samples(predict, image, fudged, segments, z, int(batch_size), progress)
    if not np.all(np.isfinite(preds)):
        raise LimeError("predict: returned NaN or inf; check the model and the image scaling")
    k = preds.shape[1]
    if class_index is None:
        class_index = int(np.argmax(preds[0]))
    elif not 0 <= int(class_index) < k:
        raise LimeError(f"class_index: {class_index} is out of range for {k} classes")
    w, b, r2, lp = fit_surrogate(z, preds[:, int(class_index)], kernel_width, alpha)
    return Explanation(image, segments, w, b, r2, lp, int(class_index), z, preds,
                       float(kernel_width), float(alpha))
