"""Known-answer tests of cervical.cams.

Every expected value below comes from a hand derivation (written in the comments) or from a plain
NumPy reference written here from the papers' equations, on hand-built models whose kernels and
dense weights are fixed, so that activations and gradients are known in closed form:
- Conv2D 1x1 with a 0/1 kernel copies image channels into feature channels;
- Flatten -> Dense gives dy^c/dA = the c-th column of the Dense kernel, reshaped to (h, w, K);
- GlobalAveragePooling -> Dense gives dy^c/dA^k_ij = W_kc / (h w), constant in space.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

import keras  # noqa: E402 - a dependency: its absence must fail, not skip

from cervical import cams  # noqa: E402

ALL_METHODS = ["gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam"]


# ----------------------------------------------------------------------------------------------
# Plain NumPy references (independent of cervical.cams)
# ----------------------------------------------------------------------------------------------


def ref_minmax(m):
    m = np.asarray(m, np.float64)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return (m - lo) / (hi - lo)


def ref_mask(m):
    """Score-CAM mask normalisation as tf-keras-vis writes it: (U - min) / (max - min + 1e-7)."""
    m = np.asarray(m, np.float64)
    lo = m.min(axis=(-2, -1), keepdims=True)
    hi = m.max(axis=(-2, -1), keepdims=True)
    return (m - lo) / (hi - lo + 1e-7)


def ref_resize(m, size):
    """Corner-aligned bilinear interpolation, one output pixel at a time."""
    m = np.asarray(m, np.float64)
    h, w = m.shape[-2:]
    H, W = size
    out = np.zeros(m.shape[:-2] + (H, W))
    for i in range(H):
        y = i * (h - 1) / (H - 1) if H > 1 else 0.0
        y0 = min(int(np.floor(y)), max(h - 2, 0))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(W):
            x = j * (w - 1) / (W - 1) if W > 1 else 0.0
            x0 = min(int(np.floor(x)), max(w - 2, 0))
            x1, fx = min(x0 + 1, w - 1), x - x0
            out[..., i, j] = ((1 - fy) * (1 - fx) * m[..., y0, x0] + (1 - fy) * fx * m[..., y0, x1]
                              + fy * (1 - fx) * m[..., y1, x0] + fy * fx * m[..., y1, x1])
    return out


def ref_conv_valid(x, kernel, bias):
    kh, kw = kernel.shape[:2]
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1])) + bias
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,ck->bhwk", x[:, i:i + ho, j:j + wo], kernel[i, j])
    return out


def ref_gradcam(A, G):
    w = G.mean(axis=(1, 2))  # Selvaraju eq. 1
    return np.maximum(np.einsum("bhwk,bk->bhw", A, w), 0)


def ref_layercam(A, G):
    return np.maximum((np.maximum(G, 0) * A).sum(-1), 0)


def ref_gradcam_pp(A, G, score):
    """tf-keras-vis' Grad-CAM++ including the exp(score) factor E (which must cancel)."""
    E = np.exp(score)[:, None, None, None]
    d1, d2, d3 = E * G, E * G ** 2, E * G ** 3
    s = A.sum(axis=(1, 2), keepdims=True)
    den = 2 * d2 + d3 * s
    den = den + (d2 == 0)
    alpha = d2 / den
    norm = alpha.sum(axis=(1, 2), keepdims=True)
    alpha = alpha / (norm + (norm == 0))
    w = (np.maximum(d1, 0) * alpha).sum(axis=(1, 2))
    return np.maximum(np.einsum("bhwk,bk->bhw", A, w), 0)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Hand-built models
# ----------------------------------------------------------------------------------------------


def head_output(x, units, head, name="logits"):
    """Dense head ending in softmax in one of four ways; returns the output tensor and the Dense."""
    activation = "softmax" if head == "dense_softmax" else None
    dense = keras.layers.Dense(units, activation=activation, name=name)
    y = dense(x)
    if head == "softmax_layer":
        y = keras.layers.Softmax()(y)
    elif head == "activation_softmax":
        y = keras.layers.Activation("softmax")(y)
        y = keras.layers.Activation("linear", dtype="float32")(y)  # mixed-precision style cast
    elif head != "logits" and head != "dense_softmax":
        raise AssertionError(head)
    return y, dense


HEADS = ["dense_softmax", "softmax_layer", "activation_softmax", "logits"]


