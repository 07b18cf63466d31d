"""Known-answer tests for the ground-truth XAI benchmark: the cue cells (cervical.synthetic.cue_cells),
the chance comparisons and localisation table of cervical.xai_eval, and the benchmark's evaluation
function (benchmarks/xai_groundtruth.py) on hand-made maps, without training."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cervical import synthetic as S
from cervical import xai_eval as X

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def pair():
    """The same 16 cells with and without the cue."""
    return S.cue_cells(16, seed=3), S.cue_cells(16, seed=3, cue=False)


# ------------------------------------------------------------------------------------------------
# The inclusion
# ------------------------------------------------------------------------------------------------
def test_inclusion_profile_hand_values():
    """R = 1 at pixel (2, 2): soft(R - d) = clip(1.5 - d, 0, 1) is 1 at d = 0, 1/2 at d = 1 and
    1.5 - sqrt(2) at d = sqrt(2); the ring (r = 1/2) removes clip(1 - d, 0, 1) = 1 at the centre
    only, and is scaled by k = sum(disk) / sum(band) so both sums equal 3 + 4 (1.5 - sqrt(2))."""
    diag = 1.5 - math.sqrt(2.0)
    disk, disc = S.inclusion_profile((5, 5), 2.0, 2.0, 1.0, 0.5, ring=False)
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = [[diag, 0.5, diag], [0.5, 1.0, 0.5], [diag, 0.5, diag]]
    np.testing.assert_allclose(disk, expected, atol=1e-12)
    assert disc.sum() == 9 and disc[1:4, 1:4].all()          # d <= 1.5: the 3 x 3 block
    ring, ring_disc = S.inclusion_profile((5, 5), 2.0, 2.0, 1.0, 0.5, ring=True)
    k = (3.0 + 4 * diag) / (2.0 + 4 * diag)
    band = expected.copy()
    band[2, 2] = 0.0
    np.testing.assert_allclose(ring, k * band, atol=1e-12)
    assert ring.sum() == pytest.approx(3.0 + 4 * diag) and (ring_disc == disc).all()
    with pytest.raises(S.SyntheticError, match="inner < radius"):
        S.inclusion_profile((5, 5), 2.0, 2.0, 1.0, 1.0, ring=True)


def test_draw_inclusion_beer_lambert_hand_values():
    """I' = I exp(-peak P a): peak ln 2, P = 1, a = (1, 0, 0) halves red only; P = 0 keeps pixels."""
    img = np.full((3, 3, 3), 200, np.uint8)
    img[0, 0] = 0                                    # a 0 outside the profile stays 0 (no clip)
    prof = np.zeros((3, 3))
    prof[1, 1] = 1.0
    out = S.draw_inclusion(img, prof, math.log(2.0), np.array([1.0, 0.0, 0.0]))
    assert out[1, 1].tolist() == [100, 200, 200]
    mask = np.ones((3, 3), bool)
    mask[1, 1] = False
    assert (out[mask] == img[mask]).all()


def test_ring_and_disk_of_one_site_have_equal_total_optical_density(pair):
    """Drawn at one site of one cell, ring and disk give the same sum over pixels and channels of
    log(I / I') = A sum_c a_c, A = peak sum_p soft(R - d(p)), up to 8-bit rounding: each I' =
    round(I t) is within 1/2 of I t, so |log(I t) - log I'| <= 0.5 / (I' - 0.5) per value."""
    _, plain = pair
    img = plain.images[0]
    cx, cy = plain.centres[0]
    r, inner, a = plain.radii[0], plain.inner[0], plain.od_vectors[0]
    measured, bounds = [], []
    for ring in (False, True):
        prof, disc = S.inclusion_profile(img.shape[:2], cx, cy, r, inner, ring)
        out = S.draw_inclusion(img, prof, 0.8, a).astype(np.float64)
        i0, i1 = img[disc].astype(np.float64), out[disc]
        assert i1.min() >= 2
        measured.append(np.log(i0 / i1).sum() / a.sum())
        bounds.append((0.5 / (i1 - 0.5)).sum() / a.sum())
    area = S._soft(r - np.hypot(*(np.mgrid[0:64, 0:64] - np.array([cy, cx])[:, None, None]))).sum()
    for m, b in zip(measured, bounds):
        assert abs(m - 0.8 * area) <= b
    assert abs(measured[0] - measured[1]) <= sum(bounds)


