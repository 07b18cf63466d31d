"""Synthetic SIPaKMeD-like Pap-smear cells, written in the official SIPaKMeD layout.

The embedded default dataset: it lets the whole study (prepare, train, explain, report) run offline
and in CI, and it exercises the same reader as the real data. The output is the official nested
layout, contours included::

    out_dir/im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp       24-bit RGB crop of one cell
    out_dir/im_<Class>/im_<Class>/CROPPED/NNN_MM_nuc.dat   nucleus contour, an "x,y" line per vertex
    out_dir/im_<Class>/im_<Class>/CROPPED/NNN_MM_cyt.dat   cell (cytoplasm) contour, same format
    out_dir/synthetic.json                                 generator parameters and counts

``NNN`` is the "cluster image" (the slide field a cell was cropped from, SIPaKMeD's 966 full images)
and ``MM`` the cell within it. Contours are in the crop's pixel coordinates (x = column, y = row,
pixel centres at integers), as in the real files.

What the classes look like (Plissiti et al., SIPaKMeD, ICIP 2018; thesis ch. 4, Figs 4.1-4.5):

==========================  ===========================================================  ========
class                       cues drawn                                                    N/C area
==========================  ===========================================================  ========
Superficial-Intermediate    large flat polygonal pale pink/blue cytoplasm; small dark      ~0.01
                            pyknotic (or small vesicular) nucleus
Parabasal                   small round cell, blue-green cytoplasm, large round nucleus    ~0.20
                            with fine chromatin and a nuclear rim
Koilocytotic                polygonal mature cell, a clear perinuclear halo with a         ~0.05
                            condensed rim; enlarged, wrinkled, hyperchromatic nucleus,
                            often binucleate
Dyskeratotic                small dense orange(ophilic) cell, dark dense nucleus,          ~0.07
                            sometimes a clump of several cells
Metaplastic                 round dense (darker) cytoplasm, sometimes with processes,      ~0.09
                            moderate nucleus
==========================  ===========================================================  ========

The class evidence lies where the masks say: nucleus size, shape, darkness and chromatin texture,
the halo, and cytoplasm shape and density. Colour is deliberately a weak cue: every cluster image
gets its own stain (absorption spectra, strengths, eosin/light-green balance), illumination tint,
brightness, background haze, noise and blur, large enough that a colour statistic alone is
ambiguous. Cells of one cluster share that stain, the magnification (crop scale) and a slide-level
nucleus size factor (+-7 %), so a cell-level split leaks cluster identity and a grouped split does
not (docs/study.md §1).

Image formation follows Beer-Lambert absorption, as in colour deconvolution (Ruifrok & Johnston,
Anal. Quant. Cytol. Histol. 23, 2001)::

    I(x) = I0(x) * exp(-sum_k D_k(x) * a_k)

with ``I0`` the (tinted, slightly uneven) illumination, ``D_k`` the density map of stain ``k`` and
``a_k`` its RGB optical-density vector (hematoxylin, eosin, light green, orange G of the Pap stain).

A second, separate generator, :func:`cue_cells`, makes a two-class ground-truth set for saliency
maps: the class is decided only by a ring-or-disk inclusion at a known, off-centre place in each
cell (docs/xai.md §5); it returns arrays and writes nothing.

Determinism: the stain of cluster ``NNN`` is drawn from ``default_rng([seed, 1, class_index, NNN])``,
its phenotype (hard setting) from ``default_rng([seed, 4, class_index, NNN])``, and cell ``NNN_MM``
from ``default_rng([seed, 2, class_index, NNN, MM])`` (the tags 1, 2, 4 keep the streams apart:
SeedSequence treats trailing zeros as absent), so a file depends only on
(seed, class, NNN, MM), never on the other classes or on generation order; same seed, same bytes
(on the same platform and library versions).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate")

#: Cells per class in the real SIPaKMeD (4049 in all; docs/study.md §1). Read-only.
FULL_COUNTS = MappingProxyType({"Dyskeratotic": 813, "Koilocytotic": 825, "Metaplastic": 793,
                                "Parabasal": 787, "Superficial-Intermediate": 831})

#: Cluster images per class in the real SIPaKMeD (966 in all), counted from the study's file lists.
FULL_CLUSTERS = MappingProxyType({"Dyskeratotic": 223, "Koilocytotic": 238, "Metaplastic": 271,
                                  "Parabasal": 108, "Superficial-Intermediate": 126})

GENERATOR_VERSION = 1
N_ANGLES = 256                      # samples of each shape's radial function r(theta)
_THETA = np.linspace(0.0, 2.0 * np.pi, N_ANGLES, endpoint=False)
_THETA.flags.writeable = False

# Pap-stain optical-density vectors (R, G, B), unit norm before per-cluster perturbation.
# Hematoxylin and eosin from Ruifrok & Johnston (2001); light green SF absorbs red (-> blue-green),
# orange G absorbs blue (-> orange).
STAIN_NAMES = ("hematoxylin", "eosin", "light_green", "orange_g")
_STAIN_OD = np.array([[0.650, 0.704, 0.286],
                      [0.072, 0.990, 0.105],
                      [0.850, 0.330, 0.410],
                      [0.050, 0.450, 0.890]])
_STAIN_OD.flags.writeable = False

#: ``progress(step, done, total)``: told how many cells have been generated.
ProgressArg = Optional[Callable[[str, int, int], None]]


class SyntheticError(ValueError):
    """Bad argument to the synthetic generator; the message is one line naming it and the fix."""


# ------------------------------------------------------------------------------------------------
# Class morphology (the knowledge the generator encodes)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClassSpec:
    """Morphology of one class. Ranges are (low, high) of a uniform draw per cell.

    Radii are equivalent-area radii, r_eq = sqrt(area / pi); ``nc_ratio`` is r_eq(nucleus) /
    r_eq(cell), so the nucleus/cytoplasm area ratio is its square.
    """

    long_side: float                    # median crop long side in px (lognormal, sd 0.18)
    cell_polygonal: bool                # flat polygonal cell (mature squamous) vs smooth round/oval
    cell_axis: Tuple[float, float]      # minor/major axis ratio of the cell
    cell_irregular: float               # harmonic (smooth) or vertex (polygonal) irregularity
    p_processes: float                  # chance of 1-3 cytoplasmic processes ("spider" cells)
    cyt_density: Tuple[float, float]    # cytoplasm optical density
    cyt_mix: Tuple[float, float, float]  # Dirichlet alpha over (eosin, light green, orange G)
    cyt_edge: float                     # density added at the cell rim (dense ectoplasm)
    nc_ratio: Tuple[float, float]
    nuc_axis: Tuple[float, float]
    nuc_irregular: Tuple[float, float]  # harmonic amplitude of the nuclear outline (wrinkling)
    nuc_density: Tuple[float, float]
    nuc_texture: float                  # relative chromatin texture amplitude
    nuc_grain: float                    # chromatin grain size (px, Gaussian sigma)
    nuc_rim: float                      # nuclear-membrane darkening (vesicular nuclei)
    p_pyknotic: float = 0.0             # chance of a small dense homogeneous (pyknotic) nucleus
    p_binucleate: float = 0.0
    halo: Optional[Tuple[float, float]] = None   # halo r_eq / nucleus r_eq (koilocytes)
    p_clump: float = 0.0                # chance of 1-2 companion cells in the crop (clumps)


CLASS_SPECS: Mapping[str, ClassSpec] = MappingProxyType({
    "Superficial-Intermediate": ClassSpec(
        long_side=138, cell_polygonal=True, cell_axis=(0.6, 1.0), cell_irregular=0.13,
        p_processes=0.0, cyt_density=(0.14, 0.36), cyt_mix=(2.0, 2.2, 0.35), cyt_edge=0.08,
        nc_ratio=(0.10, 0.15), nuc_axis=(0.75, 1.0), nuc_irregular=(0.0, 0.03),
        nuc_density=(0.95, 1.35), nuc_texture=0.28, nuc_grain=0.8, nuc_rim=0.35,
        p_pyknotic=0.5),
    "Parabasal": ClassSpec(
        long_side=80, cell_polygonal=False, cell_axis=(0.78, 1.0), cell_irregular=0.035,
        p_processes=0.0, cyt_density=(0.28, 0.55), cyt_mix=(0.6, 3.0, 0.25), cyt_edge=0.12,
        nc_ratio=(0.39, 0.50), nuc_axis=(0.78, 1.0), nuc_irregular=(0.0, 0.025),
        nuc_density=(0.7, 1.05), nuc_texture=0.32, nuc_grain=0.8, nuc_rim=0.45),
    "Koilocytotic": ClassSpec(
        long_side=125, cell_polygonal=True, cell_axis=(0.6, 1.0), cell_irregular=0.15,
        p_processes=0.0, cyt_density=(0.28, 0.58), cyt_mix=(1.6, 1.6, 0.6), cyt_edge=0.1,
        nc_ratio=(0.17, 0.25), nuc_axis=(0.55, 0.9), nuc_irregular=(0.06, 0.12),
        nuc_density=(1.3, 2.0), nuc_texture=0.35, nuc_grain=1.4, nuc_rim=0.1,
        p_binucleate=0.35, halo=(1.9, 2.7)),
    "Dyskeratotic": ClassSpec(
        long_side=92, cell_polygonal=False, cell_axis=(0.55, 0.9), cell_irregular=0.08,
        p_processes=0.0, cyt_density=(0.5, 0.9), cyt_mix=(1.1, 0.5, 2.4), cyt_edge=0.1,
        nc_ratio=(0.24, 0.33), nuc_axis=(0.65, 0.95), nuc_irregular=(0.04, 0.08),
        nuc_density=(1.6, 2.4), nuc_texture=0.1, nuc_grain=1.0, nuc_rim=0.05,
        p_binucleate=0.08, p_clump=0.35),
    "Metaplastic": ClassSpec(
        long_side=100, cell_polygonal=False, cell_axis=(0.7, 1.0), cell_irregular=0.05,
        p_processes=0.4, cyt_density=(0.45, 0.85), cyt_mix=(0.7, 3.0, 0.4), cyt_edge=0.3,
        nc_ratio=(0.25, 0.34), nuc_axis=(0.75, 1.0), nuc_irregular=(0.01, 0.04),
        nuc_density=(0.85, 1.25), nuc_texture=0.2, nuc_grain=1.0, nuc_rim=0.25),
})


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard the classes are to tell apart, and how much the cluster images differ.

    The default set makes each class easy to recognise from the cell itself (its nucleus, halo and
    cytoplasm), so knowing a cell's cluster image adds nothing and a cell-level split cannot leak
    anything a grouped split would not give too. Real smears are not like that: the cell-level cues
    of neighbouring classes overlap (nuclear size, chromatin and cytoplasm ranges shared between
    classes, and a share of atypical cells that look like a neighbouring class), while the
    conditions of one cluster image (stain batch, focus, illumination, magnification, background
    debris) vary strongly between images and are shared by every cell cut from one. The "hard"
    setting generates that: a model can then score better on cells whose cluster image it saw in
    training, which is the mechanism by which the study's cell-level split inflates accuracy.

    Attributes:
        name: "default", "hard" or "hard-uniform".
        widen: each morphology range (low, high) of ClassSpec becomes centre +- widen x half-width
            (clipped to valid values), so the ranges of neighbouring classes overlap.
        p_atypical: chance that a cell is drawn with the morphology of a neighbouring class
            (NEIGHBOURS); its label stays its own class.
        cluster_spread: factor on the spread of every cluster-level condition of sample_stain
            around its centre (stain hue and strengths, illumination, haze, blur, noise,
            magnification, nucleus scale, debris).
        cluster_phenotype: 0, or the share of each (widened) morphology range that one cluster
            image does NOT span: its cells come from one patient and one lesion, so each cluster
            draws a position u in [0, 1] per range and its cells draw from a sub-range of width
            (1 - cluster_phenotype) x the class's, placed at u (``phenotype_spec``). With it,
            ``p_atypical`` applies per cluster image (all its cells drawn like one neighbouring
            class) instead of per cell. Cells of one image then resemble each other more than
            other cells of their class: what a model learns from some of them tells it about
            the others, which is the second way a cell-level split leaks.
    """

    name: str = "default"
    widen: float = 1.0
    p_atypical: float = 0.0
    cluster_spread: float = 1.0
    cluster_phenotype: float = 0.0


