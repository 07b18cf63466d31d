"""Known-answer tests for cervical.xai_eval: deletion/insertion, localisation, sanity check, cost."""

from __future__ import annotations

import numpy as np
import pytest

from cervical import xai_eval as X

# --------------------------------------------------------------------------------------------
# A toy "model": P(class 1) = mean of channel 0 over a region R, P(class 0) = 1 - that.
# Image 20x20 = 400 pixels, R = the top-left 10x10 block = 100 pixels = 25 % of the image.
# --------------------------------------------------------------------------------------------
H = W = 20
REGION = np.zeros((H, W), bool)
REGION[:10, :10] = True


def region_model(batch: np.ndarray) -> np.ndarray:
    p = batch[:, REGION, 0].mean(axis=1)
    return np.stack([1.0 - p, p], axis=1)


ONES = np.ones((H, W, 3), np.float32)


def test_pixels_per_step_hand_values():
    assert X.pixels_per_step(400).tolist() == list(range(0, 401, 20))
    # n = 10, T = 20: k_t = round_half_up(t / 2) = (t + 1) // 2
    assert X.pixels_per_step(10).tolist() == [(t + 1) // 2 for t in range(21)]


def test_saliency_ranks_decreasing_with_raster_ties():
    a = np.array([[0.5, 0.9], [0.5, 0.1]])
    # order: 0.9 (idx 1), 0.5 (idx 0), 0.5 (idx 2), 0.1 (idx 3)
    assert X.saliency_ranks(a).tolist() == [[1, 0], [2, 3]]


def test_curve_auc_trapezoid_hand_value():
    assert X.curve_auc([0.0, 0.5, 1.0], [1.0, 0.0, 1.0]) == pytest.approx(0.5)
    np.testing.assert_allclose(X.curve_auc([0, 1], [[0, 1], [1, 1]]), [0.5, 1.0])


def test_deletion_insertion_best_map_known_auc():
    """Map ranking R first: deletion p_t = 1 - min(t, 5)/5, AUC = r/(2n) = 0.125; insertion 1 - 0.125."""
    best = REGION.astype(float)
    f, p = X.deletion_curve(region_model, ONES, best, 1, baseline="black")
    np.testing.assert_allclose(f, np.arange(21) / 20)
    np.testing.assert_allclose(p, [1 - min(t, 5) / 5 for t in range(21)], atol=1e-7)
    assert X.curve_auc(f, p) == pytest.approx(0.125)
    assert X.insertion_auc(region_model, ONES, best, 1, baseline="black") == pytest.approx(0.875)
    # the reverse ranking (R last) gives the worst AUCs: 0.75 + 0.125 and 0.125
    worst = 1.0 - best
    assert X.deletion_auc(region_model, ONES, worst, 1, baseline="black") == pytest.approx(0.875)
    assert X.insertion_auc(region_model, ONES, worst, 1, baseline="black") == pytest.approx(0.125)


def test_deletion_curve_matches_numpy_reference_on_random_image():
    """Random pixel values, map = R first (raster ties): p_t is the mean over R with the first k_t
    pixels of R (raster order) replaced by the baseline value 0.3."""
    rng = np.random.default_rng(1)
    img = rng.uniform(0, 1, (H, W, 3)).astype(np.float32)
    f, p = X.deletion_curve(region_model, img, REGION.astype(float), 1, baseline=0.3)
    r_values = img[REGION, 0].astype(np.float64)          # raster order inside R
    expected = []
    for t in range(21):
        k = min(20 * t, 100)
        expected.append((0.3 * k + r_values[k:].sum()) / 100)
    np.testing.assert_allclose(p, expected, rtol=1e-6)


def test_perturbation_curves_batch_equals_single_and_class_vector():
    rng = np.random.default_rng(2)
    imgs = rng.uniform(0, 1, (3, H, W, 3)).astype(np.float32)
    maps = rng.uniform(0, 1, (3, H, W))
    f, p = X.perturbation_curves(region_model, imgs, maps, [1, 0, 1], mode="insertion",
                                 baseline="black", batch_size=25)   # 1 cell per model batch
    for i, c in enumerate([1, 0, 1]):
        _, single = X.insertion_curve(region_model, imgs[i], maps[i], c, baseline="black")
        np.testing.assert_allclose(p[i], single)
    # class 0 is 1 - class 1
    _, p1 = X.insertion_curve(region_model, imgs[1], maps[1], 1, baseline="black")
    np.testing.assert_allclose(p[1], 1 - p1)


def test_blur_baseline_default_sigma_is_size_over_10():
    """An impulse of mass 1000 in an 80x80 image blurred with sigma 8: mass kept, peak 1000/(2 pi 64)."""
    img = np.zeros((80, 80, 3), np.float32)
    img[40, 40] = 1000.0
    b = X.blur_baseline(img)
    assert b[..., 0].sum() == pytest.approx(1000.0, rel=1e-3)
    assert b[40, 40, 0] == pytest.approx(1000.0 / (2 * np.pi * 64), rel=0.02)
    const = np.full((12, 12, 3), 200.0, np.float32)
    np.testing.assert_allclose(X.blur_baseline(const), const, rtol=1e-6)
    np.testing.assert_allclose(X.make_baseline(const, "mean"), const)
    assert X.make_baseline(const, "black").sum() == 0


def test_bad_arguments_raise_one_line_errors():
    with pytest.raises(X.XaiEvalError, match="mode"):
        X.perturbation_images(ONES, REGION.astype(float), ONES, mode="sideways")
    with pytest.raises(X.XaiEvalError, match="baseline"):
        X.make_baseline(ONES, "grey")
    with pytest.raises(X.XaiEvalError, match="saliency"):
        X.energy_share(np.ones((2, 2, 2)), np.ones((2, 2)))
    with pytest.raises(X.XaiEvalError, match="mask"):
        X.energy_share(np.ones((2, 2)), np.ones((3, 3)))


# --------------------------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------------------------
def test_energy_share_hand_values():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True                      # 4 pixels
    a = np.zeros((6, 6))
    a[1:3, 1:3] = 3.0                          # energy 12 inside
    a[4, :4] = 1.0                             # energy 4 outside
    a[5, 5] = -5.0                             # negative evidence is not energy
    assert X.energy_share(a, mask) == pytest.approx(12 / 16)
    assert X.energy_share(np.ones((6, 6)), mask) == pytest.approx(4 / 36)   # uniform = chance
    assert X.area_fraction(mask) == pytest.approx(4 / 36)
    # no positive energy: scored as a uniform map (chance), not dropped
    assert X.energy_share(np.zeros((6, 6)), mask) == pytest.approx(4 / 36)
    assert X.energy_share(-np.abs(a), mask) == pytest.approx(4 / 36)
    assert np.isnan(X.energy_share(a, np.zeros((6, 6))))


def test_pointing_hit_with_tolerance_and_ties():
    mask = np.zeros((9, 9), bool)
    mask[4, 4] = True
    a = np.zeros((9, 9))
    a[4, 4] = 1.0
    assert X.pointing_hit(a, mask) == 1.0
    b = np.zeros((9, 9))
    b[4, 7] = 1.0                              # 3 pixels right of the mask
    assert X.pointing_hit(b, mask) == 0.0
    assert X.pointing_hit(b, mask, tolerance=2) == 0.0
    assert X.pointing_hit(b, mask, tolerance=3) == 1.0
    ties = np.zeros((9, 9))
    ties[0, 0] = ties[4, 4] = 2.0              # one of two maxima inside: a random one hits half the time
    assert X.pointing_hit(ties, mask) == 0.5
    plateau = np.zeros((9, 9))
    plateau[2:7, 2:7] = 1.0                    # a 25-pixel flat patch (a LIME superpixel) over the mask
    assert X.pointing_hit(plateau, mask) == pytest.approx(1 / 25)
    assert X.pointing_hit(plateau, mask, tolerance=1) == pytest.approx(5 / 25)   # the plus-shaped disc
    # a constant map: every pixel is maximal, so it scores the chance level
    assert X.pointing_hit(np.ones((9, 9)), mask) == pytest.approx(X.area_fraction(mask))
    assert np.isnan(X.pointing_hit(ties, np.zeros((9, 9), bool)))


def test_dilate_disc_and_chance_with_tolerance():
    m = np.zeros((7, 7), bool)
    m[3, 3] = True
    assert X.dilate(m, 1).sum() == 5           # plus sign
    assert X.dilate(m, 1.5).sum() == 9         # 3x3 (diagonals at distance sqrt 2)
    assert X.dilate(m, 2).sum() == 13
    assert X.area_fraction(m, tolerance=1) == pytest.approx(5 / 49)


# --------------------------------------------------------------------------------------------
# Ranks, aggregation, timing
# --------------------------------------------------------------------------------------------
def test_rankdata_and_spearman_hand_values():
    np.testing.assert_allclose(X.rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    assert X.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)     # monotone transform
    assert X.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 2, 3, 4]: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5)
    assert X.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    assert np.isnan(X.spearman([1, 1, 1], [1, 2, 3]))


