"""Known-answer tests for cervical.lime_lite (LIME on superpixels in NumPy)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import HERLEV, requires_herlev

from cervical import lime_lite as L



# ----------------------------------------------------------------------------- helpers
def quadrants(n: int = 12) -> np.ndarray:
    """(n, n) labels: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right."""
    seg = np.zeros((n, n), dtype=np.int64)
    h = n // 2
    seg[:h, h:] = 1
    seg[h:, :h] = 2
    seg[h:, h:] = 3
    return seg


def blocks(n: int = 32, k: int = 4) -> np.ndarray:
    """(n, n) labels of a k x k grid of square blocks, numbered row-major 0..k*k-1."""
    r = np.arange(n) * k // n
    return r[:, None] * k + r[None, :]


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth float RGB image in [0, 1] (sum of a few random colour blobs), SLIC-friendly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3))
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.15, 0.4) * max(h, w)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))[..., None] * rng.random(3)
    return img / img.max()


def visible_fraction_model(segments: np.ndarray, target: int, hidden_value: float):
    """A 'model' whose class-1 probability is the visible fraction of superpixel ``target``.

    A pixel is visible when it does not carry the hide colour ``hidden_value``.
    Returns (N, 2) probabilities [1 - frac, frac].
    """
    region = segments == target

    def predict(batch: np.ndarray) -> np.ndarray:
        visible = np.any(batch != hidden_value, axis=-1)  # (N, H, W)
        frac = visible[:, region].mean(axis=1)
        return np.stack([1.0 - frac, frac], axis=1)

    return predict


def sklearn_kernel(z: np.ndarray, width: float) -> np.ndarray:
    """Reference kernel: sklearn cosine distance to the all-ones row, then exp(-d^2 / (2 w^2))."""
    from sklearn.metrics.pairwise import cosine_distances

    d = cosine_distances(z.astype(float), np.ones((1, z.shape[1]))).ravel()
    return np.exp(-(d ** 2) / (2 * width ** 2))


# ----------------------------------------------------------------------------- kernel
def test_kernel_hand_values():
    # M = 4 superpixels.  |z|_1 = 4: d = 0, pi = 1.
    # |z|_1 = 2 (half on): d = 1 - sqrt(1/2), pi = exp(-(1 - 1/sqrt 2)^2 / (2 * 0.25^2)).
    # |z|_1 = 1: d = 1 - sqrt(1/4) = 1/2, pi = exp(-0.25 / 0.125) = exp(-2).
    # |z|_1 = 0: cosine similarity 0, d = 1, pi = exp(-1 / 0.125) = exp(-8).
    z = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
    d = L.cosine_distance_to_ones(z)
    np.testing.assert_allclose(d, [0.0, 1 - 1 / np.sqrt(2), 0.5, 1.0], atol=1e-15)
    pi = L.kernel_weights(z, 0.25)
    half = np.exp(-((1 - 1 / np.sqrt(2)) ** 2) / 0.125)
    np.testing.assert_allclose(pi, [1.0, half, np.exp(-2.0), np.exp(-8.0)], rtol=1e-14)
    assert abs(half - 0.5034) < 1e-4  # the number derived by hand: exp(-0.6863)


def test_kernel_matches_sklearn_cosine_distance():
    rng = np.random.default_rng(3)
    z = rng.integers(0, 2, size=(300, 23))
    z[0] = 1
    z = z[z.sum(axis=1) > 0]
    np.testing.assert_allclose(L.kernel_weights(z, 0.3), sklearn_kernel(z, 0.3), rtol=1e-12)


def test_kernel_rejects_bad_width():
    with pytest.raises(L.LimeError, match="kernel_width"):
        L.kernel_weights(np.ones((2, 3)), 0.0)


# ----------------------------------------------------------------------------- surrogate
@pytest.mark.parametrize("n,m,width", [(200, 12, 0.25), (1000, 50, 0.25), (60, 80, 0.5)])
def test_fit_surrogate_equals_sklearn_ridge(n, m, width):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(n + m)
    z = rng.integers(0, 2, size=(n, m)).astype(np.uint8)
    z[0] = 1
    y = rng.random(n)
    pi = sklearn_kernel(z, width)
    ref = Ridge(alpha=1.0, fit_intercept=True).fit(z, y, sample_weight=pi)

    w, b, score, local = L.fit_surrogate(z, y, kernel_width=width, alpha=1.0)
    np.testing.assert_allclose(w, ref.coef_, atol=1e-6, rtol=0)
    assert abs(b - ref.intercept_) < 1e-6
    assert abs(score - ref.score(z, y, sample_weight=pi)) < 1e-6
    assert abs(local - ref.predict(np.ones((1, m)))[0]) < 1e-6


def test_fit_surrogate_recovers_exact_linear_targets():
    rng = np.random.default_rng(7)
    n, m = 400, 15
    z = rng.integers(0, 2, size=(n, m))
    z[0] = 1
    beta = rng.normal(size=m)
    y = z @ beta + 0.3
    w, b, score, local = L.fit_surrogate(z, y, alpha=1e-10)
    np.testing.assert_allclose(w, beta, atol=1e-6)
    assert abs(b - 0.3) < 1e-6
    assert abs(score - 1.0) < 1e-9
    assert abs(local - (beta.sum() + 0.3)) < 1e-6  # surrogate at z = 1 = f(original)


def test_fit_surrogate_alpha_zero_rank_deficient_gives_min_norm():
    # Columns 0 and 1 identical: y = z0 is split equally (minimum-norm least squares).
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, size=(100, 3))
    z[:, 1] = z[:, 0]
    w, b, score, _ = L.fit_surrogate(z, z[:, 0].astype(float), alpha=0.0)
    np.testing.assert_allclose(w, [0.5, 0.5, 0.0], atol=1e-9)
    assert abs(b) < 1e-9 and abs(score - 1.0) < 1e-12


def test_weighted_r2_hand_values():
    # y = [0, 2], fitted = [1, 1], pi = [1, 3]: ybar = 6/4 = 1.5,
    # num = 1*1 + 3*1 = 4, den = 1*2.25 + 3*0.25 = 3 -> R^2 = 1 - 4/3 = -1/3.
    assert abs(L.weighted_r2([0.0, 2.0], [1.0, 1.0], [1.0, 3.0]) - (-1 / 3)) < 1e-15
    assert L.weighted_r2([1.0, 1.0], [1.0, 1.0], [1.0, 1.0]) == 1.0
    assert L.weighted_r2([1.0, 1.0], [0.0, 1.0], [1.0, 1.0]) == 0.0


def test_fit_surrogate_validates_shapes():
    with pytest.raises(L.LimeError, match="targets"):
        L.fit_surrogate(np.ones((5, 3)), np.ones(4))
    with pytest.raises(L.LimeError, match="alpha"):
        L.fit_surrogate(np.ones((5, 3)), np.ones(5), alpha=-1.0)


# ----------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("shape", [(8, 8), (17, 31), (40, 40), (110, 110)])
def test_segments_contiguous_any_size(shape):
    img = smooth_image(*shape, seed=sum(shape))
    seg = L.segment(img, n_segments=50)
    m = int(seg.max()) + 1
    assert seg.shape == shape and seg.min() == 0
    np.testing.assert_array_equal(np.unique(seg), np.arange(m))


def _herlev_cells(k: int = 4) -> list:
    files = sorted(glob.glob(os.path.join(HERLEV, "*", "*.BMP")))
    return files[:: max(1, len(files) // k)][:k]


@requires_herlev
@pytest.mark.parametrize("path", _herlev_cells())
def test_segments_contiguous_on_real_herlev_cells(path):
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))  # 40 x 40 uint8
    for n_segments in (10, 50, 200):
        seg = L.segment(img, n_segments=n_segments)
        m = int(seg.max()) + 1
        assert m >= 2
        np.testing.assert_array_equal(np.unique(seg), np.arange(m))
        # every label is perturbable: the last column of Z switches off exactly superpixel M-1
        fudged = np.zeros_like(img)
        z = np.ones((1, m), dtype=np.uint8)
        z[0, m - 1] = 0
        changed = np.any(L.perturb(img + 1, fudged, seg, z)[0] != img + 1, axis=-1)
        np.testing.assert_array_equal(changed, seg == m - 1)


def test_user_segments_relabelled():
    seg = np.array([[5, 5, 9], [1, 9, 9]])
    out = L._check_segments(seg, (2, 3))
    np.testing.assert_array_equal(out, [[1, 1, 2], [0, 2, 2]])
    with pytest.raises(L.LimeError, match="segments"):
        L._check_segments(seg, (3, 2))


# ----------------------------------------------------------------------------- hide colour / masks
def test_fudged_mean_constant_blur_hand_values():
    seg = quadrants(4)  # 2 x 2 quadrants
    img = np.zeros((4, 4, 3), dtype=np.float32)
    img[:2, :2] = [[[0, 0, 0], [2, 2, 2]], [[4, 4, 4], [6, 6, 6]]]  # quadrant 0 -> mean 3
    img[:2, 2:] = 1.0                                                  # quadrant 1 -> mean 1
    mean = L.fudged_image(img, seg, "mean")
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean[:2, :2], 3.0)
    np.testing.assert_allclose(mean[:2, 2:], 1.0)
    np.testing.assert_allclose(mean[2:], 0.0)
    const = L.fudged_image(img, seg, (0.1, 0.2, 0.3))
    np.testing.assert_allclose(const, np.broadcast_to([0.1, 0.2, 0.3], (4, 4, 3)), rtol=1e-6)
    flat = np.full((6, 6, 3), 0.25)
    np.testing.assert_allclose(L.fudged_image(flat, quadrants(6), "blur"), 0.25, atol=1e-12)
    u8 = np.zeros((4, 4, 3), dtype=np.uint8)
    u8[:2, :2, 0] = [[0, 1], [1, 1]]  # mean 0.75 -> rounds to 1
    got = L.fudged_image(u8, seg, "mean")
    assert got.dtype == np.uint8 and int(got[0, 0, 0]) == 1
    with pytest.raises(L.LimeError, match="hide_color"):
        L.fudged_image(img, seg, "grey")
    with pytest.raises(L.LimeError, match="hide_color"):
        L.fudged_image(img, seg, (1.0, 2.0))


def test_perturb_uses_segment_lookup():
    seg = quadrants(4)
    img = np.full((4, 4, 3), 7.0)
    fud = np.zeros((4, 4, 3))
    z = np.array([[1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=np.uint8)
    out = L.perturb(img, fud, seg, z)
    assert out.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(out[0], img)
    expect = np.where(np.isin(seg, [1, 2])[..., None], 7.0, 0.0) * np.ones(3)
    np.testing.assert_array_equal(out[1], expect)
    np.testing.assert_array_equal(out[2], fud)


def test_sample_masks_row0_and_seed():
    a = L.sample_masks(500, 20, seed=1)
    assert a.dtype == np.uint8 and a.shape == (500, 20)
    assert np.all(a[0] == 1)
    np.testing.assert_array_equal(a, L.sample_masks(500, 20, seed=1))
    assert not np.array_equal(a, L.sample_masks(500, 20, seed=2))
    assert abs(a[1:].mean() - 0.5) < 0.02  # Bernoulli(1/2): 9980 draws, sd 0.005


# ----------------------------------------------------------------------------- explain, known answers
def test_explain_visible_fraction_model_hand_segments():
    seg = blocks(32, 4)  # 16 superpixels
    target = 6
    img = np.ones((32, 32, 3), dtype=np.float32)
    model = visible_fraction_model(seg, target, hidden_value=-1.0)
    # y = z_target exactly; with a tiny alpha the surrogate is y = 1 * z_target + 0.
    exp = L.explain(model, img, class_index=1, num_samples=300, segments=seg,
                    hide_color=-1.0, alpha=1e-9, seed=0)
    expected = np.zeros(16)
    expected[target] = 1.0
    np.testing.assert_allclose(exp.weights, expected, atol=1e-7)
    assert abs(exp.intercept) < 1e-7 and abs(exp.score - 1.0) < 1e-9
    assert abs(exp.local_pred - 1.0) < 1e-7
    # default ridge alpha = 1: the target still dominates, others ~ 0
    exp1 = L.explain(model, img, class_index=1, num_samples=300, segments=seg,
                     hide_color=-1.0, seed=0)
    assert int(np.argmax(exp1.weights)) == target and exp1.weights[target] > 0.95
    assert np.max(np.abs(np.delete(exp1.weights, target))) < 0.02
    np.testing.assert_array_equal(exp1.top_features(1), [target])


def test_explain_visible_fraction_model_slic_segments():
    img = smooth_image(40, 40, seed=11).astype(np.float32)
    seg = L.segment(img, n_segments=30)
    target = int(seg[20, 20])
    model = visible_fraction_model(seg, target, hidden_value=-1.0)
    exp = L.explain(model, img, class_index=1, num_samples=400, n_segments=30,
                    hide_color=-1.0, seed=5)
    np.testing.assert_array_equal(exp.segments, seg)  # same image -> same SLIC superpixels
    assert int(np.argmax(exp.weights)) == target and exp.weights[target] > 0.95
    assert np.max(np.abs(np.delete(exp.weights, target))) < 0.03
    # class 0 = 1 - frac: the same superpixel, opposite sign
    assert int(np.argmin(exp.refit(0).weights)) == target


def test_explain_default_class_is_predicted_class_and_refit():
    seg = blocks(16, 2)
    img = np.ones((16, 16, 3))

    def model(batch):
        frac = np.any(batch != 0.0, axis=-1)[:, seg == 3].mean(axis=1)
        return np.stack([0.2 * frac, 0.8 * frac + 0.1, 0.1 * np.ones_like(frac)], axis=1)

    exp = L.explain(model, img, num_samples=64, segments=seg, hide_color=0.0)
    assert exp.class_index == 1  # argmax of f(image) = [0.2, 0.9, 0.1]
    np.testing.assert_allclose(exp.predictions[0], [0.2, 0.9, 0.1])
    other = exp.refit(2)
    w, b, s, lp = L.fit_surrogate(exp.samples, exp.predictions[:, 2])
    np.testing.assert_allclose(other.weights, w)
    assert other.class_index == 2 and other.intercept == b
    with pytest.raises(L.LimeError, match="class_index"):
        exp.refit(3)
    with pytest.raises(L.LimeError, match="class_index"):
        L.explain(model, img, class_index=5, num_samples=8, segments=seg)


def test_same_seed_same_output_different_seed_different_samples():
    img = smooth_image(24, 24, seed=2)
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(24 * 24 * 3, 4))

    def model(batch):
        logits = batch.reshape(len(batch), -1) @ proj
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    a = L.explain(model, img, num_samples=120, n_segments=20, seed=4, batch_size=32)
    b = L.explain(model, img, num_samples=120, n_segments=20, seed=4, batch_size=32)
    c = L.explain(model, img, num_samples=120, n_segments=20, seed=5, batch_size=32)
    np.testing.assert_array_equal(a.segments, b.segments)
    np.testing.assert_array_equal(a.samples, b.samples)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert a.intercept == b.intercept and a.score == b.score
    assert not np.array_equal(a.samples, c.samples)
    assert not np.array_equal(a.weights, c.weights)
    # batch size changes nothing but speed
    d = L.explain(model, img, num_samples=120, n_segments=20, seed=4, batch_size=7)
    np.testing.assert_allclose(d.weights, a.weights, rtol=1e-12, atol=1e-15)


def test_keras_like_object_uses_predict_on_batch_with_equal_batch_shapes():
    seg = blocks(8, 2)
    shapes = []

    class FakeKeras:
        def predict_on_batch(self, x):
            shapes.append(x.shape)
            return np.stack([x[:, 0, 0, 0], 1 - x[:, 0, 0, 0]], axis=1)

        def __call__(self, x):  # must not be used
            raise AssertionError("__call__ used instead of predict_on_batch")

    exp = L.explain(FakeKeras(), np.ones((8, 8, 3)), class_index=0, num_samples=10,
                    segments=seg, hide_color=0.0, batch_size=4, alpha=1e-9)
    # 10 rows, batch_size 4 -> 3 balanced batches of 3, 3, 4 -> all padded to 4
    assert shapes == [(4, 8, 8, 3)] * 3
    np.testing.assert_allclose(exp.weights, [1, 0, 0, 0], atol=1e-7)  # pixel (0,0) is in block 0


def test_batch_bounds_balanced():
    assert L._batch_bounds(1000, 256) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    sizes = [b - a for a, b in L._batch_bounds(1001, 256)]
    assert sum(sizes) == 1001 and max(sizes) - min(sizes) <= 1 and max(sizes) <= 256


def test_progress_quiet_by_default_and_callback(capsys):
    seg = blocks(8, 2)
    model = visible_fraction_model(seg, 0, hidden_value=0.0)
    L.explain(model, np.ones((8, 8, 3)), num_samples=20, segments=seg, hide_color=0.0, batch_size=8)
    assert capsys.readouterr().err == ""
    calls = []
    L.explain(model, np.ones((8, 8, 3)), num_samples=20, segments=seg, hide_color=0.0,
              batch_size=8, progress=lambda step, d, t: calls.append((step, d, t)))
    assert calls == [("lime samples", 7, 20), ("lime samples", 13, 20), ("lime samples", 20, 20)]
    assert capsys.readouterr().err == ""                  # the library never prints


def test_explain_errors_are_one_line_value_errors():
    seg = np.zeros((8, 8), dtype=int)
    model = lambda x: np.ones((len(x), 2))  # noqa: E731
    with pytest.raises(ValueError, match="n_segments") as info:
        L.explain(model, np.ones((8, 8, 3)), segments=seg)
    assert "\n" not in str(info.value)
    with pytest.raises(L.LimeError, match="image"):
        L.explain(model, np.ones((2, 8, 8, 3)))
    with pytest.raises(L.LimeError, match="predict"):
        L.explain(lambda x: np.ones((len(x) + 1, 2)), np.ones((8, 8, 3)), segments=blocks(8, 2))
    with pytest.raises(L.LimeError, match="num_samples"):
        L.explain(model, np.ones((8, 8, 3)), segments=blocks(8, 2), num_samples=1)


# ----------------------------------------------------------------------------- top features, masks, renders
def hand_explanation(image: np.ndarray) -> L.Explanation:
    """Quadrants with weights +0.5, -0.3, +0.1, -0.05 (hand-made, no model)."""
    seg = quadrants(image.shape[0])
    return L.Explanation(image=image, segments=seg, weights=np.array([0.5, -0.3, 0.1, -0.05]),
                         intercept=0.0, score=1.0, local_pred=0.25, class_index=0,
                         samples=np.ones((1, 4), np.uint8), predictions=np.ones((1, 1)))


def test_top_features_and_mask_hand_case():
    exp = hand_explanation(np.full((12, 12, 3), 0.5))
    np.testing.assert_array_equal(exp.top_features(2), [0, 2])
    np.testing.assert_array_equal(exp.top_features(5), [0, 2])
    np.testing.assert_array_equal(exp.top_features(2, positive_only=False), [0, 1])
    np.testing.assert_array_equal(exp.top_features(4, positive_only=False, min_weight=0.2), [0, 1])
    np.testing.assert_array_equal(exp.top_features(4, min_weight=0.2), [0])
    m = exp.mask(2, positive_only=False)
    expect = np.zeros((12, 12), dtype=np.int8)
    expect[:6, :6] = 1
    expect[:6, 6:] = -1
    np.testing.assert_array_equal(m, expect)
    np.testing.assert_array_equal(exp.mask(2), np.where(np.isin(quadrants(12), [0, 2]), 1, 0))


def test_render_colours_hand_case():
    exp = hand_explanation(np.full((12, 12, 3), 0.5))
    pc = exp.render(2, mode="pros_cons", boundaries="none")
    np.testing.assert_allclose(pc[:6, :6], np.broadcast_to([0.5, 1.0, 0.5], (6, 6, 3)))  # pro: green
    np.testing.assert_allclose(pc[:6, 6:], np.broadcast_to([1.0, 0.5, 0.5], (6, 6, 3)))  # con: red
    np.testing.assert_allclose(pc[6:], 0.5)
    hidden = exp.render(1, mode="positive", hide_rest=True, boundaries="none")
    np.testing.assert_allclose(hidden[:6, :6], np.broadcast_to([0.5, 1.0, 0.5], (6, 6, 3)))
    np.testing.assert_allclose(hidden[:, 6:], 0.0)
    np.testing.assert_allclose(hidden[6:], 0.0)
    # boundaries drawn inside the selected superpixel only, in yellow
    b = exp.render(1, mode="positive")
    np.testing.assert_allclose(b[5, 2], [1.0, 1.0, 0.0])   # edge of quadrant 0 facing quadrant 2
    np.testing.assert_allclose(b[2, 5], [1.0, 1.0, 0.0])   # edge facing quadrant 1
    np.testing.assert_allclose(b[2, 2], [0.5, 1.0, 0.5])   # interior stays green-tinted
    np.testing.assert_allclose(b[9, 9], [0.5, 0.5, 0.5])   # unselected, untouched
    # uint8 images are shown as x / 255
    u8 = hand_explanation(np.full((12, 12, 3), 51, dtype=np.uint8)).render(1, boundaries="none")
    np.testing.assert_allclose(u8[9, 9], [0.2, 0.2, 0.2])
    with pytest.raises(L.LimeError, match="mode"):
        exp.render(2, mode="both")


# ----------------------------------------------------------------------------- packaging
def test_import_is_light():
    code = ("import sys, cervical.lime_lite; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "assert 'keras' not in sys.modules, 'keras imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_real_keras_model_end_to_end():
    import keras
    seg = blocks(16, 4)
    target = 5
    region = (seg == target).astype("float32")

    # A hand-built Keras model: class-1 score = visible fraction of block 5 (pixels set to 0
    # when hidden), i.e. mean over the block of the channel-0 value of a 0/1 image.
    inp = keras.Input((16, 16, 3))
    frac = keras.layers.Lambda(
        lambda x: keras.ops.sum(x[..., 0] * region, axis=(1, 2)) / region.sum())(inp)
    out = keras.layers.Lambda(lambda f: keras.ops.stack([1.0 - f, f], axis=1))(frac)
    model = keras.Model(inp, out)
    exp = L.explain(model, np.ones((16, 16, 3), np.float32), num_samples=100, segments=seg,
                    hide_color=0.0, alpha=1e-9, batch_size=32)
    assert exp.class_index == 1
    expected = np.zeros(16)
    expected[target] = 1.0
    np.testing.assert_allclose(exp.weights, expected, atol=1e-5)


def test_fit_surrogate_flat_model_gives_zero_weights():
    # An untrained MobileNetV2 outputs exactly 1/5 for every image: the exact ridge answer is
    # beta = 0, b = 0.2 (centring in floating point would otherwise produce ~1e-32 "weights").
    z = np.random.default_rng(1).integers(0, 2, size=(50, 9))
    w, b, score, local = L.fit_surrogate(z, np.full(50, 0.2))
    np.testing.assert_array_equal(w, np.zeros(9))
    assert b == 0.2 and score == 1.0 and local == 0.2