#: The generator's settings: the easy default; the overlapping, strongly clustered "hard" one; and
#: "hard-uniform", the hard classes with every cluster image under the same conditions (spread 0:
#: each condition at its centre) and no cluster phenotype (cells drawn independently within their
#: class, atypical cells one by one), where knowing a cluster image can teach nothing about its
#: other cells - the audit's negative control.
DIFFICULTIES = MappingProxyType({"default": Difficulty(),
                                 "hard": Difficulty("hard", widen=2.0, p_atypical=0.3,
                                                    cluster_spread=2.0, cluster_phenotype=0.6),
                                 "hard-uniform": Difficulty("hard-uniform", widen=2.0,
                                                            p_atypical=0.3, cluster_spread=0.0)})

#: Classes whose cells resemble each other (the atypical cells of the hard setting): the mature
#: squamous pair, the immature pair, and dyskeratotic cells between koilocytes and metaplasia.
NEIGHBOURS = MappingProxyType({
    "Superficial-Intermediate": ("Koilocytotic",),
    "Koilocytotic": ("Superficial-Intermediate", "Dyskeratotic"),
    "Dyskeratotic": ("Koilocytotic", "Metaplastic"),
    "Metaplastic": ("Parabasal", "Dyskeratotic"),
    "Parabasal": ("Metaplastic",),
})

_RANGE_LIMITS = {"cell_axis": (0.3, 1.0), "cyt_density": (0.05, None), "nc_ratio": (0.05, 0.7),
                 "nuc_axis": (0.35, 1.0), "nuc_irregular": (0.0, 0.2), "nuc_density": (0.3, None),
                 "halo": (1.3, None)}


def widened(spec: "ClassSpec", factor: float) -> "ClassSpec":
    """``spec`` with every (low, high) morphology range widened about its centre by ``factor``."""
    changes = {}
    for name, (lo_lim, hi_lim) in _RANGE_LIMITS.items():
        rng_ = getattr(spec, name)
        if rng_ is None:
            continue
        centre, half = (rng_[0] + rng_[1]) / 2.0, (rng_[1] - rng_[0]) / 2.0 * factor
        lo, hi = centre - half, centre + half
        lo = max(lo, lo_lim) if lo_lim is not None else lo
        hi = min(hi, hi_lim) if hi_lim is not None else hi
        changes[name] = (lo, max(hi, lo))
    return dataclasses.replace(spec, **changes)


@dataclasses.dataclass(frozen=True)
class Phenotype:
    """What the cells of one cluster image share biologically (Difficulty.cluster_phenotype).

    Attributes:
        position: {morphology range name: u in [0, 1]}, where in each class range the cluster's
            cells lie (``phenotype_spec``).
        atypical_as: None, or the neighbouring class whose morphology all its cells take.
    """

    position: Mapping[str, float]
    atypical_as: Optional[str] = None


def sample_phenotype(rng: np.random.Generator, cls: str, difficulty: "Difficulty"
                     ) -> Optional[Phenotype]:
    """The shared phenotype of one cluster image of class ``cls`` (None without one)."""
    if difficulty.cluster_phenotype <= 0:
        return None
    position = {name: float(rng.uniform()) for name in _RANGE_LIMITS}
    atypical = None
    if rng.random() < difficulty.p_atypical:
        atypical = NEIGHBOURS[cls][int(rng.integers(len(NEIGHBOURS[cls])))]
    return Phenotype(MappingProxyType(position), atypical)


def phenotype_spec(spec: "ClassSpec", phenotype: Phenotype, share: float) -> "ClassSpec":
    """``spec`` with every morphology range (lo, hi) narrowed to the cluster's sub-range.

    width w = hi - lo, sub-width v = (1 - share) w, and the sub-range [lo + u (w - v),
    lo + u (w - v) + v] for the cluster's position u: u = 0 gives the range's low end, u = 1 its
    high end, and over clusters (u uniform) every value of [lo, hi] stays reachable.
    """
    changes = {}
    for name, u in phenotype.position.items():
        rng_ = getattr(spec, name)
        if rng_ is None:
            continue
        w = rng_[1] - rng_[0]
        v = (1.0 - share) * w
        lo = rng_[0] + u * (w - v)
        changes[name] = (lo, lo + v)
    return dataclasses.replace(spec, **changes)


@dataclasses.dataclass(frozen=True)
class Stain:
    """Stain, imaging conditions and slide-level factors shared by all cells of one cluster image.

    Attributes:
        od: (4, 3) optical-density vectors of STAIN_NAMES (rows, unit norm).
        nuclear_strength: multiplier on nuclear (hematoxylin) density.
        cyto_strength: multiplier on cytoplasm densities.
        mix_bias: (3,) log-weights added to each cell's (eosin, light green, orange G) mix.
        white: (3,) illumination (background) RGB in 0..255.
        haze_od: (3,) background haze optical density (mucus, uneven mounting).
        texture: relative amplitude of the background haze texture.
        texture_scale: its grain (Gaussian sigma, px).
        gradient: (2,) relative illumination slope along x and y across a crop.
        noise: sensor noise standard deviation (8-bit levels).
        blur: optical blur (Gaussian sigma, px).
        debris: expected number of debris specks per crop.
        magnification: factor on the crop size (one field of view, one objective and camera).
        nucleus_scale: factor on the nucleus/cell radius ratio (patient- or slide-level).
    """

    od: np.ndarray
    nuclear_strength: float
    cyto_strength: float
    mix_bias: np.ndarray
    white: np.ndarray
    haze_od: np.ndarray
    texture: float
    texture_scale: float
    gradient: np.ndarray
    noise: float
    blur: float
    debris: float
    magnification: float = 1.0
    nucleus_scale: float = 1.0