# ------------------------------------------------------------------------------------------------
# The cue cells
# ------------------------------------------------------------------------------------------------
def test_cue_and_no_cue_draw_the_same_cells_and_differ_only_inside_the_cue_disc(pair):
    cue, plain = pair
    assert cue.cue and not plain.cue
    for name in ("labels", "masks", "nucleus", "placebo", "centres", "radii", "total_od"):
        np.testing.assert_array_equal(getattr(cue, name), getattr(plain, name))
    differs = (cue.images != plain.images).any(axis=-1)
    assert not (differs & (cue.masks != 2)).any()           # nothing drawn outside mask == 2
    assert differs.any(axis=(1, 2)).all()                   # an inclusion in every cue cell
    assert set(np.unique(cue.masks)) == {0, 1, 2}


def test_label_is_the_shape_ring_hole_untouched_disk_centre_darkened(pair):
    """Inner radius >= 0.5 R >= 1.9 px, so the pixel nearest the centre (d <= sqrt(2)/2) lies in
    the ring's hole (soft(r - d) = 1: profile 0) but inside the disk (soft(R - d) = 1)."""
    cue, plain = pair
    assert cue.inner.min() >= 1.9
    for i in range(len(cue.labels)):
        col, row = np.rint(cue.centres[i]).astype(int)
        changed = (cue.images[i, row, col] != plain.images[i, row, col]).any()
        assert changed == (cue.labels[i] == 0)
    assert 0 < cue.labels.sum() < len(cue.labels)


def test_total_od_is_the_measured_log_ratio_over_the_disc(pair):
    """sum over the disc and channels of log(I / I') / sum_c a_c = A (total_od), within rounding."""
    cue, plain = pair
    for i in range(len(cue.labels)):
        disc = cue.masks[i] == 2
        i0 = plain.images[i][disc].astype(np.float64)
        i1 = cue.images[i][disc].astype(np.float64)
        assert i1.min() >= 2
        a = cue.od_vectors[i].sum()
        assert abs(np.log(i0 / i1).sum() / a - cue.total_od[i]) <= (0.5 / (i1 - 0.5)).sum() / a


def test_inclusion_and_placebo_are_off_centre_inside_the_cell_clear_of_the_nucleus(pair):
    """Both sites follow the rule of _inclusion_sites: centre >= min_centre S from the canvas
    centre; the disc grown by 1 px stays in the cell; every disc pixel is >= gap S from every
    nucleus pixel. And the two discs do not touch (centres > 2 R + 1 apart, _site_pair)."""
    cue, _ = pair
    geo, s = S.CueGeometry(), 64
    for centres in (cue.centres, cue.placebo_centres):
        assert np.hypot(centres[:, 0] - 31.5, centres[:, 1] - 31.5).min() >= geo.min_centre * s
    apart = np.hypot(*(cue.centres - cue.placebo_centres).T)
    assert (apart > 2 * cue.radii + 1).all()
    for i in range(len(cue.labels)):
        assert not (cue.placebo[i] & (cue.masks[i] == 2)).any()
        for disc in (cue.masks[i] == 2, cue.placebo[i]):
            assert (cue.masks[i][X.dilate(disc, 1.0)] >= 1).all()
            dq = np.argwhere(disc)[:, None, :] - np.argwhere(cue.nucleus[i])[None, :, :]
            assert np.hypot(dq[..., 0], dq[..., 1]).min() >= geo.gap * s
        r = cue.radii[i]
        assert disc.sum() == pytest.approx(math.pi * (r + 0.5) ** 2, rel=0.2)
        assert cue.placebo[i].sum() == pytest.approx(math.pi * (r + 0.5) ** 2, rel=0.2)


def test_cue_cells_reproduce_and_do_not_depend_on_n():
    a, b = S.cue_cells(5, seed=7), S.cue_cells(8, seed=7)
    assert (a.images == b.images[:5]).all() and (a.masks == b.masks[:5]).all()
    assert (a.labels == b.labels[:5]).all() and a.cell_classes == b.cell_classes[:5]
    assert (S.cue_cells(5, seed=7).images == a.images).all()
    assert not (S.cue_cells(5, seed=8).images == a.images).all()
    with pytest.raises(S.SyntheticError, match="n=0"):
        S.cue_cells(0)