def test_map_similarity_constant_conventions():
    a = np.arange(9.0).reshape(3, 3)
    assert np.isnan(X.map_similarity(np.zeros((3, 3)), a))
    assert X.map_similarity(a, np.zeros((3, 3))) == 0.0
    assert X.map_similarity(a, a ** 2) == pytest.approx(1.0)


def test_mean_std_and_timed():
    s = X.mean_std([1.0, 2.0, 3.0, np.nan])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert X.mean_std([np.nan]) == {"mean": None, "std": None, "n": 0}
    assert X.mean_std([5.0])["std"] == 0.0
    ticks = iter([10.0, 13.5])
    result, seconds = X.timed(lambda a, b: a + b, 2, b=3, clock=lambda: next(ticks))
    assert (result, seconds) == (5, 3.5)


# --------------------------------------------------------------------------------------------
# Cascading randomisation (needs Keras; a tiny model)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(2, activation="softmax", name="d")(x)
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def blob_images():
    from conftest import make_blob_cells

    x, _, _ = make_blob_cells((2, 2, 0), size=16, seed=3)
    return x.astype(np.float32)


def test_randomisation_is_top_down_cascading_and_restores_weights(tiny_model, blob_images):
    names = ["c1", "c2", "d"]
    before = {n: [w.copy() for w in tiny_model.get_layer(n).get_weights()] for n in names}
    changed_per_call = []

    def recording_method(model, images, classes):
        changed = [n for n in names
                   if any(not np.array_equal(a, b) for a, b in zip(model.get_layer(n).get_weights(), before[n]))]
        changed_per_call.append(changed)
        return np.random.default_rng(len(changed_per_call)).uniform(size=images.shape[:3])

    res = X.randomisation_check(tiny_model, recording_method, blob_images, class_index=0)
    assert res["layers"] == names                                  # Rescaling has no weights
    assert changed_per_call == [[], ["d"], ["c2", "d"], ["c1", "c2", "d"]]
    assert [s["randomised"] for s in res["steps"]] == [["d"], ["c2"], ["c1"]]
    for n in names:
        for a, b in zip(tiny_model.get_layer(n).get_weights(), before[n]):
            np.testing.assert_array_equal(a, b)
    # two blocks: [d, c2] then [c1]
    changed_per_call.clear()
    res2 = X.randomisation_check(tiny_model, recording_method, blob_images, class_index=0, blocks=2)
    assert [s["n_randomised"] for s in res2["steps"]] == [2, 3]
    assert changed_per_call[1:] == [["c2", "d"], ["c1", "c2", "d"]]


