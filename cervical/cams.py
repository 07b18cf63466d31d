"""Class activation maps (CAMs): Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM, Faster-Score-CAM.

One template serves every method (the design of pytorch-grad-cam's ``BaseCAM``):

1. one forward pass (plus one backward pass for the gradient methods) records, for a target layer,
   the activations ``A`` of shape (B, h, w, K) and the gradients ``G = dy^c / dA`` of the pre-softmax
   score ``y^c`` of the target class, with ``tf.GradientTape``;
2. a few lines of NumPy turn (A, G) into channel weights ``W`` (per method);
3. the map is ``ReLU(sum_k W_k * A^k)``, resized bilinearly to the input size and min-max normalised
   per image.

The framework is confined to step 1; the maths of steps 2 and 3 is NumPy, readable next to the
papers. This file imports nothing from the rest of the ``cervical`` package: copy it into a lesson and
use it on any Keras 3 model::

    import keras, numpy as np
    from cams import gradcam, find_target_layer, overlay
    model = keras.applications.MobileNetV2(weights="imagenet")
    x = keras.applications.mobilenet_v2.preprocess_input(np.float32(images))  # your model's inputs
    maps = gradcam(model, x)                      # (B, 224, 224) in [0, 1], predicted classes
    rgb = overlay(images[0], maps[0])             # uint8 heat-map overlay for a figure

A check by hand (this file copied alone next to a notebook runs it: ``python -m doctest cams.py``).
One feature channel equal to the image, global average pooling and a linear layer: the logit of
class 0 is the mean pixel, so dy^0/dA = 1/16 everywhere, the Grad-CAM weight is 1/16 and the map
is the image itself, min-max normalised; class 1's weight is negative, so its map is all zero:

>>> import numpy as np, keras
>>> inp = keras.Input((4, 4, 1))
>>> feat = keras.layers.Conv2D(1, 1, use_bias=False, name="feat")(inp)
>>> out = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(feat))
>>> model = keras.Model(inp, out)
>>> model.get_layer("feat").set_weights([np.ones((1, 1, 1, 1), np.float32)])
>>> model.layers[-1].set_weights([np.array([[1.0, -1.0]], np.float32), np.zeros(2, np.float32)])
>>> x = np.zeros((1, 4, 4, 1), np.float32); x[0, 1, 2, 0] = 1.0     # one bright pixel
>>> gradcam(model, x, class_index=0, layer="feat")[0].tolist()
[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
>>> float(gradcam(model, x, class_index=1, layer="feat").max())
0.0

Reading order of this file: the equations of each method's channel weights, the NumPy
post-processing, the template and the public functions, figures; the Keras plumbing (reading a
model, tapping a layer) comes last.

How the model is read (no model surgery, no "Graph disconnected")
    Instead of building a new ``keras.Model`` from inner tensors (what fails for a backbone nested as a
    layer, tf-keras-vis #71, #63, #48), the target layer and the final softmax/sigmoid are *tapped*:
    for the duration of a call their ``call``/``activation`` attribute is wrapped by a function that
    records the tensor and returns it unchanged, so the model computes exactly what it always computes.
    The recorded activations are watched by the tape, hence the backbone may be frozen, nested at any
    depth, a ``Sequential`` or a plain functional model. Because a tap briefly wraps attributes of the
    model's layers, do not run the same model in another thread while a CAM is being computed.

Layer names
    ``layer`` is a layer name searched recursively, in the model's own layers and inside nested models;
    the shallowest match wins. Any layer can also be addressed by a path of names joined by "/" from the
    outer model, e.g. ``"mobilenetv2_1.00_110/out_relu"`` (Keras 3 forbids "/" in layer names, so a path
    is never ambiguous); a name that occurs twice at the same depth must be given as a path. The name
    of a nested model itself is a valid target: its output feature map. :func:`find_target_layer`
    returns a plain name when it is unique, else such a path.

Scores
    Gradient methods differentiate the *logit* of the target class (the input of the final softmax,
    whether the softmax is the activation of the last layer or a separate ``Activation``/``Softmax``
    layer); Score-CAM weighs channels by the softmax *probability* of the target class on masked inputs
    (sigmoid when the model has one output unit, or when the output activation is a sigmoid).

Post-processing (the study toolkit's order)
    ReLU at the feature resolution -> corner-aligned bilinear resize to the input size (the convention
    of ``scipy.ndimage.zoom(order=1)`` in tf-keras-vis; ``upsample=False`` skips it) -> min-max
    normalisation per image with a relative epsilon: a constant map becomes zeros, never NaN.

Speed
    The recorded forward (and forward-backward) passes are compiled once per (model, layer, input
    shape) with ``tf.function`` and cached in a weak-keyed dictionary (:func:`clear_cache` empties it);
    the cache keeps no model alive. Images are processed in chunks of ``batch_size`` so memory stays
    bounded, and Score-CAM streams its masked inputs in chunks of ``batch_size``.

References
    Selvaraju et al., "Grad-CAM: Visual explanations from deep networks via gradient-based
    localization", ICCV 2017.
    Chattopadhay et al., "Grad-CAM++: Generalized gradient-based visual explanations for deep
    convolutional networks", WACV 2018.
    Jiang et al., "LayerCAM: Exploring hierarchical class activation maps for localization",
    IEEE TIP 30, 2021.
    Wang et al., "Score-CAM: Score-weighted visual explanations for convolutional neural networks",
    CVPR Workshops 2020.
    Faster-Score-CAM: the channel selection of the tf-keras-vis toolkit (keisen/tf-keras-vis PR #20).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "CamError",
    "gradcam_weights",
    "gradcam_plus_plus_weights",
    "layercam_weights",
    "gradcam",
    "gradcam_plus_plus",
    "layercam",
    "scorecam",
    "faster_scorecam",
    "compute",
    "find_target_layer",
    "feature_map_layers",
    "resolve_layer",
    "canonical_method",
    "TITLES",
    "overlay",
    "resize_bilinear",
    "minmax_normalize",
    "clear_cache",
    "METHODS",
]

ClassIndex = Union[None, int, Sequence[int], np.ndarray]

#: Relative epsilon of the min-max normalisation (see :func:`minmax_normalize`).
EPS = 1e-7


class CamError(ValueError):
    """A CAM could not be computed from the given arguments (the message names the argument)."""


# ---------------------------------------------------------------------------------------------
# Per-method channel weights (NumPy). A: activations (B, h, w, K); G: dy^c/dA, same shape.
# ---------------------------------------------------------------------------------------------


def gradcam_weights(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM weights (Selvaraju et al. 2017, eq. 1): w_k = (1 / hw) sum_ij dy^c / dA^k_ij.

    Args:
        activations: A, shape (B, h, w, K) (unused; kept for the common signature).
        grads: G = dy^c/dA, shape (B, h, w, K).

    Returns:
        weights of shape (B, 1, 1, K).
    """
    del activations
    return grads.mean(axis=(1, 2), keepdims=True)