def sample_stain(rng: np.random.Generator, spread: float = 1.0) -> Stain:
    """Draw the stain and imaging conditions of one cluster image.

    The ranges are wide on purpose (strengths x0.6-1.5, hue of each stain perturbed, tinted and
    dimmed illumination) so that the colour of a cell says little about its class.

    Args:
        rng: the cluster's generator.
        spread: factor on every condition's deviation from its centre (Difficulty.cluster_spread;
            1 draws exactly the default conditions).
    Returns:
        A Stain.
    """
    def s(value, centre, low=None, high=None):
        """The drawn value, its deviation from ``centre`` scaled by ``spread`` (clipped)."""
        if spread == 1.0:
            return value
        return np.clip(centre + (value - centre) * spread, low, high)

    od = _STAIN_OD + s(rng.normal(0.0, 0.12, _STAIN_OD.shape), 0.0)
    od = np.clip(od, 0.02, None)
    od /= np.linalg.norm(od, axis=1, keepdims=True)
    brightness = s(rng.uniform(0.80, 1.0), 1.0, 0.45, 1.0)
    tint = 1.0 + s(rng.normal(0.0, 0.05, 3), 0.0)
    white = np.clip(250.0 * brightness * tint, 120.0, 255.0)
    haze_dir = rng.dirichlet((1.0, 1.0, 1.0))
    return Stain(od=od,
                 nuclear_strength=float(s(rng.uniform(0.7, 1.3), 1.0, 0.3)),
                 cyto_strength=float(s(rng.uniform(0.6, 1.5), 1.05, 0.25)),
                 mix_bias=s(rng.normal(0.0, 0.7, 3), 0.0),
                 white=white,
                 haze_od=haze_dir * s(rng.uniform(0.0, 0.12), 0.0, 0.0),
                 texture=float(s(rng.uniform(0.1, 0.6), 0.1, 0.0)),
                 texture_scale=float(rng.uniform(3.0, 9.0)),
                 gradient=s(rng.normal(0.0, 0.04, 2), 0.0),
                 noise=float(s(rng.uniform(1.5, 6.0), 1.5, 0.5)),
                 blur=float(s(rng.uniform(0.35, 1.1), 0.35, 0.2)),
                 debris=float(s(rng.uniform(0.0, 1.5), 0.0, 0.0)),
                 magnification=float(math.exp(s(rng.normal(0.0, 0.1), 0.0))),
                 nucleus_scale=float(s(rng.uniform(0.93, 1.07), 1.0, 0.5)))


# ------------------------------------------------------------------------------------------------
# Shapes: star-shaped outlines as radial functions r(theta) around a centre
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    """A star-shaped outline: centre (cx, cy) and radius r[j] at angle _THETA[j] (image axes)."""

    cx: float
    cy: float
    r: np.ndarray

    def vertices(self) -> np.ndarray:
        """(N_ANGLES, 2) outline vertices (x, y)."""
        return np.stack([self.cx + self.r * np.cos(_THETA), self.cy + self.r * np.sin(_THETA)], 1)

    def transformed(self, scale: float, dx: float = 0.0, dy: float = 0.0) -> "Shape":
        """Scale about the origin, then translate."""
        return Shape(self.cx * scale + dx, self.cy * scale + dy, self.r * scale)

    def signed_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Radial signed distance r(theta(p)) - |p - c|: > 0 inside, 0 on the outline.

        Args:
            x, y: arrays of point coordinates (any matching shape).
        Returns:
            Array of the same shape (px along the ray from the centre).
        """
        dx, dy = x - self.cx, y - self.cy
        pos = (np.arctan2(dy, dx) % (2.0 * np.pi)) * (N_ANGLES / (2.0 * np.pi))
        i0 = np.floor(pos).astype(np.intp)
        frac = pos - i0
        i0 %= N_ANGLES
        radius = self.r[i0] * (1.0 - frac) + self.r[(i0 + 1) % N_ANGLES] * frac
        return radius - np.hypot(dx, dy)


def _equal_area(r: np.ndarray) -> np.ndarray:
    """Rescale a radial function to equivalent-area radius 1 (area = pi * mean(r^2))."""
    return r / np.sqrt(np.mean(r ** 2))


def ellipse_radii(axis_ratio: float, angle: float) -> np.ndarray:
    """Radial function of an ellipse with semi-axes 1 and ``axis_ratio``, major axis at ``angle``.

    r(theta) = q / sqrt(q^2 cos^2(theta - psi) + sin^2(theta - psi)).
    """
    t = _THETA - angle
    q = axis_ratio
    return q / np.sqrt((q * np.cos(t)) ** 2 + np.sin(t) ** 2)


def smooth_radii(rng: np.random.Generator, axis_ratio: float, irregularity: float,
                 max_harmonic: int = 6) -> np.ndarray:
    """Smooth blob: an ellipse modulated by random harmonics, equal-area radius 1.

    r(theta) = ellipse(theta) * (1 + sum_{k=2..K} a_k cos(k theta + phi_k)),
    a_k ~ N(0, irregularity / k^0.7).
    """
    r = ellipse_radii(axis_ratio, rng.uniform(0.0, np.pi))
    k = np.arange(2, max_harmonic + 1)
    amp = rng.normal(0.0, 1.0, k.size) * irregularity / k ** 0.7
    phase = rng.uniform(0.0, 2.0 * np.pi, k.size)
    mod = 1.0 + (amp[:, None] * np.cos(k[:, None] * _THETA + phase[:, None])).sum(0)
    return _equal_area(r * np.clip(mod, 0.55, None))


def polygon_radii(rng: np.random.Generator, axis_ratio: float, irregularity: float) -> np.ndarray:
    """Flat polygonal cell (5-8 corners), equal-area radius 1.

    Corners on a jittered circle are stretched by (1, q) and rotated; along each ray the radius is
    the distance to the edge it crosses: t = (P_k x P_k+1) / (u x (P_k+1 - P_k)).
    """
    n = int(rng.integers(5, 9))
    ang = 2.0 * np.pi * (np.arange(n) + rng.uniform(-0.3, 0.3, n)) / n
    rad = 1.0 + rng.uniform(-irregularity, irregularity, n)
    psi = rng.uniform(0.0, np.pi)
    px, py = rad * np.cos(ang), rad * np.sin(ang) * axis_ratio
    cx, cy = px * np.cos(psi) - py * np.sin(psi), px * np.sin(psi) + py * np.cos(psi)
    corner_angle = np.arctan2(cy, cx) % (2.0 * np.pi)
    order = np.argsort(corner_angle)
    corner_angle, cx, cy = corner_angle[order], cx[order], cy[order]
    theta = np.where(_THETA < corner_angle[0], _THETA + 2.0 * np.pi, _THETA)
    edges = np.append(corner_angle, corner_angle[0] + 2.0 * np.pi)
    k = np.clip(np.searchsorted(edges, theta, side="right") - 1, 0, n - 1)
    k1 = (k + 1) % n
    ex, ey = cx[k1] - cx[k], cy[k1] - cy[k]
    ux, uy = np.cos(_THETA), np.sin(_THETA)
    r = (cx[k] * cy[k1] - cy[k] * cx[k1]) / (ux * ey - uy * ex)
    return _equal_area(r)


def add_processes(rng: np.random.Generator, r: np.ndarray, count: int) -> np.ndarray:
    """Cytoplasmic processes: Gaussian bumps in angle, r *= 1 + h exp(-(dtheta / w)^2 / 2)."""
    for _ in range(count):
        centre = rng.uniform(0.0, 2.0 * np.pi)
        height, width = rng.uniform(0.2, 0.5), rng.uniform(0.1, 0.22)
        d = np.angle(np.exp(1j * (_THETA - centre)))
        r = r * (1.0 + height * np.exp(-0.5 * (d / width) ** 2))
    return _equal_area(r)


def _min_clearance(outer: Shape, inner: Shape) -> float:
    """Smallest signed distance of ``inner``'s outline inside ``outer`` (< 0: it sticks out)."""
    v = inner.vertices()
    return float(outer.signed_distance(v[:, 0], v[:, 1]).min())


# ------------------------------------------------------------------------------------------------
# One cell in unit coordinates (cell equal-area radius 1, cell centre at the origin)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CellGeometry:
    """Outlines of one cell: the cell, its nucleus lobes (1 or 2, their union is the nucleus),
    an optional perinuclear halo, and the appearance numbers drawn for it."""

    cell: Shape
    nuclei: Tuple[Shape, ...]
    halo: Optional[Shape]
    cyt_density: float
    cyt_mix: np.ndarray
    cyt_edge: float
    nuc_density: float
    nuc_texture: float
    nuc_grain: float
    nuc_rim: float

    def transformed(self, scale: float, dx: float, dy: float) -> "CellGeometry":
        """Scale about the origin, then translate, every outline."""
        return dataclasses.replace(
            self, cell=self.cell.transformed(scale, dx, dy),
            nuclei=tuple(n.transformed(scale, dx, dy) for n in self.nuclei),
            halo=None if self.halo is None else self.halo.transformed(scale, dx, dy))