def test_permute_keeps_values_reinit_redraws(tiny_model):
    layer = tiny_model.get_layer("c2")
    kernel = layer.get_weights()[0].copy()
    saved = [w.copy() for w in layer.get_weights()]
    try:
        X._randomise_layer(layer, np.random.default_rng(0), "permute")
        permuted = layer.get_weights()[0]
        assert not np.array_equal(permuted, kernel)
        np.testing.assert_array_equal(np.sort(permuted.ravel()), np.sort(kernel.ravel()))
        X._randomise_layer(layer, np.random.default_rng(0), "reinit")
        redrawn, bias = layer.get_weights()
        assert not np.isin(redrawn, kernel).all()
        np.testing.assert_array_equal(bias, 0.0)                     # zeros initializer
        limit = np.sqrt(6.0 / (3 * 3 * 8 + 3 * 3 * 8))               # Glorot uniform bound
        assert np.abs(redrawn).max() <= limit
    finally:
        layer.set_weights(saved)


def edge_map(model, images, classes):
    """A 'method' that ignores the model: gradient magnitude of the grey image."""
    g = images.mean(axis=-1)
    gy, gx = np.gradient(g, axis=(1, 2))
    return np.hypot(gx, gy)


def test_model_independent_method_is_flagged(tiny_model, blob_images):
    res = X.randomisation_check(tiny_model, edge_map, blob_images)
    assert res["final_similarity"] == pytest.approx(1.0)
    assert all(s["similarity"] == pytest.approx(1.0) for s in res["steps"])
    assert res["passed"] is False


def test_constant_maps_leave_the_check_undetermined(tiny_model, blob_images):
    res = X.randomisation_check(tiny_model, lambda m, x, c: np.zeros(x.shape[:3]), blob_images, blocks=1)
    assert res["final_similarity"] is None and res["passed"] is None
    assert res["steps"][0]["per_image"] == [None] * len(blob_images)