def hand_model_2x2(head="dense_softmax"):
    """Input 2x2x3 -> 1x1 conv (A^0 = red, A^1 = green) -> Flatten -> Dense(2).

    Dense column 0 (class 0) over the flattened (i, j, k) index 2*(2i+j)+k:
        dy0/dA^0 = [[1, 0], [0, 1]],  dy0/dA^1 = [[0, 0], [0, -1]];  column 1 = 0.1 everywhere.
    """
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 1.0
    dense_w = np.full((8, 2), 0.1, np.float32)
    dense_w[:, 0] = 0.0
    dense_w[0, 0] = dense_w[6, 0] = 1.0
    dense_w[7, 0] = -1.0
    inp = keras.Input((2, 2, 3))
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name="feat")
    out, dense = head_output(keras.layers.Flatten()(conv(inp)), 2, head)
    model = keras.Model(inp, out)
    conv.set_weights([kernel])
    dense.set_weights([dense_w, np.zeros(2, np.float32)])
    return model


IMAGE_2x2 = np.stack([[[1, 2], [3, 4]], [[4, 3], [2, 1]], [[7, 7], [7, 7]]], axis=-1)[None].astype(np.float32)


def conv_flatten_model(seed=0, size=6, classes=4, head="dense_softmax"):
    """Input size x size x 3 -> Conv2D(3, 3x3 valid, ReLU) -> Flatten -> Dense(classes)."""
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0, 0.2, (3, 3, 3, 3)).astype(np.float32)
    bias = np.array([0.1, -0.1, 0.05], np.float32)
    hw = size - 2
    dense_w = rng.normal(0, 0.3, (hw * hw * 3, classes)).astype(np.float32)
    dense_b = rng.normal(0, 0.1, classes).astype(np.float32)
    inp = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(3, 3, activation="relu", name="feat")
    out, dense = head_output(keras.layers.Flatten()(conv(inp)), classes, head)
    model = keras.Model(inp, out)
    conv.set_weights([kernel, bias])
    dense.set_weights([dense_w, dense_b])
    return model, (kernel, bias, dense_w, dense_b)