def _place_inside(cell: Shape, lobes_unit: List[Shape], halo_unit: Optional[Shape],
                  rng: np.random.Generator) -> Tuple[Tuple[Shape, ...], Optional[Shape]]:
    """Place the nucleus lobes (and halo) in the cell: a random offset, halved until everything
    lies inside with a margin; then the halo shrunk, then everything (cell_geometry's last step)."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    offset = rng.uniform(0.0, 0.35)
    scale_inner, scale_halo = 1.0, 1.0
    for _ in range(100):
        ox, oy = offset * np.cos(angle), offset * np.sin(angle)
        lobes = tuple(lobe.transformed(scale_inner, ox, oy) for lobe in lobes_unit)
        halo = None if halo_unit is None else \
            halo_unit.transformed(scale_inner * scale_halo, ox, oy)
        fits = all(_min_clearance(cell, lobe) >= 0.08 for lobe in lobes)
        fits = fits and (halo is None or _min_clearance(cell, halo) >= 0.05)
        if fits:
            break
        if offset > 0.02:
            offset *= 0.5
        elif halo is not None and scale_halo > 0.7:
            scale_halo *= 0.92
        else:
            scale_inner *= 0.92
    return lobes, halo


def cell_geometry(spec: ClassSpec, rng: np.random.Generator, stain: Stain) -> CellGeometry:
    """Draw one cell of class ``spec`` in unit coordinates (cell r_eq = 1, centred at 0).

    The nucleus (and halo) are placed off-centre at random and pulled towards the centre, then
    shrunk if needed, until they lie inside the cell with a margin.

    Args:
        spec: the class morphology.
        rng: the cell's generator.
        stain: the cluster's stain (sets the eosin / light green / orange G balance).
    Returns:
        A CellGeometry.
    """
    axis = rng.uniform(*spec.cell_axis)
    if spec.cell_polygonal:
        r_cell = polygon_radii(rng, axis, spec.cell_irregular)
    else:
        r_cell = smooth_radii(rng, axis, spec.cell_irregular, max_harmonic=5)
    if rng.random() < spec.p_processes:
        r_cell = add_processes(rng, r_cell, int(rng.integers(1, 4)))
    cell = Shape(0.0, 0.0, r_cell)

    pyknotic = rng.random() < spec.p_pyknotic
    nc = rng.uniform(*spec.nc_ratio) * (rng.uniform(0.55, 0.75) if pyknotic else 1.0) \
        * stain.nucleus_scale
    binucleate = rng.random() < spec.p_binucleate
    lobes_unit: List[Shape] = []
    if binucleate:
        # Two lobes of r_eq 0.8 nc, overlapping: their centres are 60-85 % of the sum of the radii
        # facing each other apart (union about 1.1-1.2x the area of one nucleus of ratio nc).
        r_lobe = nc * 0.8
        radii = [smooth_radii(rng, rng.uniform(*spec.nuc_axis), rng.uniform(*spec.nuc_irregular), 8)
                 * r_lobe for _ in range(2)]
        j = int(rng.integers(N_ANGLES // 2))             # lobe 0 faces lobe 1 along _THETA[j]
        sep = 0.5 * rng.uniform(0.6, 0.85) * (radii[0][j] + radii[1][j + N_ANGLES // 2])
        ux, uy = np.cos(_THETA[j]), np.sin(_THETA[j])
        lobes_unit = [Shape(-sep * ux, -sep * uy, radii[0]), Shape(sep * ux, sep * uy, radii[1])]
    else:
        irregular = 0.01 if pyknotic else rng.uniform(*spec.nuc_irregular)
        r = smooth_radii(rng, rng.uniform(*spec.nuc_axis), irregular, 8)
        lobes_unit.append(Shape(0.0, 0.0, r * nc))
    halo_unit = None
    if spec.halo is not None:
        extent = max(float(np.max(np.hypot(lobe.cx, lobe.cy) + lobe.r)) for lobe in lobes_unit)
        r_halo = smooth_radii(rng, rng.uniform(0.7, 1.0), 0.12, 6)
        halo_unit = Shape(0.0, 0.0, r_halo * max(nc * rng.uniform(*spec.halo), extent * 1.3))

    lobes, halo = _place_inside(cell, lobes_unit, halo_unit, rng)

    mix = rng.dirichlet(spec.cyt_mix) * np.exp(stain.mix_bias)
    nuc_density = rng.uniform(*spec.nuc_density)
    texture, grain, rim = spec.nuc_texture, spec.nuc_grain, spec.nuc_rim
    if pyknotic:
        nuc_density, texture, grain, rim = rng.uniform(1.8, 2.6), 0.05, 1.0, 0.0
    return CellGeometry(cell=cell, nuclei=lobes, halo=halo,
                        cyt_density=float(rng.uniform(*spec.cyt_density)),
                        cyt_mix=mix / mix.sum(), cyt_edge=spec.cyt_edge,
                        nuc_density=float(nuc_density),
                        nuc_texture=texture, nuc_grain=grain, nuc_rim=rim)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, rescaled to zero mean and unit standard deviation."""
    from skimage.filters import gaussian

    field = gaussian(rng.standard_normal(shape), sigma=sigma, mode="reflect")
    field -= field.mean()
    return field / max(float(field.std()), 1e-12)


def _soft(d: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of a signed-distance map: 0 outside, 1 inside, a 1 px ramp."""
    return np.clip(d + 0.5, 0.0, 1.0)


def outline(d: np.ndarray) -> np.ndarray:
    """The longest zero contour of a signed-distance map, as (P, 2) x, y vertices in the crop.

    The map is padded with an outside value so that a shape cut by the crop edge still gives a
    closed contour; vertices are then clipped to [0, w-1] x [0, h-1].

    Args:
        d: (h, w) signed distance, > 0 inside.
    Returns:
        (P, 2) float vertices (x = column, y = row), not repeating the first one at the end.
    """
    from skimage.measure import find_contours

    h, w = d.shape
    contours = find_contours(np.pad(d, 1, constant_values=-1.0), 0.0)
    rc = max(contours, key=len)[:-1] - 1.0
    return np.stack([np.clip(rc[:, 1], 0.0, w - 1.0), np.clip(rc[:, 0], 0.0, h - 1.0)], 1)


def cell_density_maps(geom: CellGeometry, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stain density maps of one cell on the pixel grid (x, y).

    cytoplasm = D_c * cover * (1 + edge e^{-d/3}) * (1 + 0.15 n_2.5), cleared inside the halo
                (to 5-18 %) with a condensed rim e^{-|d_halo|/2};
    nucleus   = D_n * cover_n * (1 + texture n_grain + rim e^{-d_n/1.2}),
    with cover = the anti-aliased inside, d the distance to the outline, n_s unit smooth noise.

    Args:
        geom: the cell in pixel coordinates.
        x, y: (h, w) pixel-centre coordinates.
        rng: the cell's generator.
    Returns:
        (cytoplasm density, nucleus density, cell distance map, nucleus distance map).
    """
    d_cell = geom.cell.signed_distance(x, y)
    d_nuc = np.max([lobe.signed_distance(x, y) for lobe in geom.nuclei], axis=0)
    cover = _soft(d_cell)
    cyt = cover * (1.0 + geom.cyt_edge * np.exp(-np.clip(d_cell, 0.0, None) / 3.0))
    cyt *= 1.0 + 0.15 * smooth_noise(rng, x.shape, 2.5)
    if geom.halo is not None:
        d_halo = geom.halo.signed_distance(x, y)
        clear = rng.uniform(0.05, 0.18)
        cyt = cyt * (1.0 - (1.0 - clear) * _soft(d_halo)) \
            + rng.uniform(0.5, 0.9) * np.exp(-np.abs(d_halo) / 2.0) * cover
    nuc = _soft(d_nuc) * (1.0 + geom.nuc_texture * smooth_noise(rng, x.shape, geom.nuc_grain)
                          + geom.nuc_rim * np.exp(-np.clip(d_nuc, 0.0, None) / 1.2))
    return (geom.cyt_density * np.clip(cyt, 0.0, None), geom.nuc_density * np.clip(nuc, 0.0, None),
            d_cell, d_nuc)


def _crop_frame(shapes: Sequence[Shape], size: int, rng: np.random.Generator
                ) -> Tuple[int, int, float, float, float]:
    """Crop around the cell outlines as a person would: random margins, sometimes cutting the cell.

    Returns:
        (h, w, scale, dx, dy): pixel = unit * scale + (dx, dy).
    """
    v = np.concatenate([s.vertices() for s in shapes])
    (xmin, ymin), (xmax, ymax) = v.min(0), v.max(0)
    extent = max(xmax - xmin, ymax - ymin)
    margin = rng.uniform(0.04, 0.18, 4) * extent          # left, right, top, bottom
    if rng.random() < 0.1:
        margin[rng.integers(4)] = -rng.uniform(0.0, 0.06) * extent
    w0 = xmax - xmin + margin[0] + margin[1]
    h0 = ymax - ymin + margin[2] + margin[3]
    scale = size / max(w0, h0)
    w, h = max(8, int(round(w0 * scale))), max(8, int(round(h0 * scale)))
    return h, w, scale, (margin[0] - xmin) * scale, (margin[2] - ymin) * scale


def _add_surroundings(od: np.ndarray, rng: np.random.Generator, stain: Stain, x: np.ndarray,
                      y: np.ndarray, scale: float, cyt_strength: float) -> None:
    """Add to the optical density ``od`` (in place) what surrounds a cell in its crop:
    neighbouring cells cut by the crop edge (pale, no nucleus in view) and debris specks."""
    h, w = od.shape[:2]
    for _ in range(min(int(rng.poisson(0.7)), 2)):
        r_eq = scale * rng.uniform(0.5, 1.0)
        side, t = int(rng.integers(4)), rng.uniform(0.0, 1.0)
        out = r_eq * rng.uniform(0.3, 0.9)
        cx, cy = [(-out, t * h), (w - 1 + out, t * h), (t * w, -out), (t * w, h - 1 + out)][side]
        frag = Shape(cx, cy, r_eq * smooth_radii(rng, rng.uniform(0.6, 1.0), 0.06))
        mix = rng.dirichlet((1.0, 1.0, 1.0)) * np.exp(stain.mix_bias)
        od += (_soft(frag.signed_distance(x, y)) * rng.uniform(0.1, 0.4))[..., None] \
            * (cyt_strength * (mix / mix.sum()) @ stain.od[1:])
    for _ in range(int(rng.poisson(stain.debris))):
        px, py, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.7, 2.0)
        speck = _soft(rad - np.hypot(x - px, y - py)) * rng.uniform(0.4, 1.2)
        od += speck[..., None] * stain.od[int(rng.integers(4))]