def test_gradcam_passes_the_check(tiny_model, blob_images):
    """Grad-CAM on an untrained net passes the randomisation check (its maps follow the weights).

    Seed dependence, measured over 20 model seeds x 2 check seeds: final similarity median 0.00,
    min -0.39, max 0.67, below the 0.9 threshold by 0.23 at worst; 38 passed, 2 undetermined
    (a net whose ReLUs are all dead gives constant maps), none failed.
    """
    from cervical import cams

    def method(model, images, classes):
        return cams.gradcam(model, images, class_index=classes, layer="c2")

    res = X.randomisation_check(tiny_model, method, blob_images, seed=1)
    assert res["passed"] is True
    assert res["final_similarity"] < 0.9


# --------------------------------------------------------------------------------------------
# ROAD: noisy linear imputation (Rong et al. 2022)
# --------------------------------------------------------------------------------------------
def test_imputation_hand_values_interior_and_corner():
    """Centre of a 3x3 image removed: direct neighbours 6, diagonal ones 12 ->
    4 * 6 / 6 + 4 * 12 / 12 = 8. Corner (0, 0) removed: its 3 neighbours inside weigh 1/6, 1/6,
    1/12 (sum 5/12), renormalised 2/5, 2/5, 1/5 -> right 10, down 20, diagonal 30 give 4 + 8 + 6 = 18."""
    img = np.array([[12, 6, 12], [6, 99, 6], [12, 6, 12]], np.float32)[..., None]
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    out = X.noisy_linear_imputation(img, centre, noise=0.0)
    assert out[1, 1, 0] == pytest.approx(8.0)
    np.testing.assert_array_equal(out[~centre], img[~centre])           # kept pixels untouched
    img2 = np.array([[99, 10, 0], [20, 30, 0], [0, 0, 0]], np.float32)[..., None]
    corner = np.zeros((3, 3), bool)
    corner[0, 0] = True
    assert X.noisy_linear_imputation(img2, corner, noise=0.0)[0, 0, 0] == pytest.approx(18.0)


def test_imputation_of_a_constant_image_is_the_constant():
    """Every row of the system sums to one, so a constant solves it (border pixels included); the
    noise sd is relative to the image's value range, which is 0 here, so even noise=0.05 adds none."""
    img = np.full((10, 12, 3), 7.5, np.float32)
    removed = np.random.default_rng(0).uniform(size=(10, 12)) < 0.6
    removed[0, 0] = removed[-1, -1] = True
    np.testing.assert_allclose(X.noisy_linear_imputation(img, removed, noise=0.0), img, rtol=1e-6)
    np.testing.assert_allclose(X.noisy_linear_imputation(img, removed, noise=0.05), img, rtol=1e-6)
    np.testing.assert_array_equal(X.noisy_linear_imputation(img, np.zeros((10, 12)), noise=0.05), img)


def test_imputation_reproduces_a_linear_ramp_around_an_interior_hole():
    """v = a r + b c + d solves every row of an interior removed pixel: the weights sum to 1 and
    come in opposite pairs (+-dr, +-dc) of equal weight, so sum_j w_j (a dr_j + b dc_j) = 0."""
    r, c = np.mgrid[0:14, 0:16].astype(np.float64)
    img = np.stack([2 * r - 3 * c + 50, 0.5 * r + 0.25 * c, -r + 7], axis=-1).astype(np.float32)
    hole = np.zeros((14, 16), bool)
    hole[3:9, 2:11] = True
    hole[9:12, 6:8] = True                                               # an L-shaped hole
    out = X.noisy_linear_imputation(img, hole, noise=0.0)
    np.testing.assert_allclose(out, img, atol=1e-4)
    # at the border the renormalised one-sided mean does not reproduce a ramp (documented limit)
    edge = np.zeros((14, 16), bool)
    edge[0, 5] = True
    assert abs(X.noisy_linear_imputation(img, edge, noise=0.0)[0, 5, 0] - img[0, 5, 0]) > 0.1