def small_cnn(seed=0, size=12, classes=3, dtype=None):
    """A random small CNN (conv-BN-ReLU-pool-conv-ReLU-GAP-dropout-dense softmax) for consistency tests."""
    kw = {} if dtype is None else {"dtype": dtype}
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0, **kw)(inp)
    x = keras.layers.Conv2D(6, 3, padding="same", name="c1", **kw)(x)
    x = keras.layers.BatchNormalization(name="bn1", **kw)(x)
    x = keras.layers.ReLU(name="r1", **kw)(x)
    x = keras.layers.MaxPooling2D(2, **kw)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2", **kw)(x)
    x = keras.layers.ReLU(name="r2", **kw)(x)
    x = keras.layers.GlobalAveragePooling2D(**kw)(x)
    x = keras.layers.Dropout(0.5, **kw)(x)
    out = keras.layers.Dense(classes, activation="softmax", name="logits", **kw)(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) if w.ndim > 1 else
                       rng.uniform(0.5, 1.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def random_images(n, size, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Post-processing helpers
# ----------------------------------------------------------------------------------------------


def test_resize_bilinear_corner_aligned_known_values():
    # [[0,1],[2,3]] to 3x3: corners kept, midpoints are averages of their neighbours.
    out = cams.resize_bilinear(np.array([[0.0, 1.0], [2.0, 3.0]]), (3, 3))
    np.testing.assert_allclose(out, [[0, 0.5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-12)
    # A 1x1 map is replicated; a 1-D ramp resized 3 -> 5 samples at 0, 0.5, 1, 1.5, 2.
    np.testing.assert_allclose(cams.resize_bilinear(np.array([[5.0]]), (2, 3)), np.full((2, 3), 5.0))
    np.testing.assert_allclose(cams.resize_bilinear(np.array([[0.0, 2.0, 4.0]]), (1, 5)), [[0, 1, 2, 3, 4]])
    maps = np.random.default_rng(0).normal(size=(2, 3, 4, 5))
    np.testing.assert_allclose(cams.resize_bilinear(maps, (7, 9)), ref_resize(maps, (7, 9)), atol=1e-12)


def test_minmax_normalize_known_values_and_constant_maps():
    out = cams.minmax_normalize(np.array([[[2.0, 4.0], [6.0, 10.0]], [[3.0, 3.0], [3.0, 3.0]]]))
    np.testing.assert_allclose(out[0], [[0, 0.25], [0.5, 1]], atol=1e-12)
    assert np.array_equal(out[1], np.zeros((2, 2)))  # constant map -> zeros, not NaN
    tiny = np.array([[0.0, 1e-9], [2e-9, 4e-9]])  # scale-free: a tiny map is not "constant"
    np.testing.assert_allclose(cams.minmax_normalize(tiny), [[0, 0.25], [0.5, 1]])
    assert np.array_equal(cams.minmax_normalize(np.zeros((3, 4))), np.zeros((3, 4)))


# ----------------------------------------------------------------------------------------------
# Gradient methods: hand-derived maps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_gradient_methods_hand_derived_2x2(head):
    """Image R = [[1,2],[3,4]], G = [[4,3],[2,1]]; A^0 = R, A^1 = G; class 0 (predicted: z0 = 4 > z1 = 2).

    Grad-CAM: w0 = mean([[1,0],[0,1]]) = 0.5, w1 = mean([[0,0],[0,-1]]) = -0.25;
      0.5 R - 0.25 G = [[-0.5, 0.25], [1, 1.75]] -> ReLU -> / 1.75 = [[0, 1/7], [4/7, 1]].
    LayerCAM: ReLU(G^0) * R + ReLU(G^1) * G = [[1, 0], [0, 4]] -> [[1/4, 0], [0, 1]].
    Grad-CAM++: channel 0: S = 10, alpha = 1/(2 + 10) at the two ones, 0 elsewhere; normalised -> 1/2;
      w0 = 1 * 1/2 + 1 * 1/2 = 1. Channel 1: alpha = 1/(2 - 10) = -1/8, normalised -> 1; w1 = ReLU(-1) = 0.
      map = R -> [[0, 1/3], [2/3, 1]].
    The head variants (softmax in the Dense, a Softmax layer, an Activation layer + cast, raw logits)
    must all give these maps: the logits are differentiated, never the softmax. (Differentiating the
    softmax probability would give Grad-CAM [[0, 0], [0.4, 1]].)
    """
    model = hand_model_2x2(head)
    expected = {
        "gradcam": [[0, 1 / 7], [4 / 7, 1]],
        "layercam": [[0.25, 0], [0, 1]],
        "gradcam++": [[0, 1 / 3], [2 / 3, 1]],
    }
    for method, want in expected.items():
        got = cams.compute(method, model, IMAGE_2x2, upsample=False)
        assert got.dtype == np.float32 and got.shape == (1, 2, 2)
        np.testing.assert_allclose(got[0], want, atol=1e-6, err_msg=f"{method}/{head}")
    # Explicit class and explicit layer give the same; upsampling to the 2x2 input is the identity.
    got = cams.gradcam(model, IMAGE_2x2, class_index=0, layer="feat")[0]
    np.testing.assert_allclose(got, expected["gradcam"], atol=1e-6)


def test_softmax_gradient_would_differ():
    """Guard for the test above: Grad-CAM on the gradient of the *probability* (derived by hand in
    its docstring as [[0, 0], [0.4, 1]]) differs from the logit map our implementation returns."""
    got = cams.gradcam(hand_model_2x2("dense_softmax"), IMAGE_2x2, upsample=False)[0]
    assert np.abs(got - np.array([[0, 0], [0.4, 1]])).max() > 0.1


@pytest.mark.parametrize("head", ["dense_softmax", "logits"])
def test_gradient_methods_match_numpy_reference(head):
    """3x3 conv + ReLU + Flatten + Dense: A by a NumPy convolution, G = Dense column reshaped."""
    model, (k, b, w, bias) = conv_flatten_model(seed=3, head=head)
    x = random_images(3, 6, seed=4) / 255.0
    classes = np.array([2, 0, 3])
    A = ref_conv_valid(x.astype(np.float64), k, b)
    A = np.maximum(A, 0)
    G = np.stack([w[:, c].reshape(4, 4, 3) for c in classes]).astype(np.float64)
    logits = A.reshape(3, -1) @ w + bias
    score = logits[np.arange(3), classes]
    refs = {"gradcam": ref_gradcam(A, G), "layercam": ref_layercam(A, G),
            "gradcam++": ref_gradcam_pp(A, G, score)}
    for method, raw in refs.items():
        got = cams.compute(method, model, x, class_index=classes, upsample=False)
        np.testing.assert_allclose(got, ref_minmax(raw), atol=2e-5, err_msg=method)
        up = cams.compute(method, model, x, class_index=classes, upsample=True)
        np.testing.assert_allclose(up, ref_minmax(ref_resize(raw, (6, 6))), atol=2e-5, err_msg=method)


def test_gradcam_equals_layercam_for_constant_positive_gradients():
    """Conv(ReLU) -> GAP -> Dense with positive weights: dy^c/dA^k_ij = W_kc / (h w) > 0, the same at
    every position, so LayerCAM's ReLU(G) * A equals Grad-CAM's w_k A^k; both = ReLU(sum_k W_kc A^k)."""
    rng = np.random.default_rng(5)
    inp = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, activation="relu", name="feat")
    dense = keras.layers.Dense(3)
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    kernel = rng.normal(0, 0.5, (3, 3, 3, 4)).astype(np.float32)
    conv.set_weights([kernel, np.zeros(4, np.float32)])
    W = rng.uniform(0.1, 1.0, (4, 3)).astype(np.float32)
    dense.set_weights([W, np.zeros(3, np.float32)])
    x = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    A = np.maximum(ref_conv_valid(x.astype(np.float64), kernel, 0.0), 0)
    want = ref_minmax(np.maximum(np.einsum("bhwk,k->bhw", A, W[:, 1]), 0))
    g = cams.gradcam(model, x, class_index=1, upsample=False)
    lc = cams.layercam(model, x, class_index=1, upsample=False)
    np.testing.assert_allclose(g, want, atol=1e-5)
    np.testing.assert_allclose(lc, g, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Score-CAM and Faster-Score-CAM
# ----------------------------------------------------------------------------------------------


def score_model(pool):
    """Input 6x6x3 -> Conv2D(3, 3x3 same, ReLU) [-> AvgPool 2] -> GAP -> Dense(3, softmax)."""
    rng = np.random.default_rng(7)
    inp = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="feat")
    x = conv(inp)
    if pool:
        x = keras.layers.AveragePooling2D(2, name="pool")(x)
    dense = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(x)))
    conv.set_weights([rng.normal(0, 0.5, (3, 3, 3, 3)).astype(np.float32), np.full(3, 0.2, np.float32)])
    dense.set_weights([rng.normal(0, 2.0, (3, 3)).astype(np.float32), np.zeros(3, np.float32)])
    return model, ("pool" if pool else "feat")


@pytest.mark.parametrize("pool", [False, True])
def test_scorecam_weights_are_probabilities_of_hand_masked_inputs(pool):
    """Masks built here: M^k = minmax(resize(A^k)); w_k = model.predict(X * M^k)[c] (the model already
    ends in softmax, so its output is the probability); map = minmax(ReLU(sum_k w_k A^k)).
    Channel 0 of this model is dead (ReLU of negative values: A^0 = 0), so its mask is 0."""
    model, layer = score_model(pool)
    x = random_images(2, 6, seed=8) / 255.0
    classes = np.array([1, 2])
    A = keras.Model(model.inputs, model.get_layer(layer).output).predict(x, verbose=0).astype(np.float64)
    assert np.all(A[..., 0] == 0) and np.all(A[..., 1:].std(axis=(1, 2)) > 0.005)
    raw = []
    for b in range(2):
        masks = ref_mask(ref_resize(np.moveaxis(A[b], -1, 0), (6, 6)))  # (K, 6, 6); dead channel 0 -> 0
        masked = x[b][None] * masks[..., None]
        w = model.predict(masked.astype(np.float32), verbose=0)[:, classes[b]]
        raw.append(np.maximum(np.einsum("hwk,k->hw", A[b], w), 0))
    raw = np.stack(raw)
    got = cams.scorecam(model, x, class_index=classes, layer=layer, upsample=False, batch_size=4)
    np.testing.assert_allclose(got, ref_minmax(raw), atol=1e-5)
    # Faster-Score-CAM with max_n = K is Score-CAM.
    faster = cams.faster_scorecam(model, x, class_index=classes, layer=layer, max_n=3, upsample=False)
    np.testing.assert_allclose(faster, got, atol=1e-6)


def test_scorecam_on_logit_model_uses_softmax_probabilities():
    """Same network without the final softmax: Score-CAM must apply it (probabilities, not logits)."""
    soft, _ = score_model(False)
    inp = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="feat")
    dense = keras.layers.Dense(3)
    logit = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    logit.set_weights(soft.get_weights())
    x = random_images(2, 6, seed=9) / 255.0
    np.testing.assert_allclose(cams.scorecam(logit, x), cams.scorecam(soft, x), atol=1e-5)