def render_cell(cls: str, rng: np.random.Generator, stain: Stain, size: int,
                difficulty: Difficulty = DIFFICULTIES["default"],
                phenotype: Optional[Phenotype] = None
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one cell crop of class ``cls`` under a cluster's ``stain``.

    Args:
        cls: one of CLASSES.
        rng: the cell's generator (everything random about the cell comes from it).
        stain: the cluster image's stain and imaging conditions (sample_stain).
        size: the crop's longer side in px (the shorter one follows the cell's shape).
        difficulty: the generator's setting (atypical cells and widened ranges in "hard").
        phenotype: the cluster image's shared phenotype (sample_phenotype), or None.
    Returns:
        (rgb uint8 (h, w, 3), nucleus polygon (P, 2), cytoplasm polygon (Q, 2)); polygons are
        x, y vertices in the crop's pixel coordinates (the cell outline includes any companion
        cells of a dyskeratotic clump; the nucleus is the main cell's, lobes merged).
    Raises:
        SyntheticError: unknown class or size below 8 px.
    """
    if cls not in CLASS_SPECS:
        raise SyntheticError(f"cls={cls!r}: unknown class; use one of {', '.join(CLASSES)}")
    if size < 8:
        raise SyntheticError(f"size={size}: crops need at least 8 px; raise size")
    spec = CLASS_SPECS[cls]
    if difficulty.name != "default" and phenotype is not None:
        if phenotype.atypical_as is not None:
            spec = CLASS_SPECS[phenotype.atypical_as]
        spec = phenotype_spec(widened(spec, difficulty.widen), phenotype,
                              difficulty.cluster_phenotype)
    elif difficulty.name != "default":
        if rng.random() < difficulty.p_atypical:
            spec = CLASS_SPECS[NEIGHBOURS[cls][int(rng.integers(len(NEIGHBOURS[cls])))]]
        spec = widened(spec, difficulty.widen)
    cells = [cell_geometry(spec, rng, stain)]
    if rng.random() < spec.p_clump:
        for _ in range(int(rng.integers(1, 3))):
            s = rng.uniform(0.6, 0.95)
            phi, dist = rng.uniform(0.0, 2.0 * np.pi), (1.0 + s) * rng.uniform(0.5, 0.75)
            cells.append(cell_geometry(spec, rng, stain).transformed(
                s, dist * np.cos(phi), dist * np.sin(phi)))
    h, w, scale, dx, dy = _crop_frame([c.cell for c in cells], size, rng)
    cells = [c.transformed(scale, dx, dy) for c in cells]
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)

    nuc_strength = stain.nuclear_strength * (1.0 + rng.normal(0.0, 0.05))
    cyt_strength = stain.cyto_strength * (1.0 + rng.normal(0.0, 0.05))
    od = np.zeros((h, w, 3))
    d_cells = []
    for i, geom in enumerate(cells):
        cyt, nuc, d_cell, d_nuc = cell_density_maps(geom, x, y, rng)
        od += cyt[..., None] * (cyt_strength * geom.cyt_mix @ stain.od[1:])
        od += nuc[..., None] * (nuc_strength * stain.od[0])
        d_cells.append(d_cell)
        if i == 0:
            d_main_nucleus = d_nuc

    _add_surroundings(od, rng, stain, x, y, scale, cyt_strength)

    haze = np.clip(1.0 + stain.texture * smooth_noise(rng, (h, w), stain.texture_scale), 0.0, None)
    od += haze[..., None] * stain.haze_od
    white = stain.white * (1.0 + rng.normal(0.0, 0.015))
    light = 1.0 + (stain.gradient[0] * (x - w / 2.0) + stain.gradient[1] * (y - h / 2.0)) / size
    img = light[..., None] * white * np.exp(-od)

    from skimage.filters import gaussian

    img = gaussian(img, sigma=stain.blur, mode="nearest", channel_axis=-1, preserve_range=True)
    img += rng.normal(0.0, stain.noise, img.shape)
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return rgb, outline(d_main_nucleus), outline(np.max(d_cells, axis=0))


# ------------------------------------------------------------------------------------------------
# Dataset layout
# ------------------------------------------------------------------------------------------------

def cluster_sizes(n_cells: int, n_clusters: int, rng: np.random.Generator,
                  max_per_cluster: Optional[int] = None) -> np.ndarray:
    """Split ``n_cells`` into ``n_clusters`` cluster images of 1..max_per_cluster cells each.

    Every cluster gets one cell; the rest are dealt multinomially with exponential weights (many
    small clusters, a few large ones, as in SIPaKMeD), overflow above the cap dealt again.

    Args:
        n_cells: cells of the class.
        n_clusters: cluster images of the class.
        rng: generator.
        max_per_cluster: cap; default max(8, ceil(2 * n_cells / n_clusters)).
    Returns:
        (n_clusters,) int array summing to n_cells.
    Raises:
        SyntheticError: the counts cannot be met (n_clusters < 1, > n_cells, or below n / cap).
    """
    if n_clusters < 1 or n_clusters > n_cells:
        raise SyntheticError(f"clusters_per_class={n_clusters}: need 1 <= clusters <= cells "
                             f"({n_cells}); lower clusters_per_class or raise per_class")
    if max_per_cluster is not None and max_per_cluster < 1:
        raise SyntheticError(f"max_per_cluster={max_per_cluster}: must be 1 or more")
    cap = max_per_cluster or max(8, math.ceil(2 * n_cells / n_clusters))
    if n_cells > cap * n_clusters:
        raise SyntheticError(f"clusters_per_class={n_clusters}: {n_cells} cells need at least "
                             f"{math.ceil(n_cells / cap)} clusters of <= {cap}; raise it")
    weights = rng.exponential(1.0, n_clusters) + 1e-6
    sizes = np.ones(n_clusters, dtype=np.int64)
    rest = n_cells - n_clusters
    while rest > 0:
        room = cap - sizes
        p = weights * (room > 0)
        sizes += rng.multinomial(rest, p / p.sum())
        rest = int(np.clip(sizes - cap, 0, None).sum())
        sizes = np.minimum(sizes, cap)
    return sizes


def _per_class(value, name: str, missing: Optional[int] = 0) -> Dict[str, Optional[int]]:
    """An int for every class, or a {class: int} dict (absent classes get ``missing``)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(CLASSES))
        if unknown:
            raise SyntheticError(f"{name}: unknown class {unknown[0]!r}; use {', '.join(CLASSES)}")
        out = {c: value.get(c, missing) for c in CLASSES}
    else:
        out = {c: value for c in CLASSES}
    for c, n in out.items():
        if n is None and missing is None:
            continue
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise SyntheticError(f"{name}: {c} = {n!r}; give a whole number >= 0")
    return {c: None if n is None else int(n) for c, n in out.items()}