def layercam_weights(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """LayerCAM weights (Jiang et al. 2021, eq. 5): one weight per position, w_kij = ReLU(dy^c/dA^k_ij).

    With these weights the template gives map = ReLU(sum_k ReLU(G^k) * A^k); it equals Grad-CAM when the
    gradients are spatially constant and positive.

    Args:
        activations: A, shape (B, h, w, K) (unused).
        grads: G, shape (B, h, w, K).

    Returns:
        weights of shape (B, h, w, K).
    """
    del activations
    return np.maximum(grads, 0.0)


def gradcam_plus_plus_weights(activations: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ weights, closed form for an exponential score (Chattopadhay et al. 2018, eq. 19).

    As the study's toolkit (tf-keras-vis) computes it, with E = exp(y^c):
        D1 = E G,  D2 = E G^2,  D3 = E G^3,  S_k = sum_ij A^k_ij
        alpha_kij = D2 / (2 D2 + D3 S_k)     (alpha = 0 where D2 = 0)
        alpha_kij <- alpha_kij / sum_ij alpha_kij   (per-channel normalisation; kept when the sum is 0)
        w_k = sum_ij ReLU(D1_kij) alpha_kij
    E cancels in alpha and scales every w_k of an image by the same positive constant, which the final
    min-max normalisation removes; it is therefore left out (E = 1), which also avoids overflow of
    exp(y^c) for large logits. A denominator 2 D2 + D3 S_k = 0 (G S_k = -2) gives alpha = 0 instead of
    the toolkit's inf. pytorch-grad-cam omits the per-channel normalisation of alpha.

    Args:
        activations: A, shape (B, h, w, K).
        grads: G = dy^c/dA with y^c the logit, shape (B, h, w, K).

    Returns:
        weights of shape (B, 1, 1, K).
    """
    g2 = grads**2
    g3 = g2 * grads
    channel_sum = activations.sum(axis=(1, 2), keepdims=True)
    denom = 2.0 * g2 + g3 * channel_sum
    denom = denom + (g2 == 0.0)
    alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0.0)
    alpha_sum = alpha.sum(axis=(1, 2), keepdims=True)
    alpha = alpha / (alpha_sum + (alpha_sum == 0.0))
    return np.sum(np.maximum(grads, 0.0) * alpha, axis=(1, 2), keepdims=True)


# ---------------------------------------------------------------------------------------------
# NumPy post-processing: bilinear resize and min-max normalisation
# ---------------------------------------------------------------------------------------------


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix R (n_out, n_in), corner-aligned: out = R @ in.

    Output sample i sits at input coordinate s_i = i * (n_in - 1) / (n_out - 1), so the first and last
    samples coincide with the first and last input samples ("align_corners=True", the convention of
    ``scipy.ndimage.zoom(order=1)`` used by tf-keras-vis). Row i holds (1 - f) at floor(s_i) and f at
    floor(s_i) + 1, with f = s_i - floor(s_i).
    """
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    if n_in == 1 or n_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
    lo = np.minimum(np.floor(src).astype(int), n_in - 2)
    frac = src - lo
    rows = np.arange(n_out)
    matrix[rows, lo] = 1.0 - frac
    matrix[rows, lo + 1] += frac
    return matrix


def resize_bilinear(maps: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize maps (..., h, w) to (..., H, W) by corner-aligned bilinear interpolation.

    Bilinear interpolation is separable: ``out = R_H @ map @ R_W^T`` with the linear-interpolation
    matrices R_H (H, h) and R_W (W, w) of :func:`_interpolation_matrix`. Every output value is a convex
    combination of input values, so the range never grows.

    Args:
        maps: array of shape (..., h, w).
        size: target (H, W), both >= 1.

    Returns:
        float64 array of shape (..., H, W).

    Raises:
        CamError: if ``maps`` has fewer than 2 dimensions or ``size`` is not two positive integers.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise CamError(f"maps must have at least 2 dimensions (..., h, w); got shape {maps.shape}")
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise CamError(f"size must be two positive integers (H, W); got {size!r}")
    r_h = _interpolation_matrix(int(size[0]), maps.shape[-2])
    r_w = _interpolation_matrix(int(size[1]), maps.shape[-1])
    return np.einsum("Hh,...hw,Ww->...HW", r_h, maps, r_w, optimize=True)


def minmax_normalize(maps: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Min-max normalise each map (..., h, w) to [0, 1]; constant maps become zeros, never NaN.

    out = (m - min m) / (max m - min m), computed per map over its last two axes. A map whose range
    is at most ``eps * max(|min m|, |max m|)`` is treated as constant and returned as zeros. The
    epsilon is relative, so the result does not depend on the (arbitrary) scale of a CAM; it differs
    from the toolkits' (m - min) / (max - min + 1e-7) by at most ~1e-7 relative on non-constant maps.

    Args:
        maps: array of shape (..., h, w).
        eps: relative tolerance below which a map counts as constant.

    Returns:
        float64 array of the same shape with values in [0, 1].

    Raises:
        CamError: if ``maps`` has fewer than 2 dimensions.
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise CamError(f"maps must have at least 2 dimensions (..., h, w); got shape {maps.shape}")
    lo = maps.min(axis=(-2, -1), keepdims=True)
    hi = maps.max(axis=(-2, -1), keepdims=True)
    span = hi - lo
    scale = np.maximum(np.abs(lo), np.abs(hi))
    valid = span > eps * scale
    safe_span = np.where(valid, span, 1.0)
    return np.where(valid, (maps - lo) / safe_span, 0.0)


def _finish(cams: np.ndarray, size: Tuple[int, int], upsample: bool) -> np.ndarray:
    """Resize (optional) then min-max normalise raw maps (B, h, w); return float32."""
    if upsample:
        cams = resize_bilinear(cams, size)
    return minmax_normalize(cams).astype(np.float32)


def _weighted_sum(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The CAM of every method: ReLU(sum_k W_k * A^k), A (B, h, w, K), W broadcastable to A."""
    return np.maximum(np.sum(weights * activations, axis=-1), 0.0)


# ---------------------------------------------------------------------------------------------
# The template and the public methods
# ---------------------------------------------------------------------------------------------

WeightFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _gradient_cam(weight_fn: WeightFunction, model: Any, images: Any, class_index: ClassIndex,
                  layer: Any, upsample: bool, batch_size: int) -> np.ndarray:
    """Shared template of the gradient methods: (A, G) once per chunk, then weights and weighted sum."""
    x = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    tap = _tap_for(model, layer)
    classes = _class_vector(class_index, len(x), tap.num_classes)
    cams = []
    for start in range(0, len(x), batch_size):
        chunk = slice(start, start + batch_size)
        acts, grads, _ = tap.forward_backward(x[chunk], classes[chunk])
        cams.append(_weighted_sum(acts, weight_fn(acts, grads)))
    return _finish(np.concatenate(cams), x.shape[1:3], upsample)


def gradcam(model: Any, images: Any, class_index: ClassIndex = None, layer: Any = None,
            upsample: bool = True, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., ICCV 2017).

    map = ReLU(sum_k w_k A^k), w_k = (1 / hw) sum_ij dy^c / dA^k_ij, y^c the logit of class c.

    Args:
        model: a Keras model taking ``images`` as they are (e.g. raw 0..255 pixels when preprocessing
            is a layer of the model); functional, Sequential or with a nested backbone.
        images: float array (B, H, W, C).
        class_index: None = each image's predicted class; an int = that class for every image; a
            sequence of B ints = one class per image.
        layer: target layer name (searched recursively; "/"-path for duplicates), a layer, or None for
            :func:`find_target_layer`.
        upsample: True = resize bilinearly to (H, W) then normalise; False = normalise at the
            feature-map resolution (h, w).
        batch_size: images per forward/backward pass (bounds memory).

    Returns:
        float32 array (B, H, W) (or (B, h, w)) with values in [0, 1]; all zeros where the map is
        constant (e.g. no positive evidence).

    Raises:
        CamError: on a bad argument (message names it), an unknown or non-4-D layer, or a multi-output
            model.
    """
    return _gradient_cam(gradcam_weights, model, images, class_index, layer, upsample, batch_size)


def gradcam_plus_plus(model: Any, images: Any, class_index: ClassIndex = None, layer: Any = None,
                      upsample: bool = True, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19, as computed by tf-keras-vis).

    map = ReLU(sum_k w_k A^k) with w_k from :func:`gradcam_plus_plus_weights` (alpha normalised per
    channel). Arguments, returns and errors as :func:`gradcam`.
    """
    return _gradient_cam(gradcam_plus_plus_weights, model, images, class_index, layer, upsample, batch_size)


def layercam(model: Any, images: Any, class_index: ClassIndex = None, layer: Any = None,
             upsample: bool = True, batch_size: int = 32) -> np.ndarray:
    """LayerCAM (Jiang et al., IEEE TIP 2021).

    map = ReLU(sum_k ReLU(dy^c/dA^k) * A^k) (element-wise, no spatial averaging of the gradients).
    Arguments, returns and errors as :func:`gradcam`.
    """
    return _gradient_cam(layercam_weights, model, images, class_index, layer, upsample, batch_size)


def _top_channels_by_std(activations: np.ndarray, max_n: Optional[int]) -> np.ndarray:
    """Per image, the indices (B, n) of the n channels with the largest spatial standard deviation.

    max_n None, or max_n >= K, keeps every channel (full Score-CAM). Ties go to the lower channel index.
    """
    batch, channels = activations.shape[0], activations.shape[-1]
    if max_n is None or max_n >= channels:
        return np.tile(np.arange(channels), (batch, 1))
    std = activations.reshape(batch, -1, channels).std(axis=1)
    order = np.argsort(-std, axis=1, kind="stable")
    return np.sort(order[:, :max_n], axis=1)


def _scorecam_weights(tap: _Tap, x: np.ndarray, acts: np.ndarray, classes: np.ndarray,
                      channels: np.ndarray, batch_size: int, progress: Optional[Callable]) -> np.ndarray:
    """Score-CAM weights (B, 1, 1, K): w_k = p_c(X * M^k) for the selected channels, 0 for the others.

    M^k = minmax(upsample(A^k)) is the k-th channel upsampled to the input and normalised to [0, 1];
    p_c is the target-class probability of the masked image. (image, channel) pairs are streamed in
    chunks of ``batch_size`` masked images, so memory does not grow with the number of channels.
    """
    batch, height, width = x.shape[0], x.shape[1], x.shape[2]
    pair_image = np.repeat(np.arange(batch), channels.shape[1])
    pair_channel = channels.reshape(-1)
    weights = np.zeros((batch, acts.shape[-1]), dtype=np.float64)
    total = len(pair_image)
    step = -(-total // -(-total // batch_size))  # equal chunks of at most batch_size (80 -> 40 + 40)
    for start in range(0, total, step):
        b = pair_image[start : start + step]
        k = pair_channel[start : start + step]
        masks = minmax_normalize(resize_bilinear(acts[b, :, :, k], (height, width)))
        masked = x[b]  # a copy (fancy indexing), multiplied in place: one allocation per chunk
        masked *= masks[..., None].astype(np.float32)
        logits = tap.forward(masked, activations=False)[1]
        weights[b, k] = tap.probability(logits)[np.arange(len(b)), classes[b]]
        if progress is not None:
            progress("score-cam masked images", min(start + step, total), total)
    return weights[:, None, None, :]


def _score_cam(model: Any, images: Any, class_index: ClassIndex, layer: Any, max_n: Optional[int],
               batch_size: int, upsample: bool, progress: Optional[Callable]) -> np.ndarray:
    """Score-CAM template: forward once for A and the predicted classes, then masked forwards."""
    x = _check_images(images)
    batch_size = _check_batch_size(batch_size)
    if max_n is not None and (isinstance(max_n, bool) or not isinstance(max_n, (int, np.integer))
                              or max_n < 1):
        raise CamError(f"max_n must be a positive int (or None for every channel); got {max_n!r}")
    tap = _tap_for(model, layer)
    classes = _class_vector(class_index, len(x), tap.num_classes)
    cams = []
    for start in range(0, len(x), batch_size):
        xs, cs = x[start : start + batch_size], classes[start : start + batch_size]
        acts, logits = tap.forward(xs)
        cs = np.where(cs < 0, logits.argmax(axis=-1), cs)
        channels = _top_channels_by_std(acts, max_n)
        weights = _scorecam_weights(tap, xs, acts, cs, channels, batch_size, progress)
        cams.append(_weighted_sum(acts, weights))
    return _finish(np.concatenate(cams), x.shape[1:3], upsample)


def scorecam(model: Any, images: Any, class_index: ClassIndex = None, layer: Any = None,
             max_n: Optional[int] = None, batch_size: int = 64, upsample: bool = True,
             progress: Optional[Callable] = None) -> np.ndarray:
    """Score-CAM (Wang et al., CVPR-W 2020), with the toolkit's masking but the true probability.

    For every channel k: M^k = minmax(upsample(A^k)) (bilinear to the input size, per image and channel,
    constant channels give M^k = 0), w_k = p_c(X * M^k), the target-class probability of the masked
    image (softmax of the model's logits, the mask broadcast over colour channels); map =
    ReLU(sum_k w_k A^k). No baseline subtraction and no softmax across channels (pytorch-grad-cam
    differs there). Costs one forward pass per (image, channel).

    One departure from the study's toolkit: tf-keras-vis applies its own softmax to the model's
    OUTPUT, which for the study's models was already a softmax, so its weights were softmax(p)_c,
    squeezed into about [0.175, 0.405] for 5 classes instead of p_c in [0, 1]. We use p_c, Score-CAM's
    definition; the maps differ from the study's by that monotone squeeze of each channel weight.

    Args:
        model, images, class_index, layer, upsample: as :func:`gradcam`.
        max_n: None = every channel; an int n = only the n channels with the largest spatial standard
            deviation, chosen per image (Faster-Score-CAM); n >= K keeps every channel (tf-keras-vis
            raises instead).
        batch_size: masked images per forward pass (and original images per chunk); bounds memory.
        progress: None, or ``progress(step, done, total)`` after every chunk of masked images.

    Returns:
        float32 array (B, H, W) (or (B, h, w)) in [0, 1].

    Raises:
        CamError: on a bad argument (e.g. max_n < 1); see :func:`gradcam`.
    """
    return _score_cam(model, images, class_index, layer, max_n, batch_size, upsample, progress)


def faster_scorecam(model: Any, images: Any, class_index: ClassIndex = None, layer: Any = None,
                    max_n: Optional[int] = 10, batch_size: int = 64, upsample: bool = True,
                    progress: Optional[Callable] = None) -> np.ndarray:
    """Faster-Score-CAM: Score-CAM restricted, per image, to the ``max_n`` channels with the largest
    spatial standard deviation std_ij(A^k_ij) (the other channels get weight 0).

    tf-keras-vis takes the union of the selected channels over the batch, so an image's map depends on
    the other images of its batch; here the selection is per image. Arguments as :func:`scorecam`.
    """
    return _score_cam(model, images, class_index, layer, max_n, batch_size, upsample, progress)


METHODS: Dict[str, Callable[..., np.ndarray]] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "layercam": layercam,
    "scorecam": scorecam,
    "faster-scorecam": faster_scorecam,
}


#: Display names of the methods (figure columns, tables).
TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM",
          "scorecam": "Score-CAM", "faster-scorecam": "Faster-Score-CAM"}

_ALIASES = {"grad-cam": "gradcam", "gradcam-plus-plus": "gradcam++", "grad-cam++": "gradcam++",
            "gradcampp": "gradcam++", "gradcam-pp": "gradcam++", "layer-cam": "layercam",
            "score-cam": "scorecam", "faster-score-cam": "faster-scorecam",
            "fasterscorecam": "faster-scorecam"}


def canonical_method(name: str) -> Optional[str]:
    """The METHODS key for a method name, or None: case-insensitive, "_" and "-" interchangeable,
    common spellings accepted ("Grad-CAM++", "gradcam_plus_plus", "score_cam", ...)."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in METHODS else None


def compute(method_name: str, model: Any, images: Any, **kwargs: Any) -> np.ndarray:
    """Run a CAM method by name: "gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam".

    Names are case-insensitive; "_" and "-" are interchangeable and "gradcam_plus_plus" is accepted.

    Args:
        method_name: the method.
        model, images: as :func:`gradcam`.
        **kwargs: keyword arguments of the method (class_index, layer, upsample, max_n, ...).

    Returns:
        float32 array (B, H, W) in [0, 1].

    Raises:
        CamError: for an unknown method name.
    """
    key = canonical_method(method_name)
    if key is None:
        raise CamError(f"unknown CAM method {method_name!r}; choose one of {sorted(METHODS)}")
    return METHODS[key](model, images, **kwargs)


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def overlay(image: Any, cam: Any, alpha: float = 0.4, colormap: str = "jet") -> np.ndarray:
    """Blend a CAM, coloured with a matplotlib colormap, over an image.

    out = (1 - alpha) * image + alpha * 255 * colormap(cam)[..., :3], rounded to uint8.

    Args:
        image: (H, W, 3) or (H, W) RGB/grey image with values 0..255 (uint8 or float).
        cam: (h, w) map in [0, 1]; resized bilinearly to (H, W) if needed; values are clipped to [0, 1].
        alpha: weight of the heat map, in [0, 1].
        colormap: a matplotlib colormap name ("jet", "viridis", "inferno", ...).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        CamError: for bad shapes, alpha outside [0, 1] or an unknown colormap.
    """
    import matplotlib

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise CamError(f"image must be (H, W, 3) or (H, W); got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    heat = np.asarray(cam, dtype=np.float64)
    if heat.ndim != 2:
        raise CamError(f"cam must be one 2-D map (h, w); got shape {heat.shape}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise CamError(f"alpha must lie in [0, 1]; got {alpha!r}")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise CamError(f"unknown colormap {colormap!r}; use a matplotlib name such as 'jet' or 'viridis'")
    if heat.shape != img.shape[:2]:
        heat = resize_bilinear(heat, img.shape[:2])
    colour = cmap(np.clip(np.nan_to_num(heat), 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * np.clip(img, 0.0, 255.0) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_images(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4:
        raise CamError(f"images must be a 4-D batch (B, H, W, C); got shape {x.shape} "
                       "(use images[None] for one image)")
    if x.shape[0] == 0:
        raise CamError("images is an empty batch; pass at least one image")
    if not np.issubdtype(x.dtype, np.number):
        raise CamError(f"images must be numeric; got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise CamError("images contain NaN or inf; pass finite pixel values")
    return x


def _class_vector(class_index: ClassIndex, batch: int, num_classes: int) -> np.ndarray:
    """One class per image as int32 (B,), -1 meaning "the predicted class"."""
    if class_index is None:
        return np.full(batch, -1, dtype=np.int32)
    if isinstance(class_index, (bool, np.bool_)):
        raise CamError(f"class_index must be None, an int or one int per image; got {class_index!r}")
    if isinstance(class_index, (int, np.integer)):
        classes = np.full(batch, int(class_index), dtype=np.int64)
    else:
        classes = np.asarray(class_index)
        if classes.ndim != 1 or classes.shape[0] != batch or not np.issubdtype(classes.dtype, np.integer):
            raise CamError(f"class_index must be None, an int or a sequence of {batch} ints "
                           f"(one per image); got {class_index!r}")
    if classes.min() < 0 or classes.max() >= num_classes:
        raise CamError(f"class_index values must lie in [0, {num_classes - 1}]; got {class_index!r}")
    return classes.astype(np.int32)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise CamError(f"batch_size must be a positive int; got {batch_size!r}")
    return int(batch_size)


# ---------------------------------------------------------------------------------------------
# Reading a Keras model: layer lookup, default target layer, final softmax
# ---------------------------------------------------------------------------------------------


def _keras() -> Any:
    import keras  # lazy: importing this module must stay light

    return keras


def _walk(model: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Yield (path, layer) for every layer of ``model``, nested models expanded in place (depth first).

    A nested model is yielded after its own layers, so the order follows the forward pass.
    """
    keras = _keras()
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from _walk(layer, path + "/")
        yield path, layer


def resolve_layer(model: Any, layer: Any) -> Tuple[str, Any]:
    """Return (path, layer object) for a layer name, a "/"-path, a layer object or None (default).

    Raises:
        CamError: no such layer, or a name that is ambiguous at its shallowest depth.
    """
    keras = _keras()
    if layer is None:
        layer = find_target_layer(model)
    if isinstance(layer, keras.layers.Layer):
        for path, candidate in _walk(model):
            if candidate is layer:
                return path, candidate
        raise CamError(f"layer {layer.name!r} is not part of the model; pass one of its layers or a name")
    if not isinstance(layer, str):
        raise CamError(f"layer must be a layer name (str), a layer or None; got {type(layer).__name__}")
    if "/" in layer:
        current = model
        try:
            for part in layer.split("/"):
                current = current.get_layer(part)
        except (ValueError, AttributeError):
            raise CamError(f"layer path {layer!r} not found; check the names with "
                           "model.summary(expand_nested=True)")
        return layer, current
    matches = [(p, obj) for p, obj in _walk(model) if obj.name == layer]
    if not matches:
        raise CamError(f"layer {layer!r} not found in model {model.name!r} (nested models searched too); "
                       "check the names with model.summary(expand_nested=True)")
    depth = min(p.count("/") for p, _ in matches)
    shallowest = [(p, obj) for p, obj in matches if p.count("/") == depth]
    if len(shallowest) > 1:
        paths = [p for p, _ in shallowest]
        raise CamError(f"layer name {layer!r} is ambiguous {paths}; pass one of these paths as layer=")
    return shallowest[0]


def _output_shape(layer: Any) -> Optional[Tuple[Any, ...]]:
    """The layer's symbolic output shape, or None if unknown (never called, or shared)."""
    try:
        out = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    shape = getattr(out, "shape", None)
    return tuple(shape) if shape is not None else None


def _not_a_target(layer: Any) -> bool:
    """Layers that output a feature map but are no place to explain: pooling, dropout-like and
    preprocessing layers (a frozen layer named "preprocess" included), nested models as a whole
    (their own last layer is the feature map)."""
    keras = _keras()
    skip = (keras.Model, keras.layers.InputLayer, keras.layers.MaxPooling2D,
            keras.layers.AveragePooling2D, keras.layers.Dropout, keras.layers.SpatialDropout2D,
            keras.layers.GaussianNoise, keras.layers.GaussianDropout)
    return (isinstance(layer, skip) or "preprocessing" in type(layer).__module__
            or (layer.name == "preprocess" and not layer.trainable))


def feature_map_layers(model: Any, suggest_only: bool = True) -> List[str]:
    """Layers whose output is a 4-D feature map (B, h, w, K) with h*w > 1, in forward order.

    Nested models are expanded in place. Each layer is given by its name when that is unique in the
    model, else by its "/"-path (both are accepted by ``layer=``).

    Args:
        model: a built Keras model.
        suggest_only: leave out pooling, dropout-like and preprocessing layers and nested models
            as a whole (valid targets, but none to recommend).
    Returns:
        list of names or paths.
    """
    everything = list(_walk(model))
    counts: Dict[str, int] = {}
    for _, layer in everything:
        counts[layer.name] = counts.get(layer.name, 0) + 1
    found = []
    for path, layer in everything:
        if suggest_only and _not_a_target(layer):
            continue
        shape = _output_shape(layer)
        if shape is None or len(shape) != 4 or shape[1] is None or shape[2] is None:
            continue
        if shape[1] * shape[2] > 1:
            found.append(layer.name if counts[layer.name] == 1 else path)
    return found


def find_target_layer(model: Any) -> str:
    """Default target layer: the last layer whose output is a 4-D feature map with h*w > 1.

    Layers are visited in forward order with nested models expanded in place, so a transfer-learning
    model yields a layer *inside* its backbone. Pooling, dropout-like and preprocessing layers are
    skipped, and so is the nested model itself, so the result is the post-activation feature map
    (MobileNetV2 ``out_relu``, DenseNet ``relu``, ResNet50 ``conv5_block3_out``, VGG
    ``block5_conv3``), not the pre-BatchNorm convolution that tf-keras-vis' layer seek lands on, and
    not a 1x1 logits convolution (tf-keras-vis #61, PR #85).

    Args:
        model: a built Keras model (functional, Sequential, or containing nested models).

    Returns:
        the layer's name if it is unique in the model (nested models included), else its "/"-path
        (see the module docstring); both are accepted by the ``layer`` argument.

    Raises:
        CamError: if no layer outputs a 4-D map with h*w > 1 (or the model is not built).
    """
    found = feature_map_layers(model, suggest_only=True)
    if not found:
        raise CamError(f"model {model.name!r} has no layer with a 4-D output of spatial size > 1; "
                       "pass layer= explicitly (or build the model first)")
    return found[-1]


_PASS_THROUGH_ACTIVATIONS = ("linear", "identity")
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")


def _activation_name(op: Any) -> str:
    activation = getattr(op, "activation", None)
    return getattr(activation, "__name__", "") if activation is not None else ""


def _input_op(op: Any, node_index: int) -> Tuple[Any, int]:
    """The operation (and its node index) that produced the first input of ``op``'s given call."""
    tensor = op._inbound_nodes[node_index].input_tensors[0]
    history = tensor._keras_history
    return history.operation, history.node_index


def _find_score_op(model: Any) -> Tuple[Optional[Any], str]:
    """Locate the final softmax/sigmoid so its input (the logits) can be recorded.

    Follows the model's output back through nested models and pass-through layers (linear
    ``Activation``, e.g. a float32 cast under mixed precision; dropout; ``Identity``).

    Returns:
        (op, mode): mode "activation" = op applies softmax/sigmoid as its ``activation`` attribute
        (Dense, Conv, Activation layers); "call" = op is a ``Softmax`` layer/operation; "none" = the
        model outputs logits already (op is None).

    Raises:
        CamError: if the model has no symbolic outputs (unbuilt or subclassed) or several outputs.
    """
    keras = _keras()
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        outputs = None
    if not outputs:
        raise CamError(f"model {model.name!r} has no symbolic outputs; build it from keras.Input "
                       "(functional or Sequential)")
    if len(outputs) != 1:
        raise CamError(f"model {model.name!r} has {len(outputs)} outputs; pass a model with a single "
                       "class-score output")
    history = outputs[0]._keras_history
    op, node_index = history.operation, history.node_index
    pass_through = (keras.layers.Dropout, keras.layers.Identity, keras.layers.GaussianNoise,
                    keras.layers.GaussianDropout)
    for _ in range(1000):
        if isinstance(op, keras.Model):
            inner = op.outputs[0]._keras_history
            op, node_index = inner.operation, inner.node_index
            continue
        name = _activation_name(op)
        if name in _PROBABILITY_ACTIVATIONS:
            return op, "activation"
        if type(op).__name__ == "Softmax":
            return op, "call"
        linear = isinstance(op, keras.layers.Activation) and name in _PASS_THROUGH_ACTIVATIONS
        if isinstance(op, pass_through) or linear:
            op, node_index = _input_op(op, node_index)
            continue
        break
    return None, "none"


def _set_instance_attr(obj: Any, name: str, value: Any) -> Callable[[], None]:
    """Set ``obj.name`` in the instance dict (bypassing Keras tracking); return the undo function."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = value

    def undo() -> None:
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)

    return undo


class _Tap:
    """Records the target layer's output and the logits during one forward pass of a model.

    The model is referenced weakly; the compiled functions live as long as the tap (see the cache).
    """

    def __init__(self, model: Any, path: str, target: Any) -> None:
        self.model_ref = weakref.ref(model)
        self.path = path
        self.target = target
        self.score_op, self.score_mode = _find_score_op(model)
        self.num_classes = int(model.outputs[0].shape[-1])
        head = _activation_name(self.score_op) if self.score_mode == "activation" else "softmax"
        self.probability = _probability_function(head, self.num_classes)
        self.tape: Any = None
        self.activations: List[Any] = []
        self.logits: List[Any] = []
        self._compiled: Dict[Tuple[str, Tuple[int, ...]], Any] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap the target layer's ``call`` and the final activation for the duration of the block."""
        target_call = self.target.call

        def recording_call(*args: Any, **kwargs: Any) -> Any:
            out = target_call(*args, **kwargs)
            if self.tape is not None:
                self.tape.watch(out)
            self.activations.append(out)
            return out

        undo = [_set_instance_attr(self.target, "call", recording_call)]
        if self.score_mode == "activation":
            activation = self.score_op.activation

            def recording_activation(x: Any) -> Any:
                self.logits.append(x)
                return activation(x)

            undo.append(_set_instance_attr(self.score_op, "activation", recording_activation))
        elif self.score_mode == "call":
            softmax_call = self.score_op.call

            def recording_softmax(*args: Any, **kwargs: Any) -> Any:
                self.logits.append(args[0] if args else kwargs["inputs"])
                return softmax_call(*args, **kwargs)

            undo.append(_set_instance_attr(self.score_op, "call", recording_softmax))
        try:
            yield
        finally:
            for step in reversed(undo):
                step()
            self.activations, self.logits, self.tape = [], [], None

    def _run(self, x: Any) -> Tuple[Any, Any]:
        """Traced body: one forward pass; returns (A, logits as float32)."""
        import tensorflow as tf

        self.activations, self.logits = [], []
        model = self.model_ref()
        out = model(x, training=False)
        if len(self.activations) != 1:
            raise CamError(f"layer {self.path!r} ran {len(self.activations)} times in one forward pass; "
                           "pick a layer that runs exactly once")
        acts = self.activations[0]
        if not hasattr(acts, "shape") or len(acts.shape) != 4:
            raise CamError(f"layer {self.path!r} outputs shape {getattr(acts, 'shape', None)}, not a 4-D "
                           "feature map (B, h, w, K); pick a convolutional layer")
        logits = out if self.score_mode == "none" else self.logits[-1]
        return acts, tf.cast(logits, tf.float32)

    def _function(self, kind: str, input_shape: Tuple[int, ...]) -> Any:
        key = (kind, input_shape)
        if key not in self._compiled:
            import tensorflow as tf

            spec = [tf.TensorSpec((None,) + input_shape, tf.float32)]
            if kind == "forward":
                self._compiled[key] = tf.function(self._run, input_signature=spec, autograph=False)
            else:
                spec.append(tf.TensorSpec((None,), tf.int32))
                self._compiled[key] = tf.function(self._run_with_gradients, input_signature=spec,
                                                  autograph=False)
        return self._compiled[key]

    def _run_with_gradients(self, x: Any, classes: Any) -> Tuple[Any, Any, Any, Any]:
        """Traced body: forward + backward; classes < 0 mean "the predicted class"."""
        import tensorflow as tf

        with tf.GradientTape() as tape:
            self.tape = tape
            acts, logits = self._run(x)
            predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
            chosen = tf.where(classes < 0, predicted, classes)
            # Images are independent at inference, so d(sum_b y_b)/dA_b = dy_b/dA_b.
            score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
        self.tape = None
        grads = tape.gradient(score, acts)
        if grads is None:
            raise CamError(f"the class score does not depend on layer {self.path!r}; pick a layer "
                           "before the classifier head")
        return acts, logits, grads, chosen

    def forward(self, x: np.ndarray, activations: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray]:
        """Activations (B, h, w, K) (None if not ``activations``) and logits (B, C), float64 NumPy."""
        with self.installed():
            acts, logits = self._function("forward", tuple(x.shape[1:]))(x)
        acts = np.asarray(acts, dtype=np.float64) if activations else None
        return acts, np.asarray(logits, dtype=np.float64)

    def forward_backward(self, x: np.ndarray,
                         classes: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Activations A, gradients dy^c/dA of the target logits, and the classes used."""
        with self.installed():
            acts, _, grads, chosen = self._function("gradients", tuple(x.shape[1:]))(x, classes)
        return np.asarray(acts, dtype=np.float64), np.asarray(grads, dtype=np.float64), np.asarray(chosen)


def _probability_function(activation: str, num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Probabilities from logits (B, C): sigmoid for sigmoid heads and single-unit outputs, else softmax.

    (A softmax over one unit is always 1 and would give every Score-CAM channel the same weight,
    tf-keras-vis #103.)
    """
    if activation == "sigmoid" or num_classes == 1:
        return lambda z: 1.0 / (1.0 + np.exp(-z))

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    return softmax


_TAPS: "weakref.WeakKeyDictionary[Any, Dict[str, _Tap]]" = weakref.WeakKeyDictionary()


def _tap_for(model: Any, layer: Any) -> _Tap:
    """The (cached) tap of ``model`` at ``layer``."""
    keras = _keras()
    if not isinstance(model, keras.Model):
        raise CamError(f"model must be a keras.Model; got {type(model).__name__}")
    path, target = resolve_layer(model, layer)
    shape = _output_shape(target)
    if shape is not None and len(shape) != 4:
        raise CamError(f"layer {path!r} outputs shape {shape}, not a 4-D feature map (B, h, w, K); "
                       "pick a convolutional layer")
    per_model = _TAPS.setdefault(model, {})
    tap = per_model.get(path)
    if tap is None or tap.target is not target:
        tap = per_model[path] = _Tap(model, path, target)
    return tap


def clear_cache(model: Any = None) -> None:
    """Forget the compiled forward functions of ``model`` (of every model if None).

    Needed only after changing a model's structure in place (e.g. replacing a layer's activation).
    Weight updates need no clearing: the compiled functions read the live variables.
    """
    if model is None:
        _TAPS.clear()
    else:
        _TAPS.pop(model, None)