def test_scorecam_single_sigmoid_unit_uses_its_probability():
    """A one-unit sigmoid head: w_k = sigmoid(z(X * M^k)) = model.predict(X * M^k) (a softmax over one
    unit would be 1 for every channel, tf-keras-vis #103)."""
    rng = np.random.default_rng(21)
    inp = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="feat")
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    conv.set_weights([rng.normal(0, 0.5, (3, 3, 3, 3)).astype(np.float32), np.full(3, 0.3, np.float32)])
    dense.set_weights([np.array([[3.0], [-2.0], [1.0]], np.float32), np.array([0.5], np.float32)])
    x = random_images(1, 6, seed=22) / 255.0
    A = keras.Model(model.inputs, conv.output).predict(x, verbose=0)[0].astype(np.float64)
    masks = ref_mask(np.moveaxis(A, -1, 0))
    w = model.predict((x[0][None] * masks[..., None]).astype(np.float32), verbose=0)[:, 0]
    assert np.ptp(w) > 1e-3  # the weights differ, so the test can tell them from all-ones
    want = ref_minmax(np.maximum(np.einsum("hwk,k->hw", A, w), 0))
    np.testing.assert_allclose(cams.scorecam(model, x, class_index=0, upsample=False)[0], want, atol=1e-5)


def test_faster_scorecam_selects_channels_per_image():
    """1x1 identity conv + ReLU: A^k = image channel k. With max_n = 1 only the channel of largest
    spatial std is kept *per image*; its weight is a probability > 0, so map = minmax(A^k*).
    Image 0 varies most in channel 0, image 1 in channel 2."""
    inp = keras.Input((5, 5, 3))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="feat")
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    conv.set_weights([np.eye(3, dtype=np.float32)[None, None], np.zeros(3, np.float32)])
    dense.set_weights([np.array([[1, -1], [0.5, 0.5], [-1, 1]], np.float32), np.zeros(2, np.float32)])
    rng = np.random.default_rng(10)
    x = rng.uniform(0.4, 0.6, (2, 5, 5, 3)).astype(np.float32)
    x[0, ..., 0] = rng.uniform(0, 10, (5, 5))
    x[1, ..., 2] = rng.uniform(0, 10, (5, 5))
    got = cams.faster_scorecam(model, x, max_n=1, upsample=False)
    np.testing.assert_allclose(got[0], ref_minmax(x[0, ..., 0]), atol=1e-6)
    np.testing.assert_allclose(got[1], ref_minmax(x[1, ..., 2]), atol=1e-6)
    # Per image: each image alone gives the same map (tf-keras-vis' batch union would not).
    alone = cams.faster_scorecam(model, x[1:], max_n=1, upsample=False)[0]
    np.testing.assert_allclose(alone, got[1], atol=1e-6)
    # max_n larger than the number of channels keeps them all (= Score-CAM); max_n < 1 is an error.
    np.testing.assert_allclose(cams.faster_scorecam(model, x, max_n=10), cams.scorecam(model, x), atol=1e-6)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(cams.CamError, match="max_n"):
            cams.scorecam(model, x, max_n=bad)