def default_clusters(n_cells: int, cls: str) -> int:
    """Cluster images for ``n_cells`` cells: the real SIPaKMeD cells-per-cluster of the class.

    k = round(n * FULL_CLUSTERS[cls] / FULL_COUNTS[cls]) clipped to [min(n, 3), n]: 4049 cells ->
    966 clusters overall (4.2 per cluster), exactly FULL_CLUSTERS for FULL_COUNTS; at least 3
    clusters whenever possible, so a grouped train/val/test split can hold every class.
    """
    k = round(n_cells * FULL_CLUSTERS[cls] / FULL_COUNTS[cls])
    return int(min(max(min(n_cells, 3), k), n_cells))


def plan_layout(per_class: Union[int, Mapping[str, int]] = 60,
                clusters_per_class: Union[None, int, Mapping[str, int]] = None, seed: int = 0,
                stems: Optional[Mapping[str, Sequence[str]]] = None
                ) -> Dict[str, List[Tuple[int, int]]]:
    """Which cells to generate: {class: [(NNN, MM), ...]} in file-name order.

    Args:
        per_class: cells per class, an int or {class: n} (FULL_COUNTS for the real sizes).
        clusters_per_class: cluster images per class, an int or {class: k} (absent classes and
            None -> default_clusters).
        seed: base seed (the allocation of cells to clusters depends on seed, class, n, k).
        stems: exact ``NNN_MM`` stems per class (e.g. stems_from_csv of the study's split);
            overrides per_class and clusters_per_class.
    Returns:
        {class: [(cluster, cell), ...]} for classes with at least one cell.
    Raises:
        SyntheticError: bad counts or stems.
    """
    if stems is not None:
        pairs = _per_class_stems(stems)
        layout = {c: pairs[c] for c in CLASSES if c in pairs}
        if not layout:
            raise SyntheticError("stems: no cells listed; give at least one 'NNN_MM' stem")
        return layout
    counts = _per_class(per_class, "per_class")
    if sum(counts.values()) == 0:
        raise SyntheticError("per_class: no cells requested; give at least 1 cell")
    given = {} if clusters_per_class is None else \
        _per_class(clusters_per_class, "clusters_per_class", missing=None)
    clusters = {c: given[c] if given.get(c) is not None else default_clusters(n, c) if n else 0
                for c, n in counts.items()}
    layout = {}
    for ci, cls in enumerate(CLASSES):
        n, k = counts[cls], clusters[cls]
        if n == 0:
            continue
        sizes = cluster_sizes(n, k, np.random.default_rng([seed, 3, ci, n, k]))
        layout[cls] = [(i + 1, j + 1) for i, m in enumerate(sizes) for j in range(int(m))]
    return layout


def _per_class_stems(stems: Mapping[str, Sequence[str]]) -> Dict[str, List[Tuple[int, int]]]:
    out = {}
    for cls, names in stems.items():
        if cls not in CLASSES:
            raise SyntheticError(f"stems: unknown class {cls!r}; use {', '.join(CLASSES)}")
        pairs = set()
        for name in names:
            parts = str(name).split("_")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise SyntheticError(f"stems: {cls}/{name!r} is not 'NNN_MM' with NNN, MM >= 1")
            pairs.add((int(parts[0]), int(parts[1])))
        if pairs:
            out[cls] = sorted(pairs)
    return out


def stems_from_csv(path: os.PathLike) -> Dict[str, List[str]]:
    """Read {class: [stem, ...]} from a CSV with ``class`` and ``stem`` columns (others ignored),
    e.g. data/splits/thesis_split.csv, so the synthetic set has the real SIPaKMeD file names.

    Raises:
        SyntheticError: the file is unreadable or lacks the columns.
    """
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SyntheticError(f"{path}: cannot read stems CSV ({type(exc).__name__}); "
                             f"give a CSV with class and stem columns") from None
    if not rows or not {"class", "stem"} <= set(rows[0]):
        raise SyntheticError(f"{path}: needs 'class' and 'stem' columns; fix the CSV header")
    out: Dict[str, List[str]] = {}
    for row in rows:
        out.setdefault(row["class"], []).append(row["stem"])
    try:
        _per_class_stems(out)          # every name must be a class and an NNN_MM stem
    except SyntheticError as exc:
        raise SyntheticError(f"{path}: {exc}; fix the CSV") from None
    return out


def format_dat(polygon: np.ndarray) -> str:
    """Contour file text: one ``x,y`` line per vertex, two decimals (as SIPaKMeD's .dat files)."""
    return "".join(f"{x:.2f},{y:.2f}\n" for x, y in np.asarray(polygon, dtype=np.float64))


