"""Offline augmentation: the study's six imgaug augmenter groups, re-implemented in NumPy/scikit-image.

The study (docs/study.md §2) made, for every *training* image, six augmented copies,
copy ``i`` drawn from augmenter group ``i``::

    0 affine             SomeOf(2, random order): rotate U(-90, 90) deg, scale x,y U(0.5, 0.9),
                         translate x,y U(-15 %, 15 %), shear U(-2, 2) deg, fliplr, flipud
    1 clahe_gamma        SomeOf(2, random order): three CLAHE variants on the luminance channel,
                         gamma contrast U(0.5, 2.0), two all-channel CLAHE variants
    2 edge_blend         OneOf: EdgeDetect(alpha U(0, 0.7)),
                         DirectedEdgeDetect(alpha U(0, 0.7), direction U(0, 1))
    3 canny_blend        OneOf: Canny() (imgaug defaults), Canny(alpha U(0.5, 1), sobel 3 or 7)
    4 color              OneOf: channel shuffle, grayscale, multiply hue & saturation U(0.5, 1.5),
                         add to hue & saturation U{-50..50}, k-means quantisation to U{4..16} colours
    5 contrast_multiply  OneOf: linear contrast U(0.75, 1.5), multiply U(0.35, 1.65),
                         multiply U(0.5, 1.5) per channel with p = 0.75

and this module adds two mild photometric groups of its own, ``noise`` (additive Gaussian noise) and
``brightness`` (additive brightness shift), used only when more than six copies are asked for.

Differences from the study, all deliberate:

* The input is RGB (the study fed BGR images from ``cv2.imread`` to colour-space augmenters that
  assume RGB, so its grayscale, hue and CLAHE-Lab copies were computed on swapped channels).
* Everything is seeded: the same seed gives the same copies, bit for bit.
* Label masks (0 background, 1 cytoplasm, 2 nucleus) follow the geometry: the image is warped with
  bilinear interpolation and the mask with nearest-neighbour interpolation through the *same* matrix.
  Photometric groups return the mask unchanged.
* The two affine operations of one copy are composed into a single matrix and applied in one warp
  (imgaug warps twice, interpolating and cropping twice). Outside the source, the image is filled with
  its own border colour (median of the outermost pixel ring) instead of black, since cells sit on a
  background; ``fill`` selects reflection, edge replication or a constant instead.
* CLAHE is a vectorised NumPy implementation with OpenCV's semantics (which imgaug called):
  ``skimage.exposure.equalize_adapthist`` loops over tiles in Python and is about 3x (3x3 tiles) to
  18x (21x21 tiles) slower at the tile counts the study drew (benchmarks/augment_bench.py), and its
  clip limit and tile parameters mean something else; see :func:`clahe`.
* Canny uses ``skimage.feature.canny`` per channel; OpenCV's Sobel aperture 3/5/7 is mimicked by
  Gaussian pre-smoothing and rescaled thresholds; see :func:`canny_edges`.

The augmentation runs on images already resized to the target size (e.g. 110 x 110), whereas the
study augmented the raw crops; all size-like parameters (translation in percent, CLAHE tile *counts*)
are relative, so the difference is only the interpolation order.

Public API: :data:`GROUPS`, :func:`augment`, :func:`augment_copies`, and the pure helpers each group
is built from (:func:`affine_matrix`, :func:`warp_affine`, :func:`clahe`, :func:`gamma_contrast`, ...).
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from skimage import color as skcolor
from skimage import feature as skfeature
from skimage import exposure as skexposure
from skimage import transform as sktransform

__all__ = [
    "GROUPS",
    "STUDY_GROUPS",
    "EXTRA_GROUPS",
    "GEOMETRIC_GROUPS",
    "AugmentationError",
    "augment",
    "augment_copies",
    "group_for_copy",
    "affine_matrix",
    "warp_affine",
    "border_colour",
    "clahe",
    "gamma_contrast",
    "edge_kernel",
    "directed_edge_kernel",
    "correlate3x3",
    "canny_edges",
    "blend",
    "channel_shuffle",
    "grayscale",
    "multiply_hue_saturation",
    "add_hue_saturation",
    "kmeans_quantize",
    "linear_contrast",
    "multiply",
    "gaussian_noise",
    "add_brightness",
]

#: The study's six augmenter groups, in the study's order, then this project's two extras.
GROUPS: Tuple[str, ...] = (
    "affine",
    "clahe_gamma",
    "edge_blend",
    "canny_blend",
    "color",
    "contrast_multiply",
    "noise",
    "brightness",
)
#: The six groups of the study (``Augmentors = [SomeAug, SomeClahe, edgedetection, canny_filter,
#: Color_1, contrast_n_shit]``).
STUDY_GROUPS: Tuple[str, ...] = GROUPS[:6]
#: Groups added by this project (not in the study).
EXTRA_GROUPS: Tuple[str, ...] = GROUPS[6:]
#: Groups that move pixels (and therefore the mask); all others are photometric.
GEOMETRIC_GROUPS: Tuple[str, ...] = ("affine",)

# Parameter ranges of the two extra groups (the study has no counterpart; mild by design).
NOISE_SIGMA_RANGE: Tuple[float, float] = (0.0, 0.05 * 255.0)
BRIGHTNESS_RANGE: Tuple[float, float] = (-30.0, 30.0)

# ITU-R BT.601 luma weights, as used by OpenCV's RGB2GRAY (what imgaug's Grayscale called).
_LUMA_601 = np.array([0.299, 0.587, 0.114])

FillSpec = Union[str, float, int, Sequence[float]]
SeedSpec = Union[int, Sequence[int], np.random.SeedSequence]


class AugmentationError(ValueError):
    """Raised for an invalid argument to an augmentation function (one-line message)."""


# ---------------------------------------------------------------------------------------------
# Input checks and small conversions
# ---------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` if it is an ``(H, W, 3)`` uint8 array, else raise.

    Args:
        image: Candidate RGB image.
        name: Argument name used in the error message.

    Returns:
        The same array.

    Raises:
        AugmentationError: If the type, dtype or shape is wrong.
    """
    if not isinstance(image, np.ndarray):
        raise AugmentationError(
            f"{name} must be a numpy uint8 array of shape (H, W, 3), got {type(image).__name__}; "
            "convert with np.asarray(...)"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise AugmentationError(
            f"{name} must be uint8 with shape (H, W, 3), got {image.dtype} {image.shape}; "
            "decode to 8-bit RGB first"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise AugmentationError(f"{name} must be at least 2x2 pixels, got {image.shape[:2]}; resize it first")
    return image


def _check_mask(mask: Optional[np.ndarray], image: np.ndarray) -> Optional[np.ndarray]:
    """Return ``mask`` if it is ``None`` or an integer/bool ``(H, W)`` array matching ``image``.

    Args:
        mask: Candidate label mask.
        image: The image it belongs to.

    Returns:
        The same mask (or ``None``).

    Raises:
        AugmentationError: If the dtype or shape is wrong.
    """
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "uib":
        raise AugmentationError(
            "mask must be an integer numpy array of labels (0 background, 1 cytoplasm, 2 nucleus); "
            f"got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if mask.shape != image.shape[:2]:
        raise AugmentationError(
            f"mask shape {mask.shape} must equal the image's height x width {image.shape[:2]}; "
            "resize the mask with the image"
        )
    return mask


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to nearest and saturate to ``[0, 255]`` (OpenCV's ``saturate_cast``).

    Args:
        values: Float array.

    Returns:
        uint8 array of the same shape.
    """
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _as_rng(rng: Union[np.random.Generator, int, None]) -> np.random.Generator:
    """Accept a Generator or an int seed; refuse ``None`` (seeds are always explicit).

    Args:
        rng: ``np.random.Generator`` or integer seed.

    Returns:
        A Generator.

    Raises:
        AugmentationError: If ``rng`` is ``None`` or of another type.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise AugmentationError(
        f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}; "
        "pass rng=np.random.default_rng(seed)"
    )


def _resolve_group(group: Union[str, int]) -> str:
    """Map a group name or index in :data:`GROUPS` to its name.

    Args:
        group: Name or index.

    Returns:
        The group name.

    Raises:
        AugmentationError: If unknown.
    """
    if isinstance(group, numbers.Integral) and not isinstance(group, bool):
        if 0 <= int(group) < len(GROUPS):
            return GROUPS[int(group)]
    elif isinstance(group, str) and group in GROUPS:
        return group
    raise AugmentationError(f"unknown augmentation group {group!r}; choose one of {', '.join(GROUPS)}")


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def affine_matrix(
    shape: Tuple[int, ...],
    rotate: float = 0.0,
    scale: Tuple[float, float] = (1.0, 1.0),
    translate: Tuple[float, float] = (0.0, 0.0),
    shear: float = 0.0,
    fliplr: bool = False,
    flipud: bool = False,
) -> np.ndarray:
    """Forward 3x3 affine matrix about the image centre, in pixel coordinates ``(x=column, y=row)``.

    With ``c = ((W - 1) / 2, (H - 1) / 2)`` the centre of the pixel grid, a source pixel ``p`` goes to

        p' = T(c + t) . R(rotate) . Sh(shear) . S(scale) . F . T(-c) . p

    where ``F`` holds the flips (``x -> -x``, ``y -> -y`` about the centre), ``S = diag(sx, sy)``,
    ``Sh = [[1, tan(shear)], [0, 1]]`` (an x-shear, as imgaug's scalar ``shear``),
    ``R = [[cos a, -sin a], [sin a, cos a]]`` (with y pointing down, positive angles turn the image
    *clockwise* on screen, as in imgaug) and ``t = (tx * W, ty * H)`` (translation as a fraction of the
    image size, imgaug's ``translate_percent``). Angles are in degrees.

    Args:
        shape: Image shape; only ``(H, W)`` are used.
        rotate: Rotation in degrees, clockwise on screen.
        scale: ``(sx, sy)`` zoom factors (< 1 shrinks).
        translate: ``(tx, ty)`` shift as fractions of width and height.
        shear: x-shear angle in degrees.
        fliplr: Mirror left-right (``np.fliplr``).
        flipud: Mirror up-down (``np.flipud``).

    Returns:
        ``(3, 3)`` float64 matrix mapping source to destination homogeneous coordinates.
    """
    height, width = int(shape[0]), int(shape[1])
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    to_centre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    flips = np.diag([-1.0 if fliplr else 1.0, -1.0 if flipud else 1.0, 1.0])
    zoom = np.diag([float(scale[0]), float(scale[1]), 1.0])
    shear_m = np.array([[1.0, math.tan(math.radians(shear)), 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a = math.radians(rotate)
    rot = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    back = np.array(
        [[1.0, 0.0, cx + translate[0] * width], [0.0, 1.0, cy + translate[1] * height], [0.0, 0.0, 1.0]]
    )
    return back @ rot @ shear_m @ zoom @ flips @ to_centre


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median colour of the outermost ring of pixels (the background a cell crop sits on).

    Args:
        image: ``(H, W, C)`` or ``(H, W)`` array.

    Returns:
        ``(C,)`` (or scalar-shaped ``()``) float64 median per channel.
    """
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]], axis=0)
    return np.median(ring.astype(np.float64), axis=0)


_WARP_MODES = {"reflect": "reflect", "edge": "edge", "symmetric": "symmetric", "wrap": "wrap"}


def _parse_fill(fill: FillSpec, image: np.ndarray) -> Tuple[str, np.ndarray]:
    """Turn a ``fill`` argument into a skimage warp mode and a per-channel constant.

    Args:
        fill: ``"border"``, ``"reflect"``, ``"edge"``, ``"symmetric"``, ``"wrap"``, a number, or one
            number per channel.
        image: The image being warped (for the border colour and the channel count).

    Returns:
        ``(mode, constant)``: mode ``"constant"`` with the fill colour, or a numpy.pad-style mode.

    Raises:
        AugmentationError: If ``fill`` is not understood.
    """
    n_channels = image.shape[2] if image.ndim == 3 else 1
    if isinstance(fill, str):
        if fill == "border":
            return "constant", np.broadcast_to(border_colour(image), (n_channels,)).astype(np.float64)
        if fill in _WARP_MODES:
            return _WARP_MODES[fill], np.zeros(n_channels)
        raise AugmentationError(
            f"unknown fill {fill!r}; use 'border', 'reflect', 'edge', 'symmetric', 'wrap' or a colour"
        )
    values = np.asarray(fill, dtype=np.float64).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, n_channels)
    if values.size != n_channels or not np.all(np.isfinite(values)):
        raise AugmentationError(
            f"fill colour {fill!r} must be one number or {n_channels} numbers in 0..255; "
            "e.g. fill=(255, 255, 255)"
        )
    return "constant", values


def _integer_gather(array: np.ndarray, inverse: np.ndarray) -> Optional[np.ndarray]:
    """Apply an inverse affine map that sends every output pixel exactly onto an input pixel.

    Flips and multiples of 90 degrees (on square images) are such maps; indexing is then exact and
    faster than interpolation.

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` array.
        inverse: ``(3, 3)`` output-to-input matrix.

    Returns:
        The gathered array, or ``None`` if the map is not integral or leaves the image.
    """
    rounded = np.round(inverse)
    if not np.allclose(inverse, rounded, atol=1e-9, rtol=0.0):
        return None
    height, width = array.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    src_x = rounded[0, 0] * cols + rounded[0, 1] * rows + rounded[0, 2]
    src_y = rounded[1, 0] * cols + rounded[1, 1] * rows + rounded[1, 2]
    if src_x.min() < 0 or src_y.min() < 0 or src_x.max() > width - 1 or src_y.max() > height - 1:
        return None
    return array[src_y.astype(np.intp), src_x.astype(np.intp)]


def _fold_index(index: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Fold integer source indices into ``[0, n)`` the way ``numpy.pad`` extends an axis.

    Args:
        index: Integer indices, possibly outside ``[0, n)``.
        n: Axis length.
        mode: ``"edge"``/``"constant"`` (clamp), ``"reflect"``, ``"symmetric"`` or ``"wrap"``.

    Returns:
        Indices inside ``[0, n)``.
    """
    if mode == "wrap":
        return np.mod(index, n)
    if mode == "symmetric":  # ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
        m = np.mod(index, 2 * n)
        return np.where(m < n, m, 2 * n - 1 - m)
    if mode == "reflect" and n > 1:  # ... 2 1 | 0 1 ... n-1 | n-2 ...
        m = np.mod(index, 2 * (n - 1))
        return np.where(m < n, m, 2 * (n - 1) - m)
    return np.clip(index, 0, n - 1)


def _nearest_warp(array: np.ndarray, inverse: np.ndarray, mode: str, constant: np.ndarray) -> np.ndarray:
    """Nearest-neighbour inverse warp (label masks): output pixel q takes input pixel round(inverse . q).

    Args:
        array: ``(H, W)`` or ``(H, W, C)`` array.
        inverse: ``(3, 3)`` output-to-input matrix in ``(x, y)`` coordinates.
        mode: ``"constant"`` or a numpy.pad mode.
        constant: Fill value(s) for ``"constant"``.

    Returns:
        Warped array of the same shape and dtype.
    """
    height, width = array.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    src_x = np.floor(inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2] + 0.5).astype(np.intp)
    src_y = np.floor(inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2] + 0.5).astype(np.intp)
    out = array[_fold_index(src_y, height, mode), _fold_index(src_x, width, mode)]
    if mode == "constant":
        outside = (src_x < 0) | (src_x >= width) | (src_y < 0) | (src_y >= height)
        out[outside] = np.rint(constant).astype(array.dtype) if array.dtype.kind in "uib" else constant
    return out


def warp_affine(
    array: np.ndarray,
    matrix: np.ndarray,
    order: int = 1,
    fill: FillSpec = "border",
) -> np.ndarray:
    """Warp an image or label mask with a forward affine ``matrix`` (from :func:`affine_matrix`).

    Each output pixel ``q`` takes the input value at ``matrix^-1 . q`` (inverse mapping), interpolated
    bilinearly (``order=1``, images) or by nearest neighbour (``order=0``, label masks). Maps that land
    exactly on pixel centres (flips, right-angle rotations of square images) are applied by indexing,
    so they are exact. A constant fill ``f`` is realised as ``warp(I - f, cval=0) + f``, which equals a
    warp with ``cval=f`` for every channel because bilinear interpolation is linear.

    Args:
        array: ``(H, W, C)`` image (any numeric dtype) or ``(H, W)`` mask.
        matrix: ``(3, 3)`` forward (source to destination) matrix in ``(x, y)`` pixel coordinates.
        order: 1 for bilinear, 0 for nearest neighbour.
        fill: What lies outside the source: ``"border"`` (median border colour; label masks get 0,
            background), ``"reflect"``, ``"edge"``, ``"symmetric"``, ``"wrap"``, or a constant.

    Returns:
        Warped array, same shape and dtype as ``array`` (rounded and saturated for uint8).

    Raises:
        AugmentationError: If ``order`` is not 0 or 1, ``matrix`` is not an invertible 3x3 matrix,
            or ``fill`` is invalid.
    """
    if order not in (0, 1):
        raise AugmentationError(f"order must be 0 (nearest, masks) or 1 (bilinear, images), got {order!r}")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3) or abs(np.linalg.det(matrix[:2, :2])) < 1e-12:
        raise AugmentationError(f"matrix must be an invertible 3x3 affine matrix, got shape {matrix.shape}")
    inverse = np.linalg.inv(matrix)
    exact = _integer_gather(array, inverse)
    if exact is not None:
        return exact
    if order == 0 and isinstance(fill, str) and fill == "border":
        mode, constant = "constant", np.zeros(array.shape[2] if array.ndim == 3 else 1)
    else:
        mode, constant = _parse_fill(fill, array)
    if array.ndim == 2:
        constant = constant[:1].reshape(())
    if order == 0:
        return _nearest_warp(array, inverse, mode, constant)
    tform = sktransform.AffineTransform(matrix=inverse)
    values = array.astype(np.float64)
    if mode == "constant":
        values = values - constant
    out = sktransform.warp(values, tform, order=order, mode=mode, cval=0.0, preserve_range=True)
    if mode == "constant":
        out = out + constant
    if array.dtype == np.uint8:
        return _to_uint8(out)
    if array.dtype.kind in "uib":
        return np.rint(out).astype(array.dtype)
    return out.astype(array.dtype)


# ---------------------------------------------------------------------------------------------
# Contrast: CLAHE and gamma
# ---------------------------------------------------------------------------------------------


def _clahe_channel(channel: np.ndarray, clip_limit: float, tiles: Tuple[int, int]) -> np.ndarray:
    """CLAHE of one uint8 channel with OpenCV's semantics, vectorised over tiles.

    Args:
        channel: ``(H, W)`` uint8.
        clip_limit: OpenCV clip limit (histogram bins are clipped at ``clip_limit * tile_pixels / 256``).
        tiles: ``(rows, cols)`` number of tiles.

    Returns:
        ``(H, W)`` uint8.
    """
    height, width = channel.shape
    ty, tx = int(tiles[0]), int(tiles[1])
    # 1. Pad (mirror without repeating the edge, OpenCV's BORDER_REFLECT_101) to whole tiles.
    pad_y, pad_x = (-height) % ty, (-width) % tx
    padded = np.pad(channel, ((0, pad_y), (0, pad_x)), mode="reflect") if (pad_y or pad_x) else channel
    th, tw = padded.shape[0] // ty, padded.shape[1] // tx
    n_pix = th * tw
    # 2. One 256-bin histogram per tile.
    tile_rows = np.arange(padded.shape[0]) // th
    tile_cols = np.arange(padded.shape[1]) // tw
    tile_id = tile_rows[:, None] * tx + tile_cols[None, :]
    hist = np.bincount((tile_id * 256 + padded).ravel(), minlength=ty * tx * 256)
    hist = hist.reshape(ty * tx, 256).astype(np.float32)  # float32 is exact for counts < 2**24
    bins = np.arange(256, dtype=np.float32)[None, :]
    # 3. Clip every bin at L and spread the excess E: floor(E / 256) to every bin, then one count to
    #    each of the bins 0, s, 2s, ... (s = max(floor(256 / r), 1)) until the remainder r is used up.
    # 4. Tile mapping m(v) = round(255 / N * cdf(v)) (OpenCV scales in float32); the redistribution's
    #    share of cdf(v) has the closed form (v + 1) * floor(E / 256) + min(r, floor(v / s) + 1).
    if clip_limit <= 0:  # no limit: plain adaptive histogram equalisation
        cdf = np.cumsum(hist, axis=1)
    else:
        limit = max(int(clip_limit * n_pix / 256), 1)
        np.minimum(hist, limit, out=hist)
        excess = n_pix - hist.sum(axis=1, keepdims=True)
        batch = np.floor(excess / 256)
        residual = excess - 256 * batch
        step = np.maximum(np.floor(256 / np.maximum(residual, 1)), 1)
        cdf = np.cumsum(hist, axis=1)
        cdf += (bins + 1) * batch
        cdf += np.minimum(residual, np.floor((bins + 0.5) / step) + 1)  # +0.5: exact floor(v / s)
    cdf *= np.float32(255.0 / n_pix)
    lut = np.rint(cdf, out=cdf)
    # 5. Bilinear interpolation between the mappings of the four nearest tile centres.
    fy = np.arange(height) / th - 0.5
    fx = np.arange(width) / tw - 0.5
    y0 = np.floor(fy).astype(np.intp)
    x0 = np.floor(fx).astype(np.intp)
    wy = (fy - y0)[:, None]
    wx = (fx - x0)[None, :]
    y1, x1 = np.minimum(y0 + 1, ty - 1), np.minimum(x0 + 1, tx - 1)
    y0, x0 = np.maximum(y0, 0), np.maximum(x0, 0)
    v = channel.astype(np.intp)
    top = lut[y0[:, None] * tx + x0[None, :], v] * (1 - wx) + lut[y0[:, None] * tx + x1[None, :], v] * wx
    bottom = lut[y1[:, None] * tx + x0[None, :], v] * (1 - wx) + lut[y1[:, None] * tx + x1[None, :], v] * wx
    return _to_uint8(top * (1 - wy) + bottom * wy)


def clahe(
    image: np.ndarray,
    clip_limit: Union[float, Sequence[float]],
    tiles: Union[Tuple[int, int], Sequence[Tuple[int, int]]],
    on: str = "luminance",
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld, Graphics Gems IV, 1994).

    The image is cut into ``tiles = (rows, cols)`` tiles (imgaug's ``tile_grid_size_px``, which it
    passed to OpenCV as the *number* of tiles); each tile's 256-bin histogram ``h`` is clipped at
    ``L = max(1, floor(clip_limit * N / 256))`` (``N`` pixels per tile; OpenCV's convention, so
    ``clip_limit`` means the same as in the study) and the clipped excess ``E`` is redistributed,
    ``floor(E / 256)`` to every bin and the remainder one count per bin at a regular stride. The tile
    mapping is ``m(v) = round(255 / N * sum_{u <= v} h(u))`` and each pixel blends the mappings of its
    four nearest tile centres bilinearly. (For reference: ``skimage.exposure.equalize_adapthist`` uses
    a tile *size* and ``clip_limit_skimage = clip_limit / 256``.)

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        clip_limit: OpenCV clip limit (> 0; the study drew 0.1..10), or one per channel for ``on="all"``.
        tiles: ``(rows, cols)`` tile counts (>= 1), or one pair per channel for ``on="all"``.
        on: ``"luminance"`` equalises the L channel of CIE-Lab (imgaug's ``CLAHE``) and keeps the
            chroma; ``"all"`` equalises R, G and B separately (imgaug's ``AllChannelsCLAHE``).

    Returns:
        ``(H, W, 3)`` uint8.

    Raises:
        AugmentationError: If ``on`` or the tile counts are invalid.
    """
    _check_image(image)
    if on not in ("luminance", "all"):
        raise AugmentationError(f"on must be 'luminance' or 'all', got {on!r}")
    n = 3 if on == "all" else 1
    limits = list(np.broadcast_to(np.asarray(clip_limit, dtype=np.float64), (n,)))
    tiles_arr = np.asarray(tiles, dtype=np.int64).reshape(-1, 2)
    if tiles_arr.shape[0] == 1:
        tiles_arr = np.repeat(tiles_arr, n, axis=0)
    if tiles_arr.shape[0] != n or np.any(tiles_arr < 1):
        raise AugmentationError(
            f"tiles must be (rows, cols) >= 1 (one pair per channel for on='all'), got {tiles!r}"
        )
    if on == "all":
        channels = [_clahe_channel(image[..., c], limits[c], tuple(tiles_arr[c])) for c in range(3)]
        return np.stack(channels, axis=-1)
    lab = skcolor.rgb2lab(image)
    lightness = _to_uint8(lab[..., 0] * (255.0 / 100.0))  # 8-bit L, as OpenCV stores it
    lab[..., 0] = _clahe_channel(lightness, limits[0], tuple(tiles_arr[0])) * (100.0 / 255.0)
    with warnings.catch_warnings():
        # Raising L can leave the sRGB gamut; skimage clips and warns, clipping is what we want.
        warnings.simplefilter("ignore", UserWarning)
        rgb = skcolor.lab2rgb(lab)
    return _to_uint8(rgb * 255.0)


def gamma_contrast(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma contrast ``O = 255 * (I / 255) ** gamma`` (imgaug's ``GammaContrast``), via skimage's LUT.

    Args:
        image: uint8 array.
        gamma: Exponent > 0 (> 1 darkens, < 1 brightens, 1 is the identity).

    Returns:
        uint8 array of the same shape.
    """
    return skexposure.adjust_gamma(image, gamma)


# ---------------------------------------------------------------------------------------------
# Edge blends
# ---------------------------------------------------------------------------------------------

_IDENTITY3 = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def edge_kernel(alpha: float) -> np.ndarray:
    """imgaug's ``EdgeDetect`` kernel: ``(1 - alpha) * identity + alpha * Laplacian``.

    The Laplacian here is ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]``; because its weights sum to 0, the
    blended kernel's weights sum to ``1 - alpha`` (flat regions darken by that factor).

    Args:
        alpha: Blend factor in [0, 1].

    Returns:
        ``(3, 3)`` float64 kernel.
    """
    laplacian = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return (1.0 - alpha) * _IDENTITY3 + alpha * laplacian


def directed_edge_kernel(alpha: float, direction: float) -> np.ndarray:
    """imgaug's ``DirectedEdgeDetect`` kernel for a direction in turns (0 = up, clockwise).

    With ``theta = floor(360 * direction) mod 360`` degrees, the direction vector in image coordinates
    (y down) is ``d = (sin theta, -cos theta)``. Each of the 8 neighbours ``n`` gets the weight
    ``w_n = (1 - angle(n, d) / pi) ** 4``; the effect kernel is ``-w / sum(w)`` with centre ``+1`` (so it
    sums to 0), and the returned kernel is ``(1 - alpha) * identity + alpha * effect``.

    Args:
        alpha: Blend factor in [0, 1].
        direction: Direction in turns, [0, 1].

    Returns:
        ``(3, 3)`` float64 kernel.
    """
    theta = math.radians(int(direction * 360) % 360)
    d = np.array([math.sin(theta), -math.cos(theta)])
    effect = np.zeros((3, 3))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx == 0 and dy == 0:
                continue
            n = np.array([dx, dy], dtype=np.float64)
            cos_angle = float(np.clip(n @ d / np.linalg.norm(n), -1.0, 1.0))
            effect[dy + 1, dx + 1] = (1.0 - math.acos(cos_angle) / math.pi) ** 4
    effect = -effect / effect.sum()
    effect[1, 1] = 1.0
    return (1.0 - alpha) * _IDENTITY3 + alpha * effect


def correlate3x3(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel 3x3 correlation ``O(y, x) = sum_ij K(i, j) I(y + i - 1, x + j - 1)``, uint8 out.

    Borders are mirrored without repeating the edge pixel (OpenCV ``filter2D``'s default, which imgaug
    used); the result is rounded and saturated to 0..255.

    Args:
        image: ``(H, W, C)`` or ``(H, W)`` uint8.
        kernel: ``(3, 3)`` weights.

    Returns:
        uint8 array of the same shape.
    """
    kernel = np.asarray(kernel, dtype=np.float64)
    src = image.astype(np.float64)
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (src.ndim - 2)
    padded = np.pad(src, pad, mode="reflect")
    height, width = src.shape[:2]
    out = np.zeros_like(src)
    for i in range(3):
        for j in range(3):
            if kernel[i, j] != 0.0:
                out += kernel[i, j] * padded[i : i + height, j : j + width]
    return _to_uint8(out)


def canny_edges(image: np.ndarray, low: float, high: float, sobel_size: int = 3) -> np.ndarray:
    """Canny edges of an RGB image, approximating OpenCV's ``Canny(rgb, low, high, k, L2gradient=True)``.

    OpenCV thresholds the (unnormalised) Sobel gradient magnitude of the channel with the largest
    gradient. A Sobel aperture ``k`` smooths with a binomial of variance ``(k - 1) / 4`` and has gain
    ``2 ** (2k - 3)`` on a unit ramp (8, 128, 2048 for k = 3, 5, 7); skimage's Canny uses the 3x3 Sobel
    (variance 1/2, gain 8) after a Gaussian of ``sigma``. We therefore run ``skimage.feature.canny`` on
    each channel (0..255 scale) with ``sigma = sqrt((k - 3) / 4)`` and thresholds ``t * 8 / 2 ** (2k - 3)``,
    and OR the three edge maps. (skimage also never marks the outermost pixel ring.)

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        low: Lower hysteresis threshold in OpenCV units (the study: 60..140).
        high: Upper hysteresis threshold in OpenCV units (the study: 160..240).
        sobel_size: OpenCV aperture, 3, 5 or 7.

    Returns:
        ``(H, W)`` bool edge map.

    Raises:
        AugmentationError: If ``sobel_size`` is not 3, 5 or 7.
    """
    if sobel_size not in (3, 5, 7):
        raise AugmentationError(f"sobel_size must be 3, 5 or 7, got {sobel_size!r}")
    low, high = sorted((float(low), float(high)))
    sigma = math.sqrt((sobel_size - 3) / 4.0)
    gain_ratio = 8.0 / 2.0 ** (2 * sobel_size - 3)
    edges = np.zeros(image.shape[:2], dtype=bool)
    for c in range(image.shape[2]):
        edges |= skfeature.canny(
            image[..., c].astype(np.float64),
            sigma=sigma,
            low_threshold=low * gain_ratio,
            high_threshold=high * gain_ratio,
        )
    return edges


def blend(foreground: np.ndarray, background: np.ndarray, alpha: float) -> np.ndarray:
    """Alpha blend ``O = alpha * F + (1 - alpha) * B`` (imgaug's ``blend_alpha``), uint8 out.

    Args:
        foreground: Array broadcastable to ``background``.
        background: uint8 array.
        alpha: Weight of the foreground, in [0, 1].

    Returns:
        uint8 array shaped like ``background``.
    """
    fg = np.asarray(foreground, np.float64)
    return _to_uint8(alpha * fg + (1.0 - alpha) * background.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


def channel_shuffle(image: np.ndarray, permutation: Sequence[int]) -> np.ndarray:
    """Reorder the colour channels: ``O[..., c] = I[..., permutation[c]]``.

    Args:
        image: ``(H, W, 3)`` array.
        permutation: A permutation of ``(0, 1, 2)``.

    Returns:
        Array with permuted channels.

    Raises:
        AugmentationError: If ``permutation`` is not a permutation of the channels.
    """
    perm = [int(p) for p in permutation]
    if sorted(perm) != list(range(image.shape[2])):
        raise AugmentationError(f"permutation must reorder 0..{image.shape[2] - 1}, got {permutation!r}")
    return image[..., perm]


def grayscale(image: np.ndarray) -> np.ndarray:
    """Full grayscale, ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601) copied to all channels.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W, 3)`` uint8 with three equal channels.
    """
    luma = _to_uint8(image.astype(np.float64) @ _LUMA_601)
    return np.repeat(luma[..., None], 3, axis=-1)


def multiply_hue_saturation(image: np.ndarray, hue_factor: float, saturation_factor: float) -> np.ndarray:
    """imgaug's ``MultiplyHueAndSaturation``: in HSV, ``H' = (H * a) mod 1``, ``S' = clip(S * b, 0, 1)``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        hue_factor: Multiplier ``a`` of the hue angle (hue in turns).
        saturation_factor: Multiplier ``b`` of the saturation.

    Returns:
        uint8 RGB.
    """
    hsv = skcolor.rgb2hsv(image)
    hsv[..., 0] = np.mod(hsv[..., 0] * hue_factor, 1.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation_factor, 0.0, 1.0)
    return _to_uint8(skcolor.hsv2rgb(hsv) * 255.0)


def add_hue_saturation(image: np.ndarray, hue_shift: float, saturation_shift: float) -> np.ndarray:
    """imgaug's ``AddToHueAndSaturation``: ``H' = (H + h / 255) mod 1``, ``S' = clip(S + s / 255, 0, 1)``.

    Units are imgaug's: a hue shift of 255 is one full turn, a saturation shift of 255 the full range.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        hue_shift: ``h`` in imgaug units (the study: -50..50, i.e. up to +/-71 degrees).
        saturation_shift: ``s`` in 0..255 units.

    Returns:
        uint8 RGB.
    """
    hsv = skcolor.rgb2hsv(image)
    hsv[..., 0] = np.mod(hsv[..., 0] + hue_shift / 255.0, 1.0)
    hsv[..., 1] = np.clip(hsv[..., 1] + saturation_shift / 255.0, 0.0, 1.0)
    return _to_uint8(skcolor.hsv2rgb(hsv) * 255.0)


def kmeans_quantize(
    image: np.ndarray,
    n_colors: int,
    rng: np.random.Generator,
    iterations: int = 10,
    max_samples: int = 1024,
) -> np.ndarray:
    """Colour quantisation by k-means in RGB (Lloyd; k-means++ seeding, Arthur & Vassilvitskii 2007).

    Centres are fitted on at most ``max_samples`` pixels drawn with ``rng`` and rounded to uint8
    colours ``p_k``; every pixel is then replaced by its nearest colour ``argmin_k ||x - p_k||^2``, so
    the output has at most ``n_colors`` distinct colours.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        n_colors: Number of clusters ``k`` (>= 1; the study drew 4..16).
        rng: Random generator (sampling and seeding).
        iterations: Lloyd iterations.
        max_samples: Pixels used to fit the centres.

    Returns:
        uint8 RGB with at most ``n_colors`` distinct colours.

    Raises:
        AugmentationError: If ``n_colors < 1``.
    """
    if int(n_colors) < 1:
        raise AugmentationError(f"n_colors must be >= 1, got {n_colors!r}")
    pixels = image.reshape(-1, 3).astype(np.float64)
    if len(pixels) > max_samples:
        fit = pixels[rng.choice(len(pixels), max_samples, replace=False)]
    else:
        fit = pixels
    k = min(int(n_colors), len(fit))
    # k-means++ seeding: each next centre drawn with probability proportional to D(x)^2.
    centres = [fit[rng.integers(len(fit))]]
    nearest = ((fit - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # fewer distinct colours than k
            break
        centres.append(fit[rng.choice(len(fit), p=nearest / total)])
        nearest = np.minimum(nearest, ((fit - centres[-1]) ** 2).sum(axis=1))
    c = np.array(centres)

    def _assign(points: np.ndarray, centres_: np.ndarray) -> np.ndarray:
        # argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), as ||x||^2 does not depend on k.
        # The dot products are written per channel: a BLAS matmul of this thin shape is slower and
        # spawns threads.
        dots = sum(points[:, j : j + 1] * centres_[:, j] for j in range(3))
        return np.argmin((centres_**2).sum(1)[None, :] - 2.0 * dots, axis=1)

    for _ in range(iterations):
        labels = _assign(fit, c)
        counts = np.bincount(labels, minlength=len(c))
        sums = np.stack([np.bincount(labels, weights=fit[:, j], minlength=len(c)) for j in range(3)], axis=1)
        moved = counts > 0  # an empty cluster keeps its centre
        new_c = c.copy()
        new_c[moved] = sums[moved] / counts[moved, None]
        if np.allclose(new_c, c):
            c = new_c
            break
        c = new_c
    palette = _to_uint8(c)
    return palette[_assign(pixels, palette.astype(np.float64))].reshape(image.shape)


# ---------------------------------------------------------------------------------------------
# Intensity: contrast, multiply, noise, brightness
# ---------------------------------------------------------------------------------------------


def linear_contrast(image: np.ndarray, alpha: float) -> np.ndarray:
    """imgaug's ``LinearContrast``: ``O = 127.5 + alpha * (I - 127.5)``, rounded and saturated.

    Args:
        image: uint8 array.
        alpha: Contrast factor (1 is the identity).

    Returns:
        uint8 array.
    """
    return _to_uint8(127.5 + alpha * (image.astype(np.float64) - 127.5))


def multiply(image: np.ndarray, factor: Union[float, Sequence[float]]) -> np.ndarray:
    """imgaug's ``Multiply``: ``O = I * f`` with one factor or one per channel, rounded and saturated.

    Args:
        image: ``(H, W, C)`` uint8.
        factor: Scalar or ``(C,)`` factors.

    Returns:
        uint8 array.
    """
    return _to_uint8(image.astype(np.float64) * np.asarray(factor, dtype=np.float64))


def gaussian_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise ``O = I + n``, ``n ~ N(0, sigma^2)`` i.i.d. per pixel and channel.

    Args:
        image: uint8 array.
        sigma: Standard deviation in 0..255 units.
        rng: Random generator.

    Returns:
        uint8 array.
    """
    return _to_uint8(image.astype(np.float64) + rng.normal(0.0, sigma, size=image.shape))


def add_brightness(image: np.ndarray, value: float) -> np.ndarray:
    """Additive brightness shift ``O = I + v`` on all channels, rounded and saturated.

    Args:
        image: uint8 array.
        value: Shift ``v`` in 0..255 units.

    Returns:
        uint8 array.
    """
    return _to_uint8(image.astype(np.float64) + float(value))


# ---------------------------------------------------------------------------------------------
# The groups: draw parameters with the study's ranges, then call the helpers above
# ---------------------------------------------------------------------------------------------

# Every group has this signature: (image, mask, rng, fill) -> (image, mask).
_Mask = Optional[np.ndarray]
_GroupResult = Tuple[np.ndarray, _Mask]


def _copy_mask(mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Photometric groups return the mask unchanged (as a copy, so callers may edit it)."""
    return None if mask is None else mask.copy()


def _group_affine(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """SomeOf(2, random order) of rotate, scale, translate, shear, fliplr, flipud, composed in one warp."""
    ops = rng.choice(6, size=2, replace=False)  # two distinct children, in random order
    matrix = np.eye(3)
    for op in ops:
        if op == 0:
            step = affine_matrix(image.shape, rotate=rng.uniform(-90.0, 90.0))
        elif op == 1:
            step = affine_matrix(image.shape, scale=(rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9)))
        elif op == 2:
            step = affine_matrix(image.shape, translate=(rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)))
        elif op == 3:
            step = affine_matrix(image.shape, shear=rng.uniform(-2.0, 2.0))
        elif op == 4:
            step = affine_matrix(image.shape, fliplr=True)
        else:
            step = affine_matrix(image.shape, flipud=True)
        matrix = step @ matrix
    out = warp_affine(image, matrix, order=1, fill=fill)
    # Labels outside the source are background (0), unless the image itself is mirrored/extended.
    mask_fill = fill if isinstance(fill, str) and fill in _WARP_MODES else 0
    out_mask = None if mask is None else warp_affine(mask, matrix, order=0, fill=mask_fill)
    return out, out_mask


def _tile_count(rng: np.random.Generator, low: int, high: int) -> int:
    """Discrete uniform tile count in ``[low, high]``, floored at imgaug's minimum of 3."""
    return max(int(rng.integers(low, high + 1)), 3)


def _group_clahe_gamma(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """SomeOf(2, random order) of the study's CLAHE variants and gamma contrast (imgaug 0.4 defaults:
    clip limit U(0.1, 8), tile counts U{3..12}, minimum 3)."""
    out = image
    for op in rng.choice(6, size=2, replace=False):
        if op == 0:  # CLAHE(tile_grid_size_px=((3, 21), [0, 2, 3, 4, 5, 6, 7]))
            tiles = (_tile_count(rng, 3, 21), max(int(rng.choice([0, 2, 3, 4, 5, 6, 7])), 3))
            out = clahe(out, rng.uniform(0.1, 8.0), tiles, on="luminance")
        elif op == 1:  # CLAHE(clip_limit=(1, 10))
            t = _tile_count(rng, 3, 12)
            out = clahe(out, rng.uniform(1.0, 10.0), (t, t), on="luminance")
        elif op == 2:  # CLAHE(tile_grid_size_px=(3, 21))
            t = _tile_count(rng, 3, 21)
            out = clahe(out, rng.uniform(0.1, 8.0), (t, t), on="luminance")
        elif op == 3:  # GammaContrast((0.5, 2.0))
            out = gamma_contrast(out, rng.uniform(0.5, 2.0))
        elif op == 4:  # AllChannelsCLAHE(): same parameters for the three channels
            t = _tile_count(rng, 3, 12)
            out = clahe(out, rng.uniform(0.1, 8.0), (t, t), on="all")
        else:  # AllChannelsCLAHE(clip_limit=(1, 10), per_channel=True)
            limits = rng.uniform(1.0, 10.0, size=3)
            tiles = [(t, t) for t in (_tile_count(rng, 3, 12) for _ in range(3))]
            out = clahe(out, limits, tiles, on="all")
    return out, _copy_mask(mask)


def _group_edge_blend(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """OneOf(EdgeDetect(alpha U(0, 0.7)), DirectedEdgeDetect(alpha U(0, 0.7), direction U(0, 1)))."""
    if rng.integers(2) == 0:
        kernel = edge_kernel(rng.uniform(0.0, 0.7))
    else:
        alpha = rng.uniform(0.0, 0.7)
        kernel = directed_edge_kernel(alpha, rng.uniform(0.0, 1.0))
    return correlate3x3(image, kernel), _copy_mask(mask)


def _group_canny_blend(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """OneOf(Canny(), Canny(alpha U(0.5, 1), sobel_kernel_size [3, 7])), imgaug 0.4 defaults otherwise:
    hysteresis U{60..140} / U{160..240}, aperture U{3..7} with even sizes lowered by one, edges and
    background painted with two random colours, then alpha-blended over the image."""
    if rng.integers(2) == 0:
        alpha = rng.uniform(0.0, 1.0)
        size = int(rng.integers(3, 8))
        size -= 1 - size % 2
    else:
        alpha = rng.uniform(0.5, 1.0)
        size = int(rng.choice([3, 7]))
    low, high = rng.integers(60, 141), rng.integers(160, 241)
    edge_rgb = rng.integers(0, 256, size=3)
    back_rgb = rng.integers(0, 256, size=3)
    edges = canny_edges(image, low, high, size)
    painted = np.where(edges[..., None], edge_rgb, back_rgb)
    return blend(painted, image, alpha), _copy_mask(mask)


def _group_color(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """OneOf(ChannelShuffle, Grayscale, MultiplyHueAndSaturation((0.5, 1.5), per_channel),
    AddToHueAndSaturation((-50, 50), per_channel), KMeansColorQuantization((4, 16)))."""
    op = int(rng.integers(5))
    if op == 0:
        out = channel_shuffle(image, rng.permutation(3))
    elif op == 1:
        out = grayscale(image)
    elif op == 2:
        out = multiply_hue_saturation(image, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5))
    elif op == 3:
        out = add_hue_saturation(image, int(rng.integers(-50, 51)), int(rng.integers(-50, 51)))
    else:
        out = kmeans_quantize(image, int(rng.integers(4, 17)), rng)
    return out, _copy_mask(mask)


def _group_contrast_multiply(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """OneOf(LinearContrast((0.75, 1.5)), Multiply((0.35, 1.65)), Multiply((0.5, 1.5), per_channel=0.75))."""
    op = int(rng.integers(3))
    if op == 0:
        out = linear_contrast(image, rng.uniform(0.75, 1.5))
    elif op == 1:
        out = multiply(image, rng.uniform(0.35, 1.65))
    else:
        per_channel = rng.random() < 0.75
        out = multiply(image, rng.uniform(0.5, 1.5, size=3) if per_channel else rng.uniform(0.5, 1.5))
    return out, _copy_mask(mask)


def _group_noise(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """Additive Gaussian noise with sigma ~ U(NOISE_SIGMA_RANGE), per pixel and channel (not in the study)."""
    return gaussian_noise(image, rng.uniform(*NOISE_SIGMA_RANGE), rng), _copy_mask(mask)


def _group_brightness(
    image: np.ndarray, mask: _Mask, rng: np.random.Generator, fill: FillSpec
) -> _GroupResult:
    """Additive brightness shift v ~ U(BRIGHTNESS_RANGE) on all channels (not in the study)."""
    return add_brightness(image, rng.uniform(*BRIGHTNESS_RANGE)), _copy_mask(mask)


_GROUP_FUNCTIONS = types.MappingProxyType(
    {
        "affine": _group_affine,
        "clahe_gamma": _group_clahe_gamma,
        "edge_blend": _group_edge_blend,
        "canny_blend": _group_canny_blend,
        "color": _group_color,
        "contrast_multiply": _group_contrast_multiply,
        "noise": _group_noise,
        "brightness": _group_brightness,
    }
)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def augment(
    image: np.ndarray,
    mask: Optional[np.ndarray] = None,
    group: Union[str, int] = "affine",
    rng: Union[np.random.Generator, int, None] = None,
    fill: FillSpec = "border",
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Apply one augmenter group, drawing its random parameters from ``rng``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image (already at the target size).
        mask: Optional ``(H, W)`` integer label mask (0 background, 1 cytoplasm, 2 nucleus). Geometric
            groups warp it with the image's matrix (nearest neighbour, outside = 0 unless ``fill`` is
            a mirroring mode); photometric groups return an unchanged copy.
        group: A name in :data:`GROUPS` or its index.
        rng: ``np.random.Generator`` (or an int seed); required.
        fill: Outside-the-source policy for geometric groups, see :func:`warp_affine`.

    Returns:
        ``(augmented image, augmented mask or None)``; the image is uint8 with the input's shape.

    Raises:
        AugmentationError: For a bad image, mask, group, rng or fill.
    """
    _check_image(image)
    _check_mask(mask, image)
    name = _resolve_group(group)
    generator = _as_rng(rng)
    if name in GEOMETRIC_GROUPS:
        _parse_fill(fill, image)  # validate before drawing anything
    out, out_mask = _GROUP_FUNCTIONS[name](image, mask, generator, fill)
    return out, out_mask


def group_for_copy(index: int, groups: Optional[Sequence[str]] = None) -> str:
    """The group used for copy ``index``: ``groups[index % len(groups)]``, by default over :data:`GROUPS`.

    Copies 0..5 therefore use the study's six groups in the study's order (one copy per group, as
    the study did); copies 6 and 7 use ``noise`` and ``brightness``; copy 8 starts over at ``affine``.

    Args:
        index: Copy index (>= 0).
        groups: Optional custom cycle of group names.

    Returns:
        The group name.

    Raises:
        AugmentationError: If ``groups`` is empty or contains an unknown name.
    """
    cycle = GROUPS if groups is None else tuple(_resolve_group(g) for g in groups)
    if not cycle:
        raise AugmentationError("groups must name at least one group; e.g. groups=('affine', 'color')")
    return cycle[index % len(cycle)]


def _seed_sequence(seed: SeedSpec) -> np.random.SeedSequence:
    """Normalise a seed argument without consuming anything from a caller's SeedSequence."""
    if isinstance(seed, np.random.SeedSequence):
        return seed
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and int(seed) >= 0:
        return np.random.SeedSequence(int(seed))
    if isinstance(seed, (list, tuple)) and seed and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 0 for s in seed
    ):
        return np.random.SeedSequence([int(s) for s in seed])
    raise AugmentationError(
        f"seed must be a non-negative int, a tuple of them or a SeedSequence, got {seed!r}; "
        "e.g. seed=(42, image_index)"
    )


def augment_copies(
    image: np.ndarray,
    mask: Optional[np.ndarray] = None,
    n: int = 6,
    seed: SeedSpec = 0,
    groups: Optional[Sequence[str]] = None,
    fill: FillSpec = "border",
) -> List[Tuple[np.ndarray, Optional[np.ndarray], str]]:
    """Make ``n`` augmented copies of one image, copy ``i`` from group :func:`group_for_copy` ``(i)``.

    Copy ``i`` draws from its own random stream, the ``i``-th child of ``seed``
    (``SeedSequence(seed).spawn`` semantics, computed without mutating a passed SeedSequence), so the
    result is identical for the same seed, copy ``i`` does not depend on ``n``, and different images
    get independent streams when seeded e.g. with ``(global_seed, image_index)``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: Optional ``(H, W)`` label mask, transformed alongside.
        n: Number of copies (>= 0); 6 reproduces the study (one per study group).
        seed: Non-negative int, tuple of ints, or ``np.random.SeedSequence``.
        groups: Optional cycle of group names replacing :data:`GROUPS`.
        fill: Outside-the-source policy for geometric groups, see :func:`warp_affine`.

    Returns:
        List of ``(image, mask or None, group name)`` tuples.

    Raises:
        AugmentationError: For a bad ``n``, ``seed``, ``groups`` or any :func:`augment` argument.
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise AugmentationError(f"n must be a non-negative int (copies per image), got {n!r}")
    _check_image(image)
    _check_mask(mask, image)
    _parse_fill(fill, image)
    base = _seed_sequence(seed)
    names = [group_for_copy(i, groups) for i in range(int(n))]
    copies = []
    for i, name in enumerate(names):
        key = tuple(base.spawn_key) + (i,)
        child = np.random.SeedSequence(base.entropy, spawn_key=key, pool_size=base.pool_size)
        out, out_mask = augment(image, mask, name, np.random.default_rng(child), fill)
        copies.append((out, out_mask, name))
    return copies