# ----------------------------------------------------------------------------------------------
# Batches, class indices, model kinds
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL_METHODS)
def test_batch_equals_per_image_and_class_list_is_honoured(method):
    model = small_cnn(seed=11)
    x = random_images(3, 12, seed=12)
    classes = [2, 0, 1]
    kw = {"max_n": 4} if method == "faster-scorecam" else {}
    batch = cams.compute(method, model, x, class_index=classes, **kw)
    assert batch.shape == (3, 12, 12) and batch.dtype == np.float32
    for i, c in enumerate(classes):
        single = cams.compute(method, model, x[i:i + 1], class_index=c, **kw)
        np.testing.assert_allclose(batch[i], single[0], atol=1e-4, err_msg=f"{method} image {i}")
    # Chunking (batch_size=2 over 3 images) changes nothing; None means each image's own argmax.
    chunked = cams.compute(method, model, x, class_index=classes, batch_size=2, **kw)
    np.testing.assert_allclose(chunked, batch, atol=1e-4)
    predicted = model.predict(x, verbose=0).argmax(-1)
    by_argmax = cams.compute(method, model, x, class_index=predicted, **kw)
    np.testing.assert_allclose(cams.compute(method, model, x, **kw), by_argmax, atol=1e-6)
    # The class list is not ignored: where it differs from the prediction, so does the map.
    differs = [i for i in range(3) if classes[i] != predicted[i]]
    assert differs and all(np.abs(batch[i] - by_argmax[i]).max() > 1e-3 for i in differs)