# ------------------------------------------------------------------------------------------------
# Chance comparisons
# ------------------------------------------------------------------------------------------------
def test_chance_comparisons_hand_values():
    per_cell = {"a": {"nucleus_energy": [0.5, 0.5, 0.5], "placebo_energy": [0.5, 0.5, 0.5]},
                "b": {"nucleus_energy": [0.1, 0.2, 0.3], "placebo_energy": [0.2, 0.3, 0.4]}}
    out = X.chance_comparisons(per_cell, {"nucleus_energy": [0.1, 0.2, 0.3]}, n_boot=200)
    assert out["a"]["nucleus_energy"]["estimate"] == pytest.approx(0.3)   # 0.4, 0.3, 0.2
    assert out["a"]["nucleus_energy"]["verdict"] == "beats"               # every d > 0
    b = out["b"]["nucleus_energy"]
    assert (b["estimate"], b["low"], b["high"], b["verdict"]) == (0.0, 0.0, 0.0, "ties")
    pl = X.chance_comparisons(per_cell, {"nucleus_energy": "placebo_energy"}, n_boot=200)
    assert pl["a"]["nucleus_energy"]["verdict"] == "ties"                 # d = 0 everywhere
    assert pl["b"]["nucleus_energy"]["estimate"] == pytest.approx(-0.1)
    assert pl["b"]["nucleus_energy"]["verdict"] == "loses"
    with pytest.raises(X.XaiEvalError, match="one per cell"):
        X.chance_comparisons(per_cell, {"nucleus_energy": [0.1, 0.2]})


def test_evaluate_methods_scores_an_extra_region_and_its_chance():
    """20 x 20 cells, map = 1 on the top-left 10 x 10 block B; region Q = the top-left 5 x 5:
    energy in Q = 25 / 100, pointing = 25 / 100 of the maximal pixels, chance = 25 / 400."""
    imgs = np.full((2, 20, 20, 3), 0.5, np.float32)
    block = np.zeros((20, 20), bool)
    block[:10, :10] = True
    q = np.zeros((2, 20, 20), bool)
    q[:, :5, :5] = True

    def box(model, images, classes):
        return np.broadcast_to(block.astype(np.float32), images.shape[:3])

    m = X.evaluate_methods(None, imgs, np.zeros(2, int), None, {"box": box},
                           predict=lambda b: np.tile([0.5, 0.5], (len(b), 1)),
                           settings=X.EvalSettings(n_sanity=0, road=False, steps=4, n_boot=50),
                           regions={"q": q})
    assert m["per_cell"]["box"]["q_energy"] == [0.25, 0.25]
    assert m["per_cell"]["box"]["q_pointing"] == [0.25, 0.25]
    assert m["chance_per_cell"]["q"]["area"] == [25 / 400] * 2
    assert m["chance"]["q_area"]["mean"] == 25 / 400
    with pytest.raises(X.XaiEvalError, match="regions"):
        X.evaluate_methods(None, imgs, np.zeros(2, int), None, {"box": box}, regions={"q": q[0]})


# ------------------------------------------------------------------------------------------------
# The benchmark's evaluation function on hand-made maps (no training)
# ------------------------------------------------------------------------------------------------
def test_benchmark_evaluation_gives_the_right_verdicts():
    """24 cue cells and three hand-made "methods": the oracle map (1 on the cue disc, 0 elsewhere),
    a constant map and the anti-oracle (0 on the disc, 1 elsewhere).

    Oracle: energy share 1 on every cell while every control is below 1 (the centre, random and
    area fraction are positive outside the disc; darkness and edges are checked per cell below;
    the placebo disc never holds the whole true disc), so every difference is > 0 and every
    bootstrap mean too: beats all six. Constant: energy = pointing = the area fraction exactly,
    d = 0 on every cell: interval [0, 0], ties. Anti-oracle: energy 0 < area fraction and < every
    positive control on every cell: loses."""
    import xai_groundtruth as B

    cues = S.cue_cells(24, seed=11)
    truth = {im.tobytes(): (m == 2).astype(np.float32) for im, m in zip(cues.images, cues.masks)}

    def oracle(model, images, classes):
        return np.stack([truth[im.tobytes()] for im in images])

    explainers = {"oracle": oracle,
                  "constant": lambda model, images, classes: np.ones(images.shape[:3], np.float32),
                  "anti": lambda model, images, classes: 1.0 - oracle(model, images, classes)}
    predict = lambda b: np.tile([0.3, 0.7], (len(b), 1))   # noqa: E731
    res = B.evaluate_setting(None, cues, explainers, predict,
                             X.EvalSettings(n_sanity=0, road=False, steps=4, n_boot=300))
    per_cell, table = res["metrics"]["per_cell"], res["table"]
    for ref in ("darkness", "edges", "placebo"):
        key = "placebo_energy" if ref == "placebo" else "nucleus_energy"
        src = "oracle" if ref == "placebo" else ref
        assert max(per_cell[src][key]) < 1.0                  # the premise of "beats"
    energy = table["oracle"]["nucleus_energy"]
    assert set(energy) == set(X.LOCALISATION_CONTROLS)
    assert all(v["verdict"] == "beats" for v in energy.values())
    # pointing: the oracle's maxima are its disc (hit 1); the centre's maximum is >= 12.8 px away
    pointing = table["oracle"]["nucleus_pointing"]
    assert pointing["centre"]["estimate"] == 1.0 and pointing["centre"]["verdict"] == "beats"
    assert pointing["area"]["verdict"] == "beats"
    for score in ("nucleus_energy", "nucleus_pointing"):
        flat = table["constant"][score]["area"]
        assert (flat["estimate"], flat["low"], flat["high"], flat["verdict"]) == (0.0, 0.0, 0.0, "ties")
    anti = table["anti"]["nucleus_energy"]
    assert all(anti[c]["verdict"] == "loses" for c in ("area", "centre", "random"))
    md = X.format_localisation_md(table, score_titles=B.SCORE_TITLES)
    assert "| cue energy share ↑ | oracle | +" in md and "vs placebo site" in md
    assert "cue energy share: oracle beats every control" in md