def _dense_imputation(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Plain NumPy reference: the full n x n system built pixel by pixel, numpy.linalg.solve."""
    h, w, ch = img.shape
    unknowns = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    pos = {p: k for k, p in enumerate(unknowns)}
    offsets = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (-1, -1, 1 / 12), (-1, 1, 1 / 12), (1, -1, 1 / 12), (1, 1, 1 / 12)]
    a = np.eye(len(unknowns))
    b = np.zeros((len(unknowns), ch))
    for k, (i, j) in enumerate(unknowns):
        inside = [(i + di, j + dj, wt) for di, dj, wt in offsets if 0 <= i + di < h and 0 <= j + dj < w]
        total = sum(wt for _, _, wt in inside)
        for ni, nj, wt in inside:
            if removed[ni, nj]:
                a[k, pos[(ni, nj)]] -= wt / total
            else:
                b[k] += wt / total * img[ni, nj].astype(np.float64)
    out = img.astype(np.float64).copy()
    solution = np.linalg.solve(a, b)
    for k, (i, j) in enumerate(unknowns):
        out[i, j] = solution[k]
    return out


def test_sparse_imputation_equals_a_dense_numpy_reference():
    rng = np.random.default_rng(4)
    img = rng.uniform(0, 255, (7, 9, 2)).astype(np.float32)
    removed = rng.uniform(size=(7, 9)) < 0.55
    expected = _dense_imputation(img, removed)
    np.testing.assert_allclose(X.noisy_linear_imputation(img, removed, noise=0.0), expected, rtol=1e-5, atol=1e-4)
    a, _, _ = X._imputation_system(removed, img.astype(np.float64))
    assert abs(a - a.T).max() == 0.0                     # symmetric: factorised without pivoting


def test_imputation_noise_scale_seed_and_errors():
    rng = np.random.default_rng(5)
    img = rng.uniform(10, 110, (64, 64, 3)).astype(np.float32)        # range close to 100
    removed = rng.uniform(size=(64, 64)) < 0.5
    plain = X.noisy_linear_imputation(img, removed, noise=0.0)
    noisy = X.noisy_linear_imputation(img, removed, noise=0.1, seed=3)
    diff = (noisy - plain).astype(np.float64)
    assert np.all(diff[~removed] == 0)                                  # noise on imputed pixels only
    expected_sd = 0.1 * float(img.max() - img.min())
    assert diff[removed].std() == pytest.approx(expected_sd, rel=0.05)  # ~6000 draws: se ~1 %
    np.testing.assert_array_equal(noisy, X.noisy_linear_imputation(img, removed, noise=0.1, seed=3))
    assert not np.array_equal(noisy, X.noisy_linear_imputation(img, removed, noise=0.1, seed=4))
    with pytest.raises(X.XaiEvalError, match="every pixel"):
        X.noisy_linear_imputation(img, np.ones((64, 64)), noise=0.0)
    with pytest.raises(X.XaiEvalError, match="noise"):
        X.noisy_linear_imputation(img, removed, noise=-1.0)


def test_road_pixels_rounding_and_errors():
    assert X.road_pixels(400, (10, 25, 90)).tolist() == [40, 100, 360]
    assert X.road_pixels(10, (5, 15, 24)).tolist() == [1, 2, 2]          # 0.5 -> 1, 1.5 -> 2, 2.4 -> 2
    for bad in ((100,), (50, 40), (-1,), ()):
        with pytest.raises(X.XaiEvalError, match="percentages"):
            X.road_pixels(400, bad)
    with pytest.raises(X.XaiEvalError, match="removes them all"):
        X.road_pixels(10, (99,))


def test_road_auc_is_the_mean_height():
    # trapezoid 0.4 * (1 + 0) / 2 + 0.4 * (0 + 1) / 2 = 0.4 over a width of 0.8
    assert X.road_auc([0.1, 0.5, 0.9], [1.0, 0.0, 1.0]) == pytest.approx(0.5)
    np.testing.assert_allclose(X.road_auc([0.1, 0.9], [[0.3, 0.3], [0.0, 1.0]]), [0.3, 0.5])
    np.testing.assert_allclose(X.road_auc([0.3], [[0.7], [0.2]]), [0.7, 0.2])


# A "model" that looks only at a 5x8 box (40 pixels = 10 % of a 20x20 image):
# P(class 1) = sigmoid(S (mean darkness in the box - 1/2)), darkness = 1 - channel 0.
BOX = np.zeros((H, W), bool)
BOX[5:10, 6:14] = True
S = 8.0


def box_model(batch: np.ndarray) -> np.ndarray:
    dark = 1.0 - batch[:, BOX, 0].mean(axis=1)
    p = 1.0 / (1.0 + np.exp(-S * (dark - 0.5)))
    return np.stack([1.0 - p, p], axis=1)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z))


def test_road_box_model_known_curves():
    """Bright surround (1), dark box (0); percentages 10..90 remove k = 40..360 pixels.

    Map = box (1 inside, 0 outside; the box ranks 0..39). MoRF at 10 % removes exactly the box; its
    neighbours are all surround (1), so the imputed box is 1 (constant surround -> constant), the
    darkness 0 and p = sigmoid(-S/2); at larger k more surround goes too, every kept pixel is still 1,
    so p stays sigmoid(-S/2). LeRF removes the surround from the end of the raster and keeps the box
    (darkness 1): p = sigmoid(S/2) at every percentage (at 90 % the whole surround is imputed from
    the box, as 0, and the box is unchanged).
    Map = complement (0 on the box): its MoRF removes surround only (p = sigmoid(S/2)) and its LeRF
    the box first (p = sigmoid(-S/2)). So the box map has the lower MoRF and the higher LeRF score.
    """
    img = np.ones((H, W, 3), np.float32)
    img[BOX] = 0.0
    box, other = BOX.astype(float), 1.0 - BOX.astype(float)
    pct = list(range(10, 100, 10))
    low, high = sigmoid(-S / 2), sigmoid(S / 2)
    first = X.road_images(img, box, pct, "morf", noise=0.0)
    np.testing.assert_allclose(first[0], np.ones((H, W, 3)), atol=1e-6)  # the box imputed as surround
    imgs, maps = np.stack([img, img]), np.stack([box, other])
    f, morf = X.road_curves(box_model, imgs, maps, 1, "morf", pct, noise=0.0, batch_size=9)
    _, lerf = X.road_curves(box_model, imgs, maps, 1, "lerf", pct, noise=0.0, batch_size=9)
    np.testing.assert_allclose(f, np.arange(1, 10) / 10)
    np.testing.assert_allclose(morf, [[low] * 9, [high] * 9], atol=1e-6)
    np.testing.assert_allclose(lerf, [[high] * 9, [low] * 9], atol=1e-6)
    np.testing.assert_allclose(X.road_auc(f, morf), [low, high], atol=1e-6)
    np.testing.assert_allclose(X.road_auc(f, lerf) - X.road_auc(f, morf),
                               [high - low, low - high], atol=1e-6)      # +-tanh(S/4)
    # with ROAD's default noise the order of the two maps is the same
    _, noisy = X.road_curves(box_model, imgs, maps, 1, "morf", pct)
    assert noisy[0].mean() < 0.1 < 0.9 < noisy[1].mean()
    with pytest.raises(X.XaiEvalError, match="order"):
        X.road_images(img, box, pct, "random")


def test_road_noise_is_shared_between_maps_of_a_cell():
    """The noise seed depends on (seed, cell, order, step), not on the map: two maps that remove the
    same pixels give the same images."""
    rng = np.random.default_rng(6)
    img = rng.uniform(size=(12, 12, 3)).astype(np.float32)
    a = rng.uniform(size=(12, 12))
    np.testing.assert_array_equal(X.road_images(img, a, (20, 60), seed=(0, 1, 0)),
                                  X.road_images(img, 3 * a + 1, (20, 60), seed=(0, 1, 0)))


# --------------------------------------------------------------------------------------------
# Reference maps
# --------------------------------------------------------------------------------------------
def test_darkness_map_hand_values():
    """Channel means [[0, 60, 120], [180, 240, 60]] (min 0, max 240): d = 1 - m / 240."""
    img = np.array([[[0, 0, 0], [30, 60, 90], [120, 120, 120]],
                    [[180, 200, 160], [240, 240, 240], [60, 0, 120]]], np.uint8)
    expected = [[1.0, 0.75, 0.5], [0.25, 0.0, 0.75]]
    np.testing.assert_allclose(X.darkness_map(img), expected)
    np.testing.assert_allclose(X.darkness_map(img / 255.0), expected)   # any value range
    np.testing.assert_array_equal(X.darkness_map(np.full((4, 4, 3), 9.0)), 0.0)


def test_sobel_edges_are_maximal_on_a_step():
    """Columns 0-3 grey 50, 4-7 grey 200 (unit step after normalising): G_x = (1 + 2 + 1) * 1 = 4 on
    columns 3 and 4, 0 elsewhere; G_y = 0 (rows are equal, borders replicated)."""
    img = np.full((6, 8, 3), 50.0)
    img[:, 4:] = 200.0
    e = X.sobel_edges(img)
    expected = np.zeros((6, 8))
    expected[:, 3:5] = 4.0
    np.testing.assert_allclose(e, expected)
    assert set(np.flatnonzero(e.max(axis=0) == e.max())) == {3, 4}


def test_reference_maps_with_images():
    rng = np.random.default_rng(7)
    imgs = rng.uniform(0, 255, (2, 6, 8, 3))
    r = X.reference_maps((2, 6, 8), seed=1, images=imgs)
    assert list(r) == ["random", "centre", "darkness", "edges"] == list(X.REFERENCE_TITLES)
    np.testing.assert_allclose(r["darkness"][1], X.darkness_map(imgs[1]), rtol=1e-6)
    np.testing.assert_allclose(r["edges"][0], X.sobel_edges(imgs[0]), rtol=1e-6)
    assert set(X.reference_maps((2, 6, 8))) == {"random", "centre"}       # old call: no images
    np.testing.assert_array_equal(r["random"], X.reference_maps((2, 6, 8), seed=1)["random"])
    with pytest.raises(X.XaiEvalError, match="images"):
        X.reference_maps((2, 6, 9), images=imgs)


# --------------------------------------------------------------------------------------------
# Paired comparisons with the controls
# --------------------------------------------------------------------------------------------
def test_paired_comparisons_known_answers():
    ref = [0.2, 0.5, 0.3, 0.6]
    per_cell = {
        "better": {"nucleus_energy": [v + 0.1 for v in ref], "deletion_auc": [v - 0.05 for v in ref],
                   "insertion_auc": list(ref)},
        "worse": {"nucleus_energy": [v - 0.2 for v in ref], "deletion_auc": [v + 0.05 for v in ref],
                  "insertion_auc": [0.6, None, 0.3, 0.6]},
        "centre": {"nucleus_energy": list(ref), "deletion_auc": list(ref), "insertion_auc": list(ref)},
    }
    p = X.paired_comparisons(per_cell, n_boot=200, seed=1)
    assert p["interval_over"] == "cells" and p["n_clusters"] == 4
    c = p["comparisons"]["better"]["centre"]
    # the same difference on every cell: every resample has that mean, a zero-width interval
    for key, value, verdict in (("nucleus_energy", 0.1, "beats"), ("deletion_auc", -0.05, "beats"),
                                ("insertion_auc", 0.0, "ties")):
        assert c[key]["estimate"] == pytest.approx(value)
        assert c[key]["low"] == pytest.approx(value) and c[key]["high"] == pytest.approx(value)
        assert c[key]["verdict"] == verdict
    w = p["comparisons"]["worse"]["centre"]
    assert w["nucleus_energy"]["verdict"] == "loses" and w["deletion_auc"]["verdict"] == "loses"
    # the undefined cell is left out: differences 0.4, 0, 0 over three cells
    assert w["insertion_auc"]["n"] == 3 and w["insertion_auc"]["estimate"] == pytest.approx(0.4 / 3)
    # method against method: better - worse = +0.3 on energy
    assert p["comparisons"]["better"]["worse"]["nucleus_energy"]["estimate"] == pytest.approx(0.3)
    assert set(p["comparisons"]) == {"better", "worse"} and "centre" not in p["comparisons"]


def test_paired_comparisons_pass_groups_to_the_cluster_bootstrap():
    from cervical import metrics

    rng = np.random.default_rng(8)
    a, b = rng.uniform(size=12), rng.uniform(size=12)
    groups = ["g1"] * 5 + ["g2"] * 4 + ["g3"] * 3
    per_cell = {"m": {"nucleus_energy": a.tolist()}, "centre": {"nucleus_energy": b.tolist()}}
    p = X.paired_comparisons(per_cell, groups=groups, n_boot=300, seed=2)
    direct = metrics.cluster_mean_ci(a - b, groups, n=300, seed=2)
    got = p["comparisons"]["m"]["centre"]["nucleus_energy"]
    for key in ("estimate", "low", "high", "n", "n_groups"):
        assert got[key] == direct[key]
    assert got["n_groups"] == 3 and p["interval_over"] == "clusters" and p["n_clusters"] == 3
    assert got["verdict"] == metrics.verdict(direct)
    cells = metrics.cluster_mean_ci(a - b, None, n=300, seed=2)     # over cells: a different interval
    assert (cells["low"], cells["high"]) != (direct["low"], direct["high"])


def test_default_pairs_and_paired_errors():
    assert X.default_pairs(["a", "b", "centre", "random"]) == [
        ("a", "centre"), ("a", "random"), ("b", "centre"), ("b", "random"), ("a", "b")]
    per_cell = {"m": {"nucleus_energy": [0.1, 0.2]}, "centre": {"nucleus_energy": [0.0, 0.1]}}
    with pytest.raises(X.XaiEvalError, match="pairs"):
        X.paired_comparisons(per_cell, pairs=[("m", "darkness")])
    with pytest.raises(X.XaiEvalError, match="groups"):
        X.paired_comparisons(per_cell, groups=["g"])
    only = X.paired_comparisons(per_cell, pairs=[("centre", "m")], n_boot=10)
    assert only["comparisons"]["centre"]["m"]["nucleus_energy"]["estimate"] == pytest.approx(-0.1)


# --------------------------------------------------------------------------------------------
# evaluate_methods with the controls (no Keras: a callable model, no sanity check)
# --------------------------------------------------------------------------------------------
def box_method(model, images, classes):
    return np.broadcast_to(REGION.astype(np.float32), images.shape[:3])


def off_method(model, images, classes):
    return np.broadcast_to((~REGION).astype(np.float32), images.shape[:3])


def test_evaluate_methods_paired_verdicts_on_a_dark_nucleus():
    """Three cells whose "nucleus" is R, dark (0.2) on a bright (0.8) surround. The darkness map is
    then 1 on R and 0 elsewhere: nucleus energy 1, exactly as the box method's - every difference is
    0, so the box method only ties with it, and the report must not say it beats it."""
    imgs = np.full((3, H, W, 3), 0.8, np.float32)
    imgs[:, REGION] = 0.2
    masks = np.broadcast_to(np.where(REGION, 2, 1), (3, H, W)).astype(np.uint8)
    settings = X.EvalSettings(n_sanity=0, road_percentages=(20, 60), n_boot=200)
    m = X.evaluate_methods(None, imgs, np.zeros(3, int), masks, {"box": box_method, "off": off_method},
                           predict=region_model, settings=settings, groups=["a", "a", "b"])
    assert set(m["reference"]) == {"random", "centre", "darkness", "edges"}
    assert m["paired"]["interval_over"] == "clusters" and m["paired"]["n_clusters"] == 2
    assert m["road_fractions"] == [0.2, 0.6] and m["settings"]["road_percentages"] == [20.0, 60.0]
    box = m["paired"]["comparisons"]["box"]
    assert box["darkness"]["nucleus_energy"]["estimate"] == 0.0
    assert box["darkness"]["nucleus_energy"]["verdict"] == "ties"
    centre_energy = [X.energy_share(X.reference_maps((1, H, W))["centre"][0], REGION)] * 3
    assert box["centre"]["nucleus_energy"]["estimate"] == pytest.approx(1 - np.mean(centre_energy), rel=1e-6)
    assert box["centre"]["nucleus_energy"]["verdict"] == "beats"
    assert m["paired"]["comparisons"]["off"]["random"]["nucleus_energy"]["verdict"] == "loses"
    lerf, morf = (np.array(m["per_cell"]["box"][k]) for k in ("road_lerf_auc", "road_morf_auc"))
    np.testing.assert_allclose(m["per_cell"]["box"]["road_lerf_minus_morf"], lerf - morf)
    md = X.format_metrics_md(m, titles={"box": "Box", "off": "Off"})
    assert "## Paired comparisons with the reference maps" in md and "2 cluster images" in md
    assert "Nucleus energy (↑): Box (+" in md
    assert "no method beats the darkness map (1 loses, 1 ties)" in md
    assert "ROAD MoRF ↓" in md and "**Verdict.**" in md
    assert "| nucleus energy ↑ | Box | +" in md
    # ROAD off: no ROAD scores or columns, and the rest unchanged
    off = X.evaluate_methods(None, imgs, np.zeros(3, int), masks, {"box": box_method},
                             predict=region_model, settings=X.EvalSettings(n_sanity=0, road=False, n_boot=50))
    assert off["road_fractions"] is None and "road_morf_auc" not in off["per_cell"]["box"]
    assert off["paired"]["interval_over"] == "cells" and "ROAD" not in X.format_metrics_md(off)


def test_paired_difference_format_keeps_small_differences_visible():
    assert X._diff({"estimate": 0.12, "low": 0.05, "high": 0.19}) == "+0.120 [+0.050, +0.190]"
    # largest |value| 1.71e-4 < 0.01: 2 - floor(log10 1.71e-4) = 6 decimals (3 significant digits)
    assert X._diff({"estimate": -1.46e-4, "low": -1.71e-4, "high": -1.21e-4}) == \
        "-0.000146 [-0.000171, -0.000121]"
    assert X._diff({"estimate": None, "low": None, "high": None}) == "n/a"