def test_class_index_validation():
    model = small_cnn(seed=13)
    x = random_images(3, 12)
    for bad in ([0, 1], [0, 1, 3], -1, 3, True, [0.5, 1, 2], "a"):
        with pytest.raises(cams.CamError, match="class_index"):
            cams.gradcam(model, x, class_index=bad)


def test_int_class_index_applies_to_every_image():
    model, _ = conv_flatten_model(seed=14)
    x = random_images(2, 6, seed=15) / 255.0
    both = cams.gradcam(model, x, class_index=[3, 3])
    np.testing.assert_allclose(cams.gradcam(model, x, class_index=3), both, atol=1e-7)


def build_backbone(name="backbone"):
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="c1")(inp)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="r1")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = keras.layers.ReLU(name="r2")(x)
    return keras.Model(inp, x, name=name)


def test_nested_backbone_equals_flat_model():
    """Transfer-learning layout (Rescaling -> nested backbone -> GAP -> Dropout -> Dense softmax), the
    same as a Sequential and as one flat functional graph with identical weights: identical maps."""
    flat = small_cnn(seed=16)
    backbone = build_backbone()
    inp = keras.Input((12, 12, 3))
    x = backbone(keras.layers.Rescaling(1 / 255.0)(inp))
    x = keras.layers.Dropout(0.5)(keras.layers.GlobalAveragePooling2D()(x))
    nested = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(x))
    nested.set_weights(flat.get_weights())
    backbone.trainable = False  # a frozen backbone must not stop the gradients w.r.t. A
    seq = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Rescaling(1 / 255.0),
                            build_backbone("bb2"), keras.layers.GlobalAveragePooling2D(),
                            keras.layers.Dense(3, activation="softmax")])
    seq.set_weights(flat.get_weights())
    for model in (nested, flat, seq):
        assert cams.find_target_layer(model) == "r2"
    x = random_images(2, 12, seed=17)
    for method in ALL_METHODS:
        want = cams.compute(method, flat, x, class_index=[0, 2])
        cases = ((nested, None), (nested, "r2"), (nested, "backbone/r2"), (nested, "backbone"), (seq, None))
        for model, layer in cases:
            got = cams.compute(method, model, x, class_index=[0, 2], layer=layer)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{method} {model.name} {layer}")
    # An earlier, finer layer of the nested model: 12x12 feature map of r1.
    fine = cams.gradcam(nested, x, layer="r1", upsample=False)
    assert fine.shape == (2, 12, 12)
    np.testing.assert_allclose(fine, cams.gradcam(flat, x, layer="r1", upsample=False), atol=1e-4)


def test_find_target_layer_rules():
    # Post-activation, pooling and dropout skipped, 1x1-spatial layers skipped.
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.SpatialDropout2D(0.1, name="drop")(x)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = keras.layers.Conv2D(3, 1, name="logit_conv")(x)  # (1, 1, 3): spatial size 1
    model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Flatten()(x)))
    assert cams.find_target_layer(model) == "act"
    # Duplicate names across nesting levels are returned as a path, and the path resolves.
    inp2 = keras.Input((8, 8, 3))
    inner_map = keras.layers.ReLU(name="r")(keras.layers.Conv2D(2, 3, name="c")(inp2))
    inner = keras.Model(inp2, inner_map, name="inner")
    outer_in = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(3, 1, name="c")(outer_in)
    model2 = keras.Model(outer_in, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(inner(y))))
    assert cams.find_target_layer(model2) == "r"
    assert cams.resolve_layer(model2, "c")[1] is model2.get_layer("c")  # the shallowest wins
    assert cams.resolve_layer(model2, "inner/c")[1] is inner.get_layer("c")
    no_maps = keras.Model(i3 := keras.Input((4,)), keras.layers.Dense(2)(i3))
    with pytest.raises(cams.CamError, match="4-D"):
        cams.find_target_layer(no_maps)


