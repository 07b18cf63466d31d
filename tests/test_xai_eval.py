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