def test_pool_evaluations_concatenates_and_recomputes():
    """Two parts (2 + 1 cells of 20 x 20) with nucleus = the top-left 10 x 10 block B; the method's
    map is B on every cell, so its nucleus energy is 1; the "half" map is 1 on B's top half and
    on an equal area outside (energy 1/2). Pooled: 3 cells, mean 1 and 1/2; the paired difference
    method - half is 1/2 on every cell (interval [1/2, 1/2]); keeping only cell 2 gives 1 cell."""
    block = np.zeros((20, 20), bool)
    block[:10, :10] = True
    half = np.zeros((20, 20), np.float32)
    half[:5, :10] = 1.0
    half[15:, :10] = 1.0
    masks = np.where(block, 2, 1).astype(np.uint8)
    fns = {"box": lambda m, x, c: np.broadcast_to(block.astype(np.float32), x.shape[:3]),
           "half": lambda m, x, c: np.broadcast_to(half, x.shape[:3])}
    settings = X.EvalSettings(n_sanity=0, road=False, steps=4, n_boot=100)
    predict = lambda b: np.tile([0.2, 0.8], (len(b), 1))   # noqa: E731
    parts = [X.evaluate_methods(None, np.full((n, 20, 20, 3), 0.5, np.float32), np.array(y),
                                np.broadcast_to(masks, (n, 20, 20)), fns, predict=predict,
                                settings=settings) for n, y in ((2, [1, 0]), (1, [1]))]
    pooled = X.pool_evaluations(parts)
    assert pooled["n_cells"] == 3 and pooled["labels"] == [1, 0, 1] and pooled["predicted"] == [1, 1, 1]
    assert pooled["accuracy_on_cells"] == pytest.approx(2 / 3)
    assert pooled["per_cell"]["box"]["nucleus_energy"] == [1.0, 1.0, 1.0]
    assert pooled["methods"]["half"]["nucleus_energy"]["mean"] == pytest.approx(0.5)
    d = pooled["paired"]["comparisons"]["box"]["half"]["nucleus_energy"]
    assert (d["estimate"], d["low"], d["high"], d["n"]) == (0.5, 0.5, 0.5, 3)
    assert pooled["chance_per_cell"]["nucleus"]["area"] == [0.25] * 3
    assert len(pooled["methods"]["box"]["mean_deletion_curve"]) == 5
    one = X.pool_evaluations(parts, keep=[False, True, False])
    assert one["n_cells"] == 1 and one["labels"] == [0] and one["accuracy_on_cells"] == 0.0
    assert "mean_deletion_curve" not in one["methods"]["box"]
    with pytest.raises(X.XaiEvalError, match="one value per pooled cell"):
        X.pool_evaluations(parts, keep=[True])


def test_benchmark_model_check():
    """Cue setting: passes at or above MIN_CUE_ACCURACY only; no-cue setting: fails only when the
    balanced-accuracy interval lies above 0.5."""
    import xai_groundtruth as B

    m = B.MIN_CUE_ACCURACY
    assert B._model_check(True, {"estimate": m}) and not B._model_check(True, {"estimate": m - 0.01})
    assert B._model_check(False, {"balanced": {"estimate": 0.47, "low": 0.41, "high": 0.53}})
    assert B._model_check(False, {"balanced": {"estimate": 0.44, "low": 0.38, "high": 0.49}})
    assert not B._model_check(False, {"balanced": {"estimate": 0.6, "low": 0.54, "high": 0.66}})


def test_benchmark_accuracy_balanced_hand_values():
    """Labels 1, 1, 1, 0 predicted all 1: accuracy 3/4, balanced accuracy (1 + 0) / 2 = 1/2."""
    import xai_groundtruth as B

    predict = lambda b: np.tile([0.2, 0.8], (len(b), 1))   # noqa: E731
    acc = B.accuracy_ci(predict, np.zeros((4, 8, 8, 3), np.uint8), np.array([1, 1, 1, 0]))
    assert acc["estimate"] == 0.75 and acc["balanced"]["estimate"] == 0.5