def test_find_target_layer_keras_applications():
    """The post-activation output of a nested keras.applications backbone (not the pre-BN Conv_1)."""
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3),
                                              alpha=0.35)
    inp = keras.Input((64, 64, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(inp))
    model = keras.Model(inp, keras.layers.Dense(5, activation="softmax")(pooled))
    assert cams.find_target_layer(model) == "out_relu"


def test_errors_are_clear():
    model = small_cnn(seed=18)
    x = random_images(2, 12)
    with pytest.raises(cams.CamError, match="images"):
        cams.gradcam(model, x[0])
    with pytest.raises(cams.CamError, match="nope"):
        cams.gradcam(model, x, layer="nope")
    with pytest.raises(cams.CamError, match="4-D"):
        cams.gradcam(model, x, layer="logits")
    with pytest.raises(cams.CamError, match="unknown CAM method"):
        cams.compute("eigencam", model, x)
    two = keras.Model(model.inputs, [model.output, model.get_layer("r2").output])
    with pytest.raises(cams.CamError, match="outputs"):
        cams.gradcam(two, x)
    assert cams.compute("Grad-CAM++", model, x).shape == (2, 12, 12)


def test_weight_updates_are_seen_after_caching():
    """Compiled functions read live variables: negating the class-0 Dense column turns
    0.5 R - 0.25 G into -0.5 R + 0.25 G = [[0.5, -0.25], [-1, -1.75]] -> [[1, 0], [0, 0]]."""
    model = hand_model_2x2("logits")
    before = cams.gradcam(model, IMAGE_2x2, class_index=0, upsample=False)[0]
    np.testing.assert_allclose(before, [[0, 1 / 7], [4 / 7, 1]], atol=1e-6)
    dense = model.get_layer("logits")
    w, b = dense.get_weights()
    w[:, 0] *= -1
    dense.set_weights([w, b])
    after = cams.gradcam(model, IMAGE_2x2, class_index=0, upsample=False)[0]
    np.testing.assert_allclose(after, [[1, 0], [0, 0]], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Localisation, degenerate maps, mixed precision, overlay
# ----------------------------------------------------------------------------------------------


def region_model(pool):
    """1x1 conv A^0 = red, A^1 = green [-> AvgPool 2] -> GAP -> Dense: z0 = mean A^0 - mean A^1 = -z1."""
    inp = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 1, use_bias=False, activation="relu", name="feat")
    x = conv(inp)
    if pool:
        x = keras.layers.AveragePooling2D(2, name="pool")(x)
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(x)))
    kernel = np.zeros((1, 1, 3, 2), np.float32)
    kernel[0, 0, 0, 0] = kernel[0, 0, 1, 1] = 1.0 / 255.0
    conv.set_weights([kernel])
    dense.set_weights([np.array([[1, -1], [-1, 1]], np.float32), np.zeros(2, np.float32)])
    return model


def region_image():
    """Grey background (R = G = B = 100): no evidence for either class; a red 8x8 square at [4:12, 4:12]
    (R = 220) is the only evidence for class 0."""
    x = np.full((1, 16, 16, 3), 100.0, np.float32)
    x[0, 4:12, 4:12, 0] = 220.0
    region = np.zeros((16, 16), bool)
    region[4:12, 4:12] = True
    return x, region