def _write_bmp(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(path, format="BMP")


def crop_size(cls: str, rng: np.random.Generator, size_range: Tuple[int, int],
              magnification: float = 1.0) -> int:
    """Longer crop side: lognormal around the class median times the cluster's magnification
    (sd 0.18 in log), rounded and clipped to ``size_range``."""
    median = CLASS_SPECS[cls].long_side * magnification
    return int(np.clip(round(median * math.exp(rng.normal(0.0, 0.18))), *size_range))



def _check_args(seed, size_range) -> Tuple[int, int]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SyntheticError(f"seed={seed!r}: give a whole number >= 0")
    try:
        lo, hi = (int(v) for v in size_range)
    except (TypeError, ValueError):
        raise SyntheticError(f"size_range={size_range!r}: give (min, max) in px, e.g. (60, 160)") \
            from None
    if not 8 <= lo <= hi:
        raise SyntheticError(f"size_range={size_range!r}: need 8 <= min <= max; e.g. (60, 160)")
    return lo, hi


def generate(out_dir: os.PathLike, per_class: Union[int, Mapping[str, int]] = 60,
             clusters_per_class: Union[None, int, Mapping[str, int]] = None, seed: int = 0,
             size_range: Tuple[int, int] = (60, 160), progress: ProgressArg = None,
             overwrite: bool = False, stems: Optional[Mapping[str, Sequence[str]]] = None,
             difficulty: str = "default") -> dict:
    """Write a synthetic SIPaKMeD-like dataset in the official nested layout.

    Everything is written to a staging folder beside ``out_dir`` and renamed into place at the end,
    so an interrupted run leaves nothing half-written. Same arguments -> byte-identical files, and a
    file depends only on (seed, class, NNN, MM): asking for more cells or classes later does not
    change the stain or pixels of a given ``NNN_MM`` (the allocation of cells to clusters does
    depend on the counts).

    Args:
        out_dir: target folder; must not exist or be empty unless ``overwrite``.
        per_class: cells per class, an int or {class: n}; FULL_COUNTS gives the real 4049.
        clusters_per_class: cluster images per class, an int or {class: k}; by default (and for
            classes absent from the dict) each class keeps its real SIPaKMeD cells per cluster
            (default_clusters), so FULL_COUNTS gives the real 966 cluster images.
        seed: base seed (>= 0).
        size_range: (min, max) of a crop's longer side in px.
        progress: None, or ``progress(step, done, total)`` after every cell.
        overwrite: replace a non-empty ``out_dir``.
        stems: exact ``NNN_MM`` stems per class (stems_from_csv); overrides the counts.
        difficulty: "default" (easy, cell cues decide) or "hard" (overlapping classes, strongly
            clustered conditions; see Difficulty).
    Returns:
        Summary dict: out_dir, seed, counts {class: cells}, clusters {class: cluster images},
        n_cells, n_clusters.
    Raises:
        SyntheticError: bad arguments, or ``out_dir`` exists and is not empty (without overwrite).
    """
    lo, hi = _check_args(seed, size_range)
    seed = int(seed)
    if difficulty not in DIFFICULTIES:
        raise SyntheticError(f"difficulty={difficulty!r}: choose one of {', '.join(DIFFICULTIES)}")
    setting = DIFFICULTIES[difficulty]
    layout = plan_layout(per_class, clusters_per_class, seed, stems)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SyntheticError(f"out_dir {out}: exists and is not empty; choose a new folder or "
                             f"pass overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    total = sum(len(cells) for cells in layout.values())
    try:
        done = 0
        for cls, cells in layout.items():
            ci = CLASSES.index(cls)
            folder = stage / f"im_{cls}" / f"im_{cls}" / "CROPPED"
            folder.mkdir(parents=True)
            stain, stain_of, phenotype = None, None, None
            for nnn, mm in cells:
                if stain_of != nnn:
                    stain = sample_stain(np.random.default_rng([seed, 1, ci, nnn]),
                                         setting.cluster_spread)
                    phenotype = sample_phenotype(np.random.default_rng([seed, 4, ci, nnn]),
                                                 cls, setting)
                    stain_of = nnn
                rng = np.random.default_rng([seed, 2, ci, nnn, mm])
                size = crop_size(cls, rng, (lo, hi), stain.magnification)
                rgb, nuc, cyt = render_cell(cls, rng, stain, size, setting, phenotype)
                stem = f"{nnn:03d}_{mm:02d}"
                _write_bmp(folder / f"{stem}.bmp", rgb)
                (folder / f"{stem}_nuc.dat").write_text(format_dat(nuc))
                (folder / f"{stem}_cyt.dat").write_text(format_dat(cyt))
                done += 1
                if progress is not None and (done == total or done % max(1, total // 50) == 0):
                    progress("synthetic cells", done, total)
        summary = {
            "out_dir": str(out),
            "seed": seed,
            "generator_version": GENERATOR_VERSION,
            "size_range": [lo, hi],
            "counts": {c: len(v) for c, v in layout.items()},
            "clusters": {c: len({nnn for nnn, _ in v}) for c, v in layout.items()},
        }
        if difficulty != "default":     # the default set's synthetic.json stays as it was
            summary["difficulty"] = dataclasses.asdict(setting)
        summary["n_cells"] = sum(summary["counts"].values())
        summary["n_clusters"] = sum(summary["clusters"].values())
        info = {k: v for k, v in summary.items() if k != "out_dir"}
        (stage / "synthetic.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        from cervical import files

        files.swap_in(stage, out)          # the one rename-into-place of a finished folder
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return summary


# ------------------------------------------------------------------------------------------------
# A ground-truth benchmark for saliency maps: the class lies in a small inclusion at a known place
# ------------------------------------------------------------------------------------------------
#
# On real crops a cell sits in the middle and its nucleus is the darkest thing in it, so a fixed
# centred Gaussian and a "1 - grey level" map find the nucleus about as well as any saliency method
# (docs/xai.md). Whether a method shows where the *model's evidence* is cannot be read off such
# data. ``cue_cells`` makes a two-class set in which the evidence has a known place that is neither
# the centre nor the darkest blob: every cell (any of the five morphologies, its own stain) is put
# at a random place on a larger canvas, and a small inclusion is drawn in its cytoplasm, away from
# the nucleus and from the canvas centre. Class 1: a ring; class 0: a filled disk of the same outer
# radius and the same integrated optical density. Nothing else differs between the classes.

#: Version of the cue-cell generator (bump when the same seed would give other pixels).
CUE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CueSet:
    """The cells of :func:`cue_cells` and everything drawn for them (N cells, canvas S px).

    Attributes:
        images: uint8 (N, S, S, 3).
        labels: int64 (N,): 1 ring, 0 disk (with the cue); a fair coin (without it).
        masks: uint8 (N, S, S): 2 the inclusion's disc (|p - c| <= R + 1/2: every pixel the
            inclusion darkens, ring hole included), 1 the rest of the cell, 0 background.
        nucleus: bool (N, S, S) the main cell's nucleus.
        placebo: bool (N, S, S) a second disc of the same radius drawn by the same rule and
            disjoint from the first (never drawn on; ``_site_pair``): a site exchangeable with
            the true one when the image carries no cue.
        centres: float64 (N, 2) inclusion centres (x = column, y = row).
        placebo_centres: float64 (N, 2).
        radii: float64 (N,) outer radius R (px).
        inner: float64 (N,) inner radius of the ring (drawn for every cell, used by rings only).
        total_od: float64 (N,) integrated optical density A of the inclusion (see
            :func:`draw_inclusion`); drawn independently of the label.
        od_vectors: float64 (N, 3) unit RGB optical-density vector of the inclusion's stain.
        cell_classes: (N,) morphology drawn for each cell (a CLASSES name; no label information).
        attempts: int64 (N,) cells drawn until one had room for both sites (1 = first).
        cue: whether the inclusion was drawn.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    nucleus: np.ndarray
    placebo: np.ndarray
    centres: np.ndarray
    placebo_centres: np.ndarray
    radii: np.ndarray
    inner: np.ndarray
    total_od: np.ndarray
    od_vectors: np.ndarray
    cell_classes: Tuple[str, ...]
    attempts: np.ndarray
    cue: bool


@dataclasses.dataclass(frozen=True)
class CueGeometry:
    """Sizes of :func:`cue_cells` as fractions of the canvas side S (so a set scales with S).

    Attributes:
        crop: (low, high) longer side of the rendered cell crop (``render_cell``'s size).
        radius: (low, high) outer radius R of the inclusion.
        inner: (low, high) ring inner radius as a fraction of R.
        min_centre: smallest distance of the inclusion centre from the canvas centre.
        gap: smallest distance between the inclusion's disc and the nucleus (or any pixel as dark
            as a nucleus, e.g. a companion cell's) and, minus 1 px, the cell outline.
        peak_od: (low, high) optical density of the disk (the ring's is higher, see
            :func:`inclusion_profile`).
    """

    crop: Tuple[float, float] = (0.6, 0.8)
    radius: Tuple[float, float] = (0.06, 0.08)
    inner: Tuple[float, float] = (0.5, 0.6)
    min_centre: float = 0.2
    gap: float = 0.03
    peak_od: Tuple[float, float] = (0.5, 1.0)


def inclusion_profile(shape: Tuple[int, int], cx: float, cy: float, radius: float, inner: float,
                      ring: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The optical-density profile of a disk or ring inclusion, and its disc.

    With d(p) the distance of pixel centre p from (cx, cy) and soft(t) = clip(t + 1/2, 0, 1) the
    anti-aliased coverage of ``_soft``:
        disk:  P(p) = soft(R - d)
        ring:  P(p) = k (soft(R - d) - soft(r - d)),  k = sum soft(R - d) / sum (soft(R - d) - soft(r - d))
    so both have the same sum over the pixel grid, sum_p P(p) = sum_p soft(R - d(p)) (equal
    integrated density, hence equal total absorbance for the same strength), and the ring is k
    times as dense where it is. Support: P > 0 only where d < R + 1/2, inside the returned disc
    d <= R + 1/2.

    Example (R = 1 centred on a pixel): soft = 1 at the centre, 1/2 at the 4 direct neighbours,
    1.5 - sqrt(2) at the 4 diagonal ones; sum 3 + 4 (1.5 - sqrt(2)); the disc holds those 9 pixels.

    Args:
        shape: (H, W).
        cx, cy: centre (x = column, y = row).
        radius: outer radius R > 0.
        inner: ring inner radius r, 0 < r < R (ignored for a disk).
        ring: ring (True) or disk (False).
    Returns:
        (profile float64 (H, W), disc bool (H, W)).
    Raises:
        SyntheticError: on radii out of range.
    """
    if not 0.0 < float(radius) or (ring and not 0.0 < float(inner) < float(radius)):
        raise SyntheticError(f"radius={radius}, inner={inner}: need 0 < inner < radius")
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    d = np.hypot(x - cx, y - cy)
    outer = _soft(radius - d)
    disc = d <= radius + 0.5
    if not ring:
        return outer, disc
    band = outer - _soft(inner - d)
    return band * (outer.sum() / band.sum()), disc


def draw_inclusion(image: np.ndarray, profile: np.ndarray, peak_od: float,
                   od_vector: np.ndarray) -> np.ndarray:
    """Beer-Lambert absorption by an inclusion: I'(p) = I(p) exp(-peak_od P(p) a), a the RGB
    optical-density vector (unit norm), rounded to 8 bits and clipped to [1, 255] where P > 0; every
    pixel with P = 0 keeps its value.

    Summed over pixels and channels, log(I / I') = A sum_c a_c with A = peak_od sum_p P(p), the
    integrated optical density, up to rounding (|error| <= 0.5 / I' per pixel and channel).

    Args:
        image: (H, W, 3) image (8-bit values).
        profile: (H, W) profile P (:func:`inclusion_profile`).
        peak_od: density where P = 1.
        od_vector: (3,) stain optical-density vector.
    Returns:
        uint8 (H, W, 3).
    """
    x = np.asarray(image, dtype=np.float64)
    od = float(peak_od) * profile[..., None] * np.asarray(od_vector, dtype=np.float64)
    out = np.where(profile[..., None] > 0.0, np.clip(np.rint(x * np.exp(-od)), 1, 255), np.rint(x))
    return np.clip(out, 0, 255).astype(np.uint8)


def _feather(h: int, w: int, width: int = 3) -> np.ndarray:
    """(h, w, 1) paste weight: 1 inside, falling linearly to 1 / (width + 1) on the crop's edge."""
    r = np.minimum(np.arange(h), np.arange(h)[::-1])[:, None]
    c = np.minimum(np.arange(w), np.arange(w)[::-1])[None, :]
    return np.minimum(1.0, (np.minimum(r, c) + 1.0) / (width + 1.0))[..., None]


def _cell_on_canvas(rng: np.random.Generator, size: int, geo: CueGeometry):
    """A random cell rendered by ``render_cell`` and pasted at a random place on an S x S canvas.

    The canvas is the crop's background colour (median of its outer pixel ring) plus the stain's
    sensor noise; the crop is blended in with a 3-px linear feather so its edge leaves no step.

    Returns:
        (canvas float64 (S, S, 3) of 8-bit values, cell mask, nucleus mask, class, stain, bg (3,)).
    """
    from cervical.data import rasterize_polygon

    cls = CLASSES[int(rng.integers(len(CLASSES)))]
    stain = sample_stain(rng)
    crop = int(round(size * rng.uniform(*geo.crop)))
    rgb, nuc, cyt = render_cell(cls, rng, stain, crop)
    h, w = rgb.shape[:2]
    top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]).astype(np.float64)
    bg = np.median(ring, axis=0)
    canvas = bg + rng.normal(0.0, stain.noise, (size, size, 3))
    a = _feather(h, w)
    canvas[top:top + h, left:left + w] = a * rgb + (1.0 - a) * canvas[top:top + h, left:left + w]
    canvas = np.clip(np.rint(canvas), 0, 255)
    shift = np.array([left, top], dtype=np.float64)
    cell = rasterize_polygon(cyt + shift, (size, size))
    nucleus = rasterize_polygon(nuc + shift, (size, size))
    return canvas, cell, nucleus, cls, stain, bg


def _inclusion_sites(canvas: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, bg: np.ndarray,
                     radius: float, geo: CueGeometry) -> np.ndarray:
    """(K, 2) integer (row, col) centres where an inclusion of radius R, moved by up to 1/2 px
    along each axis, has its disc (R + 1/2) at least 1 px inside the cell, at least ``gap`` from
    the nucleus and from any nucleus-dark pixel, and its centre at least ``min_centre`` from the
    canvas centre. Nucleus-dark: mean optical density log(bg / I) (Gaussian sigma 1) at least 0.6
    times the nucleus' median (companion cells' nuclei, debris)."""
    from scipy import ndimage
    from skimage.filters import gaussian

    s = canvas.shape[0]
    reach = radius + 0.5 + math.sqrt(0.5)                # disc radius plus the largest jitter
    od = np.log(bg / np.maximum(canvas, 1.0)).mean(axis=-1)
    od = gaussian(od, sigma=1.0, mode="nearest")
    dark = nucleus | (od >= 0.6 * float(np.median(od[nucleus]))) if nucleus.any() else od > 1e9
    inside = ndimage.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
    away = ndimage.distance_transform_edt(~dark) if dark.any() else np.full(cell.shape, np.inf)
    yy, xx = np.mgrid[0:s, 0:s]
    far = np.hypot(xx - (s - 1) / 2.0, yy - (s - 1) / 2.0) >= geo.min_centre * s + math.sqrt(0.5)
    ok = (inside >= reach + 1.0) & (away >= reach + geo.gap * s) & far
    return np.argwhere(ok)


def _site_pair(rng: np.random.Generator, sites: np.ndarray, radius: float,
               tries: int = 200) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Two sites (x, y) whose discs (R + 1/2) do not touch: the inclusion's and the placebo's.

    Each is a uniform draw from ``sites`` moved by U(-1/2, 1/2) px along each axis; the pair is
    drawn again until the centres lie more than 2 R + 1 apart. Accepting or rejecting a pair
    depends on it symmetrically, so the accepted pair is exchangeable: swapping the two sites
    gives a pair of the same probability, and with nothing drawn a map cannot tell them apart.
    None when ``tries`` draws found no such pair (the cell is then drawn again).
    """
    for _ in range(tries):
        rc = sites[rng.integers(len(sites), size=2)]
        pair = rc[:, ::-1].astype(np.float64) + rng.uniform(-0.5, 0.5, (2, 2))
        if np.hypot(*(pair[0] - pair[1])) > 2.0 * radius + 1.0:
            return pair[0], pair[1]
    return None


def cue_cells(n: int, size: int = 64, seed: int = 0, cue: bool = True,
              geometry: CueGeometry = CueGeometry(), max_attempts: int = 50) -> CueSet:
    """A two-class set whose class is decided only by an inclusion at a known, varying place.

    Cell i (i = 0..n-1): its label is a fair coin from ``default_rng([seed, 11, i])``; its cell,
    stain, canvas position, inclusion radius R ~ U(radius) S, ring inner radius r ~ U(inner) R,
    peak density ~ U(peak_od), site and placebo site come from ``default_rng([seed, 10, i,
    attempt])``. So a cell depends only on (seed, i, size, geometry), never on n, and
    ``cue=False`` draws exactly the same cells, labels and sites.

    1. A cell of a random morphology (uniform over CLASSES, so morphology says nothing about the
       label), its own stain (``sample_stain``), is rendered by ``render_cell`` at a crop side of
       U(crop) S and pasted at a uniformly random place on an S x S canvas of its background colour
       (cells are not centred).
    2. The inclusion site is drawn uniformly from the centres where its disc lies inside the
       cytoplasm, clear of the nucleus by ``gap`` S and at least ``min_centre`` S from the canvas
       centre (``_inclusion_sites``), together with a placebo site drawn by the same rule whose
       disc does not touch it (``_site_pair``); when there is no such pair the cell is drawn
       again (``attempts``).
    3. With ``cue``: the inclusion is drawn by Beer-Lambert absorption with the stain's
       hematoxylin vector (:func:`draw_inclusion`): label 1 a ring, label 0 a disk of the same
       outer radius and the same integrated optical density A = peak_od sum_p soft(R - d(p))
       (:func:`inclusion_profile`). The two classes differ in shape only, at one place.
       Without ``cue`` nothing is drawn: the label is a coin flip that no pixel carries (the
       negative setting), while the masks still mark where the inclusion would have been.

    Args:
        n: cells (>= 1).
        size: canvas side S in px (>= 32).
        seed: base seed (>= 0).
        cue: draw the inclusion (True) or not (False).
        geometry: the sizes (:class:`CueGeometry`).
        max_attempts: cells drawn per index before giving up.
    Returns:
        A :class:`CueSet`.
    Raises:
        SyntheticError: bad arguments, or no cell with room for an inclusion in max_attempts.
    """
    _check_args(seed, (size, size))
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 or size < 32:
        raise SyntheticError(f"n={n!r}, size={size!r}: need n >= 1 and size >= 32 px")
    rows = [_cue_cell(int(seed), i, int(size), bool(cue), geometry, max_attempts) for i in range(n)]
    col = {k: [r[k] for r in rows] for k in rows[0]}
    return CueSet(images=np.stack(col["image"]), labels=np.array(col["label"], dtype=np.int64),
                  masks=np.stack(col["mask"]), nucleus=np.stack(col["nucleus"]),
                  placebo=np.stack(col["placebo"]), centres=np.array(col["centre"]),
                  placebo_centres=np.array(col["placebo_centre"]), radii=np.array(col["radius"]),
                  inner=np.array(col["inner"]), total_od=np.array(col["total_od"]),
                  od_vectors=np.array(col["od_vector"]), cell_classes=tuple(col["cls"]),
                  attempts=np.array(col["attempts"], dtype=np.int64), cue=bool(cue))


def _cue_cell(seed: int, i: int, size: int, cue: bool, geo: CueGeometry, max_attempts: int) -> dict:
    """Cell i of :func:`cue_cells`, as a dict of its CueSet fields (singular names)."""
    label = int(np.random.default_rng([seed, 11, i]).integers(2))
    for attempt in range(max_attempts):
        rng = np.random.default_rng([seed, 10, i, attempt])
        canvas, cell, nucleus, cls, stain, bg = _cell_on_canvas(rng, size, geo)
        radius = size * rng.uniform(*geo.radius)
        inner = radius * rng.uniform(*geo.inner)
        peak = rng.uniform(*geo.peak_od)
        sites = _inclusion_sites(canvas, cell, nucleus, bg, radius, geo)
        pair = _site_pair(rng, sites, radius) if len(sites) else None
        if pair is not None:
            break
    else:
        raise SyntheticError(f"cue_cells: cell {i} found no room for an inclusion in {max_attempts} "
                             f"draws; lower geometry.radius or geometry.min_centre")
    centre, placebo_centre = pair
    profile, disc = inclusion_profile((size, size), centre[0], centre[1], radius, inner, label == 1)
    placebo = inclusion_profile((size, size), placebo_centre[0], placebo_centre[1], radius,
                                inner, False)[1]
    image = draw_inclusion(canvas, profile, peak, stain.od[0]) if cue else canvas.astype(np.uint8)
    mask = cell.astype(np.uint8)
    mask[disc] = 2
    return {"image": image, "label": label, "mask": mask, "nucleus": nucleus, "placebo": placebo,
            "centre": centre, "placebo_centre": placebo_centre, "radius": radius, "inner": inner,
            "total_od": peak * float(_soft(radius - np.hypot(*np.mgrid[0:size, 0:size]
                                                              - centre[::-1, None, None])).sum()),
            "od_vector": np.array(stain.od[0]), "cls": cls, "attempts": attempt + 1}