@pytest.mark.parametrize("method", ALL_METHODS)
def test_energy_lies_in_the_deciding_region(method):
    """Without pooling every map is exactly the square's indicator: Grad-CAM ~ ReLU(A^0 - A^1) (w0 = -w1),
    LayerCAM and Grad-CAM++ ~ A^0 (only channel 0 has positive gradients), Score-CAM = w0 A^0 + w1 A^1
    with A^1 constant (its mask is 0, w1 = p(black image) = 1/2) and A^0 larger inside -> min-max gives
    1 inside, 0 outside. All the energy lies in the square.

    Targeting the 2x2 average-pooling layer, the feature map is the 8x8 indicator of block [2:6, 2:6];
    corner-aligned upsampling to 16 samples feature coordinate i * 7/15, so one row of the map is
    u = [0, 0, 0, 0.4, 13/15, 1, 1, 1, 1, 1, 1, 13/15, 0.4, 0, 0, 0] and the map is outer(u, u).
    Energy inside the square: (116/15 / (128/15))^2 = (116/128)^2 = 0.8213."""
    x, region = region_image()
    exact = cams.compute(method, region_model(False), x)[0]
    np.testing.assert_allclose(exact, region.astype(np.float32), atol=1e-6)
    assert exact[region].sum() / exact.sum() == pytest.approx(1.0)
    pooled = cams.compute(method, region_model(True), x, layer="pool")[0]
    u = np.array([0, 0, 0, 0.4, 13 / 15, 1, 1, 1, 1, 1, 1, 13 / 15, 0.4, 0, 0, 0])
    np.testing.assert_allclose(pooled, np.outer(u, u), atol=1e-6)
    assert pooled[region].sum() / pooled.sum() == pytest.approx((116 / 128) ** 2, abs=1e-5)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_constant_feature_maps_give_zeros(method):
    """Zero conv kernel, bias 1: every A^k_ij = 1 -> every map is constant -> zeros, never NaN."""
    inp = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="feat")
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inp, dense(keras.layers.GlobalAveragePooling2D()(conv(inp))))
    conv.set_weights([np.zeros((3, 3, 3, 2), np.float32), np.ones(2, np.float32)])
    dense.set_weights([np.array([[1.0, -1.0], [0.5, 2.0]], np.float32), np.zeros(2, np.float32)])
    x = random_images(2, 6)
    kw = {"max_n": 1} if method == "faster-scorecam" else {}
    for upsample in (True, False):
        out = cams.compute(method, model, x, upsample=upsample, **kw)
        assert np.array_equal(out, np.zeros_like(out))


def test_all_negative_evidence_gives_zeros():
    """Negated class-0 column on the 2x2 model and G = 1 everywhere: Grad-CAM weights w0 = -0.5,
    w1 = +0.25, so -0.5 R + 0.25 = [[-0.25, -0.75], [-1.25, -1.75]] < 0 -> ReLU -> constant 0 -> zeros."""
    model = hand_model_2x2("logits")
    dense = model.get_layer("logits")
    w, b = dense.get_weights()
    w[:, 0] *= -1
    dense.set_weights([w, b])
    image = IMAGE_2x2.copy()
    image[..., 1] = 1.0
    out = cams.gradcam(model, image, class_index=0)
    assert np.array_equal(out, np.zeros_like(out))


def test_mixed_float16_model_runs_and_matches_float32():
    """Layers computing in float16 (mixed_float16) give finite maps in [0, 1], within float16
    precision of the float32 model with the same weights."""
    f32 = small_cnn(seed=19)
    f16 = small_cnn(seed=19, dtype="mixed_float16")
    f16.set_weights(f32.get_weights())
    x = random_images(2, 12, seed=20)
    for method in ALL_METHODS:
        kw = {"max_n": 4} if method == "faster-scorecam" else {}
        a = cams.compute(method, f16, x, class_index=[0, 1], **kw)
        assert a.dtype == np.float32 and np.all(np.isfinite(a)) and a.min() >= 0 and a.max() <= 1
        b = cams.compute(method, f32, x, class_index=[0, 1], **kw)
        assert np.abs(a - b).max() < 0.05, method


def test_overlay_known_colours():
    image = np.full((4, 4, 3), 200, np.uint8)
    cam = np.zeros((2, 2))
    np.testing.assert_array_equal(cams.overlay(image, cam, alpha=0.0), image)
    # jet(0) = (0, 0, 0.5): alpha 1 gives pure dark blue (0, 0, 127.5 -> 128).
    blue = np.broadcast_to([0, 0, 128], (4, 4, 3))
    np.testing.assert_array_equal(cams.overlay(image, cam, alpha=1.0), blue)
    # alpha 0.5 over grey 200 with jet(1) = (0.5, 0, 0): (100 + 63.75, 100, 100) -> (164, 100, 100).
    out = cams.overlay(image, np.ones((4, 4)), alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [164, 100, 100])
    grey = cams.overlay(np.full((4, 4), 200.0), np.ones((4, 4)), alpha=0.5)  # 2-D image -> RGB
    np.testing.assert_array_equal(grey[0, 0], [164, 100, 100])
    with pytest.raises(cams.CamError, match="colormap"):
        cams.overlay(image, cam, colormap="no-such-map")
    with pytest.raises(cams.CamError, match="alpha"):
        cams.overlay(image, cam, alpha=2)
