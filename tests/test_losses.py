"""Known-answer tests for cervical.losses.

Each loss is checked three ways:
  1. against a plain NumPy reference below (loops over anchors, float64, written from the papers'
     equations and readable as lecture material), on random batches;
  2. against closed forms derived by hand (the derivations are in the comments);
  3. by properties the equations imply: invariances, finite gradients, and a toy problem on which
     training must separate the classes instead of collapsing (the study's failure).
"""

import math

import numpy as np
import pytest

import keras  # noqa: E402 - dependencies: their absence must fail, not skip
import tensorflow as tf  # noqa: E402

from cervical import losses  # noqa: E402

RTOL = 1e-5        # float32 TensorFlow vs float64 NumPy reference
ATOL = 1e-7        # only matters where the exact answer is 0


def assert_close_to_closed_form(got, expected, logit_scale):
    """rtol 1e-5, plus the float32 resolution of logits of size ``logit_scale`` (e.g. 1/tau).

    A closed form such as log(1 + e^{-1/tau}) is tiny at small tau; float32 computes it as
    s - logsumexp(s) with s ~ 1/tau, so its absolute error is a few ulp of 1/tau, not 1e-5 of it.
    """
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6 * logit_scale)


# ------------------------------------------------------------------------------------------------
# NumPy references (float64, loops; no vectorisation tricks on purpose)
# ------------------------------------------------------------------------------------------------

def ref_normalize(v):
    """v / |v| (with the same 1e-12 floor on |v|^2 as tf.math.l2_normalize)."""
    v = np.asarray(v, np.float64)
    return v / math.sqrt(max(float(np.dot(v, v)), 1e-12))


def ref_anchors(labels, features):
    """Unit vectors and labels of all N = B*V anchors (views of a sample share its label)."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim == 2:
        f = f[:, None, :]
    z, lab = [], []
    for view in range(f.shape[1]):
        for b in range(f.shape[0]):
            z.append(ref_normalize(f[b, view]))
            lab.append(y[b])
    return z, lab


def ref_logsumexp(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def ref_supcon(labels, features, tau, tau_base, include_self=False):
    """Khosla et al. 2020, Eq. 2 (L_out), one anchor at a time.

    include_self=True keeps the anchor itself among its positives and in its denominator: that
    is the study's npairs loss (checked below), i.e. the two losses differ only by the self-pair.
    """
    z, y = ref_anchors(labels, features)
    n = len(z)
    total = 0.0
    for i in range(n):
        s = [float(np.dot(z[i], z[a])) / tau for a in range(n)]
        contrast = [a for a in range(n) if include_self or a != i]          # A(i)
        positives = [p for p in contrast if y[p] == y[i]]                    # P(i)
        if not positives:
            continue                                                         # contributes 0
        log_denominator = ref_logsumexp([s[a] for a in contrast])
        total += -sum(s[p] - log_denominator for p in positives) / len(positives)
    return tau / tau_base * total / n


def ref_npairs(labels, features, tau):
    """tensorflow-addons npairs_loss on cosine/tau logits: softmax cross-entropy, row-normalised targets."""
    z, y = ref_anchors(labels, features)
    n = len(z)
    total = 0.0
    for i in range(n):
        logits = [float(np.dot(z[i], z[j])) / tau for j in range(n)]
        same = [1.0 if y[j] == y[i] else 0.0 for j in range(n)]             # self included
        targets = [t / sum(same) for t in same]
        lse = ref_logsumexp(logits)
        total += -sum(targets[j] * (logits[j] - lse) for j in range(n))
    return total / n


def ref_triplet(labels, features, margin, mining):
    """Triplet loss on squared L2 distances of unit vectors, mining as Schroff 2015 / Hermans 2017."""
    z, y = ref_anchors(labels, features)
    n = len(z)
    d = [[float(np.sum((z[i] - z[j]) ** 2)) for j in range(n)] for i in range(n)]
    pos = {a: [p for p in range(n) if p != a and y[p] == y[a]] for a in range(n)}
    neg = {a: [k for k in range(n) if y[k] != y[a]] for a in range(n)}
    if mining == "batch_all":
        nonzero = []
        for a in range(n):
            for p in pos[a]:
                for k in neg[a]:
                    loss = max(d[a][p] - d[a][k] + margin, 0.0)
                    if loss > 0:
                        nonzero.append(loss)
        return sum(nonzero) / len(nonzero) if nonzero else 0.0
    if mining == "batch_hard":
        per_anchor = []
        for a in range(n):
            if pos[a] and neg[a]:
                hardest_pos = max(d[a][p] for p in pos[a])
                hardest_neg = min(d[a][k] for k in neg[a])
                per_anchor.append(max(hardest_pos - hardest_neg + margin, 0.0))
        return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0
    if mining == "semi_hard":
        per_pair = []
        for a in range(n):
            if not neg[a]:
                continue
            for p in pos[a]:
                farther = [d[a][k] for k in neg[a] if d[a][k] > d[a][p]]
                d_neg = min(farther) if farther else max(d[a][k] for k in neg[a])
                per_pair.append(max(d[a][p] - d_neg + margin, 0.0))
        return sum(per_pair) / len(per_pair) if per_pair else 0.0
    raise ValueError(mining)


def ref_weighted_ce(labels, probs, weights):
    """Thesis Eq. 3.2 for K classes: mean_i -w[y_i] log p[i, y_i] (p clipped at 1e-7)."""
    total = 0.0
    for y, p in zip(np.asarray(labels).reshape(-1), np.asarray(probs, np.float64)):
        total += -weights[int(y)] * math.log(max(p[int(y)], 1e-7))
    return total / len(probs)


def ref_expected_cost(labels, probs, cost):
    """mean_i sum_j C[y_i, j] p[i, j]."""
    total = 0.0
    for y, p in zip(np.asarray(labels).reshape(-1), np.asarray(probs, np.float64)):
        total += sum(cost[int(y)][j] * p[j] for j in range(len(p)))
    return total / len(probs)


def random_batch(seed, b, d, k, views=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=b)
    shape = (b, d) if views == 1 else (b, views, d)
    features = (rng.normal(size=shape) * rng.uniform(0.5, 3.0)).astype(np.float32)
    return labels, features


# (seed, B, D, K, V, tau): B up to 64, D up to 128, tau from 0.01 to 1, singletons included.
CONFIGS = [
    (0, 8, 4, 3, 1, 0.01), (1, 16, 128, 5, 1, 0.05), (2, 33, 16, 5, 1, 0.07),
    (3, 64, 128, 5, 1, 0.1), (4, 64, 32, 10, 1, 0.5), (5, 20, 128, 4, 2, 1.0),
    (6, 32, 64, 5, 2, 0.01), (7, 5, 3, 5, 1, 0.2), (8, 64, 128, 2, 1, 0.01),
]


# ------------------------------------------------------------------------------------------------
# 1. TensorFlow == NumPy reference on random batches
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,b,d,k,v,tau", CONFIGS)
def test_supcon_matches_reference(seed, b, d, k, v, tau):
    labels, features = random_batch(seed, b, d, k, v)
    for tau_base in (0.07, tau):
        got = losses.supcon_loss(labels, features, temperature=tau, base_temperature=tau_base)
        assert got.dtype == tf.float32 and got.shape == ()
        np.testing.assert_allclose(float(got), ref_supcon(labels, features, tau, tau_base),
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed,b,d,k,v,tau", CONFIGS)
def test_npairs_matches_reference(seed, b, d, k, v, tau):
    labels, features = random_batch(seed, b, d, k, v)
    got = losses.npairs_loss(labels, features, temperature=tau)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref_npairs(labels, features, tau), rtol=RTOL)


@pytest.mark.parametrize("mining", losses.TRIPLET_MINING)
@pytest.mark.parametrize("seed,b,d,k,v,margin", [
    (10, 8, 4, 3, 1, 0.2), (11, 64, 128, 5, 1, 0.2), (12, 33, 16, 4, 1, 0.5),
    (13, 16, 8, 2, 2, 1.0), (14, 40, 64, 10, 1, 0.05), (15, 6, 2, 6, 1, 0.2),
    (16, 64, 3, 5, 1, 0.0)])
def test_triplet_matches_reference(mining, seed, b, d, k, v, margin):
    labels, features = random_batch(seed, b, d, k, v)
    got = losses.triplet_loss(labels, features, margin=margin, mining=mining)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref_triplet(labels, features, margin, mining),
                               rtol=RTOL, atol=ATOL)


def test_labels_of_shape_b1_equal_labels_of_shape_b():
    labels, features = random_batch(20, 24, 16, 4)
    for name, fn in losses.CONTRASTIVE_LOSSES.items():
        a = float(fn(labels, features))
        b = float(fn(labels.reshape(-1, 1), features))
        assert a == b, name


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 5), (2, 7)])
def test_weighted_crossentropy_matches_reference(seed, k):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=40)
    probs = rng.dirichlet(np.ones(k), size=40).astype(np.float32)
    weights = rng.uniform(0.0, 3.0, size=k)
    loss = losses.weighted_crossentropy({c: w for c, w in enumerate(weights)})
    got = loss(labels, probs)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref_weighted_ce(labels, probs, weights), rtol=RTOL)
    # Independent oracle: Keras's sparse CE with per-sample weights w[y_i] (= fit(class_weight=...)).
    keras_ce = keras.losses.SparseCategoricalCrossentropy()(labels, probs,
                                                           sample_weight=weights[labels])
    np.testing.assert_allclose(float(got), float(keras_ce), rtol=RTOL)


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 5), (2, 7)])
def test_cost_matrix_loss_matches_reference(seed, k):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=40)
    probs = rng.dirichlet(np.ones(k), size=40).astype(np.float32)
    cost = rng.uniform(0.0, 5.0, size=(k, k))
    np.fill_diagonal(cost, 0.0)
    got = losses.cost_matrix_loss(cost)(labels, probs)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), ref_expected_cost(labels, probs, cost), rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# 2. Hand-derived closed forms
# ------------------------------------------------------------------------------------------------

E1, E2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_supcon_two_identical_positives_one_orthogonal_negative(tau):
    # z1 = z2 = e1 (class 0), z3 = e2 (class 1); s12 = 1/tau, s13 = s23 = 0.
    # Anchor 1: P = {2}, A = {2, 3}: -(1/tau - log(e^{1/tau} + e^0)) = log(1 + e^{-1/tau}); anchor 2
    # the same; anchor 3 has no positive -> 0.  L = (tau/tau_b) * (2/3) * log(1 + e^{-1/tau}).
    # Scaled copies of e1 check the normalisation.
    features = np.stack([3.0 * E1, 0.25 * E1, 7.0 * E2])
    expected = (tau / 0.07) * (2.0 / 3.0) * math.log1p(math.exp(-1.0 / tau))
    got = float(losses.supcon_loss([0, 0, 1], features, temperature=tau, base_temperature=0.07))
    assert_close_to_closed_form(got, expected, 1.0 / 0.07)


@pytest.mark.parametrize("n", [2, 3, 8, 32])
def test_supcon_all_one_class_identical_embeddings_is_log_n_minus_1(n):
    # Every s = 1/tau; each anchor has n-1 positives, all equal to the n-1 denominator terms:
    # -(1/tau) + log((n-1) e^{1/tau}) = log(n-1).  For n = 32 this is ln 31 = 3.4340.
    features = np.tile(E1, (n, 1))
    got = float(losses.supcon_loss(np.zeros(n, int), features, temperature=0.05,
                                   base_temperature=0.05))
    np.testing.assert_allclose(got, math.log(n - 1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("angle", [0.3, 1.2, 2.5])
def test_supcon_one_class_pair_is_zero(angle):
    # B = 2, same class: P(i) = A(i) = {other}, so log p = s - s = 0 whatever the angle.
    features = np.stack([E1, np.array([math.cos(angle), math.sin(angle)], np.float32)])
    assert abs(float(losses.supcon_loss([4, 4], features, temperature=0.1))) < 1e-6


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_supcon_with_a_singleton_class(tau):
    # z1 = e1, z2 = (cos t, sin t) in class 0; z3 = e2 alone in class 1 (no positive -> 0).
    # Anchor 1: P = {2}, A = {2, 3}, s12 = cos t/tau, s13 = 0 -> log(1 + e^{-cos t / tau}).
    # Anchor 2: s21 = cos t/tau, s23 = sin t/tau -> log(1 + e^{(sin t - cos t)/tau}).
    t = 0.4
    features = np.stack([E1, np.array([math.cos(t), math.sin(t)], np.float32), E2])
    expected = (tau / 0.07) * (math.log1p(math.exp(-math.cos(t) / tau))
                               + math.log1p(math.exp((math.sin(t) - math.cos(t)) / tau))) / 3.0
    got = float(losses.supcon_loss([0, 0, 1], features, temperature=tau))
    assert_close_to_closed_form(got, expected, 1.0 / 0.07)


def test_supcon_all_singletons_is_zero_and_simclr_uses_views():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(6, 5)).astype(np.float32)
    assert float(losses.supcon_loss(np.arange(6), features)) == 0.0
    # labels=None (SimCLR): two identical views of each of two orthogonal samples. Per anchor the
    # other view is the only positive: s = 1/tau, denominator {other view, 2 x other sample (0)}:
    # log(1 + 2 e^{-1/tau}).
    tau = 0.2
    views = np.stack([np.stack([E1, E1]), np.stack([E2, E2])])        # (B=2, V=2, D=2)
    got = float(losses.supcon_loss(None, views, temperature=tau, base_temperature=tau))
    assert_close_to_closed_form(got, math.log1p(2.0 * math.exp(-1.0 / tau)), 1.0 / tau)


@pytest.mark.parametrize("n", [2, 5, 32])
def test_npairs_collapsed_embedding_is_log_n(n):
    # All logits equal 1/tau: softmax = 1/n everywhere, targets sum to 1 -> CE = log n for any labels.
    labels = np.arange(n) % 3
    got = float(losses.npairs_loss(labels, np.tile(E2, (n, 1)), temperature=0.05))
    np.testing.assert_allclose(got, math.log(n), rtol=RTOL)


@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0])
def test_npairs_minus_supcon_is_the_self_pair_term(tau):
    # Case A: z1 = z2 = e1 (class 0), z3 = e2 (class 1).
    #   npairs, anchors 1 and 2: targets {1, 2} at 1/2, logits (1/tau, 1/tau, 0):
    #     log(2 e^{1/tau} + 1) - 1/tau = log(2 + e^{-1/tau}).
    #   npairs, anchor 3: target {3} (itself), logits (0, 0, 1/tau): log(1 + 2 e^{-1/tau}).
    #   supcon (tau_b = tau), anchors 1 and 2: log(1 + e^{-1/tau}); anchor 3: 0.
    # The difference is all self-pair: anchor 3's whole npairs term, and for anchors 1, 2 the extra
    # e^{1/tau} in the denominator, log((2 + e^{-1/tau}) / (1 + e^{-1/tau})).
    features = np.stack([E1, E1, E2])
    a = math.exp(-1.0 / tau)
    npairs_expected = (2.0 * math.log(2.0 + a) + math.log1p(2.0 * a)) / 3.0
    supcon_expected = 2.0 * math.log1p(a) / 3.0
    npairs = float(losses.npairs_loss([0, 0, 1], features, temperature=tau))
    supcon = float(losses.supcon_loss([0, 0, 1], features, temperature=tau, base_temperature=tau))
    assert_close_to_closed_form(npairs, npairs_expected, 1.0 / tau)
    assert_close_to_closed_form(supcon, supcon_expected, 1.0 / tau)
    assert_close_to_closed_form(npairs - supcon,
                                (2.0 * math.log((2.0 + a) / (1.0 + a)) + math.log1p(2.0 * a)) / 3.0,
                                2.0 / tau)
    # Case B: one class pair at cosine c. supcon = 0 (see above); npairs per anchor
    # log(e^{1/tau} + e^{c/tau}) - (1 + c)/(2 tau) = log(2 cosh((1 - c) / (2 tau))).
    c = 0.3
    pair = np.stack([E1, np.array([c, math.sqrt(1 - c * c)], np.float32)])
    assert_close_to_closed_form(float(losses.npairs_loss([1, 1], pair, temperature=tau)),
                                math.log(2.0 * math.cosh((1.0 - c) / (2.0 * tau))), 1.0 / tau)


@pytest.mark.parametrize("seed,b,d,k,v,tau", CONFIGS[:5])
def test_npairs_is_supcon_with_the_self_pair_kept(seed, b, d, k, v, tau):
    labels, features = random_batch(seed, b, d, k, v)
    with_self = ref_supcon(labels, features, tau, tau, include_self=True)
    np.testing.assert_allclose(float(losses.npairs_loss(labels, features, temperature=tau)),
                               with_self, rtol=RTOL)
    assert abs(with_self - ref_supcon(labels, features, tau, tau)) > 1e-3


def _unit(deg):
    r = math.radians(deg)
    return np.array([math.cos(r), math.sin(r)], np.float32)


@pytest.mark.parametrize("mining,expected", [
    # Points on the unit circle: class 0 at 0 and 60 deg, class 1 at 90 and 240 deg; d = 2 - 2 cos.
    # d12 = 1, d13 = 2, d14 = 3, d23 = 2 - r3, d24 = 4, d34 = 2 + r3  (r3 = sqrt 3), m = 0.2.
    # Non-zero triplets: (2,1,3) = r3 - 0.8, (3,4,1) = r3 + 0.2, (3,4,2) = 2 r3 + 0.2,
    # (4,3,1) = r3 - 0.8.
    ("batch_all", (5 * math.sqrt(3) - 1.2) / 4),
    # Per anchor max pos - min neg + m: 1: 1-2 -> 0; 2: r3 - 0.8; 3: 2 r3 + 0.2; 4: r3 - 0.8.
    ("batch_hard", (4 * math.sqrt(3) - 1.4) / 4),
    # Pairs: (1,2) neg 2 > 1 -> 0; (2,1) neg 4 > 1 -> 0; (3,4) none > 2 + r3 -> farthest 2 ->
    # r3 + 0.2; (4,3) neg 4 > 2 + r3 -> 0.
    ("semi_hard", (math.sqrt(3) + 0.2) / 4),
])
def test_triplet_hand_example(mining, expected):
    features = np.stack([_unit(0), _unit(60), _unit(90), _unit(240)])
    got = float(losses.triplet_loss([0, 0, 1, 1], features, margin=0.2, mining=mining))
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    np.testing.assert_allclose(ref_triplet([0, 0, 1, 1], features, 0.2, mining), expected,
                               rtol=1e-6)                      # float32 inputs, float64 maths


@pytest.mark.parametrize("mining", losses.TRIPLET_MINING)
def test_triplet_collapse_gives_the_margin_and_no_triplet_gives_zero(mining):
    # All embeddings equal: d = 0 everywhere, every triplet costs exactly m (the study's 0.2).
    collapsed = np.tile(E1, (8, 1))
    np.testing.assert_allclose(float(losses.triplet_loss(np.arange(8) % 3, collapsed, 0.2, mining)),
                               0.2, rtol=RTOL)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 4)).astype(np.float32)
    assert float(losses.triplet_loss(np.zeros(6, int), f, 0.2, mining)) == 0.0     # no negative
    assert float(losses.triplet_loss(np.arange(6), f, 0.2, mining)) == 0.0         # no positive


def test_weighted_crossentropy_is_thesis_eq_3_2_for_two_classes():
    # Eq. 3.2: (1/N) sum -(w0 y log yhat + w1 (1 - y) log(1 - yhat)); w0 weighs the positive class.
    y = np.array([1, 0, 1, 0, 0])
    yhat = np.array([0.9, 0.2, 0.4, 0.7, 0.05])
    w0, w1 = 2.5, 0.75
    eq_3_2 = np.mean(-(w0 * y * np.log(yhat) + w1 * (1 - y) * np.log(1 - yhat)))
    probs = np.stack([1 - yhat, yhat], axis=1).astype(np.float32)
    got = float(losses.weighted_crossentropy({0: w1, 1: w0})(y, probs))
    np.testing.assert_allclose(got, eq_3_2, rtol=RTOL)


def test_weighted_crossentropy_label_forms_and_logits():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=12)
    logits = rng.normal(size=(12, 4)).astype(np.float32)
    probs = tf.nn.softmax(logits).numpy()
    w = [1.0, 2.0, 0.5, 3.0]
    sparse = float(losses.weighted_crossentropy(w)(labels, probs))
    np.testing.assert_allclose(float(losses.weighted_crossentropy(w)(labels[:, None], probs)),
                               sparse, rtol=RTOL)
    np.testing.assert_allclose(float(losses.weighted_crossentropy(w)(np.eye(4)[labels], probs)),
                               sparse, rtol=RTOL)
    np.testing.assert_allclose(
        float(losses.weighted_crossentropy(w, from_logits=True)(labels, logits)), sparse, rtol=1e-5)
    # Unit weights are plain cross-entropy.
    np.testing.assert_allclose(
        float(losses.weighted_crossentropy([1.0] * 4)(labels, probs)),
        float(keras.losses.SparseCategoricalCrossentropy()(labels, probs)), rtol=RTOL)


def test_cost_matrix_hand_example_and_zero_one_cost():
    # C = [[0, 1], [5, 0]]: truth 1 predicted 0 costs 5. Sample 1 (y=1, p=(.3,.7)): 5 * .3 = 1.5;
    # sample 2 (y=0, p=(.6,.4)): 1 * .4 = 0.4. Mean 0.95.
    probs = np.array([[0.3, 0.7], [0.6, 0.4]], np.float32)
    got = float(losses.cost_matrix_loss([[0, 1], [5, 0]])([1, 0], probs))
    np.testing.assert_allclose(got, 0.95, rtol=RTOL)
    # Soft / one-hot targets: y^T C p.
    np.testing.assert_allclose(
        float(losses.cost_matrix_loss([[0, 1], [5, 0]])(np.array([[0, 1], [1, 0]]), probs)),
        0.95, rtol=RTOL)
    # C = 1 - I is the expected 0-1 loss 1 - p_y.
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 30)
    p = rng.dirichlet(np.ones(5), 30).astype(np.float32)
    np.testing.assert_allclose(float(losses.cost_matrix_loss(1 - np.eye(5))(y, p)),
                               1 - np.mean(p[np.arange(30), y]), rtol=RTOL)
    # crossentropy_weight adds lambda * CE.
    ce = float(keras.losses.SparseCategoricalCrossentropy()(y, p))
    np.testing.assert_allclose(
        float(losses.cost_matrix_loss(1 - np.eye(5), crossentropy_weight=0.5)(y, p)),
        1 - np.mean(p[np.arange(30), y]) + 0.5 * ce, rtol=RTOL)


def test_clinical_cost_matrix_for_sipakmed():
    names = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]
    from cervical import metrics

    abnormal = metrics.default_abnormal_classes(names)          # the package's one definition
    assert abnormal == ["Dyskeratotic", "Koilocytotic"]
    c = losses.clinical_cost_matrix(names, abnormal, miss_cost=5.0, false_alarm_cost=2.0,
                                    confusion_cost=1.0)
    expected = np.array([[0, 1, 5, 5, 5],
                         [1, 0, 5, 5, 5],
                         [2, 2, 0, 1, 1],
                         [2, 2, 1, 0, 1],
                         [2, 2, 1, 1, 0]], float)
    np.testing.assert_array_equal(c, expected)
    with pytest.raises(losses.LossError, match="abnormal"):
        losses.clinical_cost_matrix(names, abnormal=["Cancer"])


# ------------------------------------------------------------------------------------------------
# 3. Invariances, gradients, errors
# ------------------------------------------------------------------------------------------------

def _all_contrastive(labels, features):
    out = {"supcon": losses.supcon_loss(labels, features, temperature=0.1),
           "npairs": losses.npairs_loss(labels, features, temperature=0.1)}
    for mining in losses.TRIPLET_MINING:
        out[mining] = losses.triplet_loss(labels, features, margin=0.3, mining=mining)
    return {k: float(v) for k, v in out.items()}


@pytest.mark.parametrize("views", [1, 2])
def test_invariant_to_feature_scale_batch_order_and_class_names(views):
    labels, features = random_batch(30, 24, 16, 4, views)
    base = _all_contrastive(labels, features)
    rng = np.random.default_rng(31)
    scale_shape = (24, 1) if views == 1 else (24, views, 1)
    scaled = features * rng.uniform(0.1, 10.0, size=scale_shape).astype(np.float32) * 50.0
    perm = rng.permutation(24)
    renamed = np.array([7, -2, 40, 3])[labels]                     # a bijection of class ids
    for variant in (_all_contrastive(labels, scaled),
                    _all_contrastive(labels[perm], features[perm]),
                    _all_contrastive(renamed, features)):
        for key in base:
            np.testing.assert_allclose(variant[key], base[key], rtol=RTOL, atol=ATOL, err_msg=key)


def _gradient(fn, labels, features):
    x = tf.Variable(np.asarray(features, np.float32))
    with tf.GradientTape() as tape:
        value = fn(labels, x)
    return float(value), tape.gradient(value, x).numpy()


CONTRASTIVE_AT_SMALL_TAU = {
    "supcon": lambda y, f: losses.supcon_loss(y, f, temperature=0.01),
    "npairs": lambda y, f: losses.npairs_loss(y, f, temperature=0.01),
    "batch_all": lambda y, f: losses.triplet_loss(y, f, mining="batch_all"),
    "batch_hard": lambda y, f: losses.triplet_loss(y, f, mining="batch_hard"),
    "semi_hard": lambda y, f: losses.triplet_loss(y, f, mining="semi_hard"),
}


@pytest.mark.parametrize("name", sorted(CONTRASTIVE_AT_SMALL_TAU))
def test_gradients_finite_at_small_tau_with_duplicates_and_zero_rows(name):
    fn = CONTRASTIVE_AT_SMALL_TAU[name]
    rng = np.random.default_rng(40)
    f = rng.normal(size=(12, 8)).astype(np.float32)
    f[3] = f[0]                        # exact duplicates, same class
    f[4] = f[1]                        # exact duplicate, different class
    f[5] = -f[2]                       # antipodal: s = -1/tau, exp(-200) underflows without care
    f[6] = 0.0                         # a dead ReLU head can output a zero vector
    labels = np.array([0, 1, 2, 0, 2, 1, 0, 1, 2, 0, 1, 2])
    for feats in (f, np.tile(f[:1], (12, 1))):                     # and a fully collapsed batch
        value, grad = _gradient(fn, labels, feats)
        assert math.isfinite(value) and np.all(np.isfinite(grad)), name


@pytest.mark.parametrize("name", sorted(CONTRASTIVE_AT_SMALL_TAU))
def test_gradients_match_finite_differences_of_the_reference(name):
    # d loss / d features from TF autodiff == central differences of the float64 NumPy reference.
    refs = {"supcon": lambda y, f: ref_supcon(y, f, 0.5, 0.07),
            "npairs": lambda y, f: ref_npairs(y, f, 0.5),
            "batch_all": lambda y, f: ref_triplet(y, f, 0.2, "batch_all"),
            "batch_hard": lambda y, f: ref_triplet(y, f, 0.2, "batch_hard"),
            "semi_hard": lambda y, f: ref_triplet(y, f, 0.2, "semi_hard")}
    tf_fns = dict(CONTRASTIVE_AT_SMALL_TAU,
                  supcon=lambda y, f: losses.supcon_loss(y, f, temperature=0.5),
                  npairs=lambda y, f: losses.npairs_loss(y, f, temperature=0.5))
    labels, features = random_batch(50, 7, 3, 2)
    _, grad = _gradient(tf_fns[name], labels, features)
    f64 = features.astype(np.float64)
    numeric = np.zeros_like(f64)
    h = 1e-6
    for idx in np.ndindex(*f64.shape):
        up, down = f64.copy(), f64.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (refs[name](labels, up) - refs[name](labels, down)) / (2 * h)
    assert np.abs(numeric).max() > 1e-3                               # a non-trivial check
    np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-4)


def test_errors_name_the_argument():
    f = np.ones((4, 3), np.float32)
    with pytest.raises(losses.LossError, match="temperature"):
        losses.supcon_loss([0, 1, 0, 1], f, temperature=0.0)
    with pytest.raises(losses.LossError, match="mining"):
        losses.triplet_loss([0, 1, 0, 1], f, mining="hardest")
    with pytest.raises(losses.LossError, match="margin"):
        losses.triplet_loss([0, 1, 0, 1], f, margin=-1)
    with pytest.raises(losses.LossError, match="labels"):
        losses.npairs_loss([0, 1, 0], f)
    with pytest.raises(losses.LossError, match="one-hot"):
        losses.supcon_loss(np.eye(4), f)
    with pytest.raises(losses.LossError, match="features"):
        losses.supcon_loss([0, 1, 0, 1], np.ones((4,), np.float32))
    with pytest.raises(losses.LossError, match="labels=None"):
        losses.supcon_loss(None, f)
    with pytest.raises(losses.LossError, match="class_weights"):
        losses.weighted_crossentropy({0: 1.0, 2: 1.0})
    with pytest.raises(losses.LossError, match="class_weights"):
        losses.weighted_crossentropy([1.0, -1.0])
    with pytest.raises(losses.LossError, match="cost_matrix"):
        losses.cost_matrix_loss([[0, 1, 2], [1, 0, 2]])
    with pytest.raises(losses.LossError, match="y_true"):
        losses.weighted_crossentropy([1.0, 1.0])([0, 2], np.full((2, 2), 0.5, np.float32))
    with pytest.raises(losses.LossError, match="classes"):
        losses.cost_matrix_loss(1 - np.eye(3))([0, 1], np.full((2, 2), 0.5, np.float32))
    with pytest.raises(losses.LossError, match="unknown"):
        losses.make_loss("ntxent")
    with pytest.raises(losses.LossError, match="bad arguments"):
        losses.make_loss("supcon", temprature=0.1)


def test_out_of_range_label_gives_nan_inside_a_graph():
    loss = losses.weighted_crossentropy([1.0, 1.0])
    value = tf.function(loss)(tf.constant([0, 5]), tf.constant([[0.5, 0.5], [0.5, 0.5]]))
    assert math.isnan(float(value))


# ------------------------------------------------------------------------------------------------
# 4. Keras use: compile, fit, save, load
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs,head", [
    ("supcon", {"temperature": 0.1, "base_temperature": 0.1}, None),
    ("npairs", {"temperature": 0.05}, None),
    ("triplet", {"margin": 0.3, "mining": "batch_hard"}, None),
    ("weighted_crossentropy", {"class_weights": {0: 1.0, 1: 2.0, 2: 0.5}}, "softmax"),
    ("cost_matrix", {"cost_matrix": [[0, 1, 1], [5, 0, 1], [5, 1, 0]]}, "softmax"),
])
def test_keras_compile_fit_save_load(tmp_path, name, kwargs, head):
    rng = np.random.default_rng(60)
    x = rng.normal(size=(16, 2)).astype(np.float32)
    y = np.arange(16) % 3
    init = keras.initializers.GlorotUniform(seed=1)
    model = keras.Sequential([keras.Input((2,)),
                              keras.layers.Dense(3 if head else 4, activation=head,
                                                 kernel_initializer=init)])
    loss = losses.make_loss(name, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    assert all(math.isfinite(v) for v in history.history["loss"])
    # The compiled loss is the function's value on the batch.
    pred = model.predict(x, verbose=0)
    direct = {"supcon": lambda: losses.supcon_loss(y, pred, 0.1, 0.1),
              "npairs": lambda: losses.npairs_loss(y, pred, 0.05),
              "triplet": lambda: losses.triplet_loss(y, pred, 0.3, "batch_hard"),
              "weighted_crossentropy": lambda: ref_weighted_ce(y, pred, [1.0, 2.0, 0.5]),
              "cost_matrix": lambda: ref_expected_cost(y, pred, kwargs.get("cost_matrix"))}[name]()
    evaluated = model.evaluate(x, y, batch_size=16, verbose=0)
    np.testing.assert_allclose(evaluated, float(direct), rtol=1e-4)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.loss) is type(loss)
    assert loaded.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(loaded.evaluate(x, y, batch_size=16, verbose=0), evaluated,
                               rtol=1e-6)


def test_keras_contrastive_loss_is_the_batch_value_repeated_per_sample():
    labels, features = random_batch(61, 10, 6, 3)
    expected = float(losses.supcon_loss(labels, features, 0.2, 0.07))
    np.testing.assert_allclose(float(losses.SupConLoss(0.2, 0.07)(labels, features)), expected,
                               rtol=1e-6)
    per_sample = losses.SupConLoss(0.2, 0.07, reduction=None)(labels, features).numpy()
    np.testing.assert_allclose(per_sample, np.full(10, expected), rtol=1e-6)


_TWO_REPLICAS = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from cervical import losses
x = np.random.default_rng(0).normal(size=(32, 2)).astype("float32")
y = np.arange(32) % 3
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        4, kernel_initializer=keras.initializers.GlorotUniform(seed=1))])
    m.compile(optimizer=keras.optimizers.SGD(1.0), loss=losses.SupConLoss(0.1, 0.1))
w, b = [tf.Variable(a) for a in m.get_weights()]
m.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
with tf.GradientTape() as tape:   # each replica sees one half; the step must follow their mean
    loss = 0.5 * (losses.supcon_loss(y[:16], x[:16] @ w + b, 0.1, 0.1)
                  + losses.supcon_loss(y[16:], x[16:] @ w + b, 0.1, 0.1))
expected = w.numpy() - tape.gradient(loss, w).numpy()
np.testing.assert_allclose(m.get_weights()[0], expected, rtol=1e-4, atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_keras_contrastive_loss_under_two_replicas_is_not_doubled():
    # A bare scalar loss skips Keras's division by the number of replicas: R GPUs would take
    # R-times larger steps. Needs a fresh process to split the CPU into two logical devices.
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([str(Path(losses.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# 5. Toy problem: training separates the classes and does not collapse
# ------------------------------------------------------------------------------------------------

def _cosines(emb, labels):
    z = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = z @ z.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    return cos[same & off_diag].mean(), cos[~same].mean()


TOY_LOSSES = {
    "supcon": lambda y, f: losses.supcon_loss(y, f, temperature=0.1),
    "npairs": lambda y, f: losses.npairs_loss(y, f, temperature=0.1),
    "triplet_semi_hard": lambda y, f: losses.triplet_loss(y, f, 0.2, "semi_hard"),
    "triplet_batch_hard": lambda y, f: losses.triplet_loss(y, f, 0.2, "batch_hard"),
    "triplet_batch_all": lambda y, f: losses.triplet_loss(y, f, 0.2, "batch_all"),
}


def toy_encoder_runs(fn, seeds, steps=40, lr=0.05):
    """Train one toy encoder per seed with loss ``fn``; return per-seed statistics (arrays).

    Three classes of 2-D points (noisy blobs at 0, 120, 240 degrees, 16 each) and a 2 -> 16 -> 8
    ReLU encoder. Like a real network at initialisation, its outputs share a large common
    component (bias b2 = 1), so every pair starts similar (intra-class cosine ~0.95, inter ~0.6).
    ``steps`` full-batch Adam steps. The seeds' encoders are trained side by side as one batched
    model: Adam acts element-wise and each weight only gets its own seed's gradient, so this is
    exactly S independent runs, traced once.

    Returns:
        dict of (S,) arrays: intra0, inter0, intra, inter (mean cosines before/after) and
        loss_drop = (loss before - loss after) / |loss before|.
    """
    labels = np.repeat(np.arange(3), 16)
    angles = np.radians(labels * 120.0)
    xs, w1, w2 = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        xs.append(np.stack([np.cos(angles), np.sin(angles)], 1) + rng.normal(0, 0.35, (48, 2)))
        w1.append(rng.normal(0, 1.0, (2, 16)))
        w2.append(rng.normal(0, 0.25, (16, 8)))
    n = len(seeds)
    x = tf.constant(np.stack(xs), tf.float32)
    params = [tf.Variable(np.stack(w1), dtype=tf.float32), tf.Variable(tf.fill((n, 1, 16), 0.5)),
              tf.Variable(np.stack(w2), dtype=tf.float32), tf.Variable(tf.fill((n, 1, 8), 1.0))]

    def encode():
        h = tf.nn.relu(tf.matmul(x, params[0]) + params[1])
        return tf.matmul(h, params[2]) + params[3]                       # (S, 48, 8)

    def per_seed_loss(emb):
        return tf.stack([fn(labels, emb[i]) for i in range(n)])

    opt = keras.optimizers.Adam(lr)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(per_seed_loss(encode()))
        opt.apply_gradients(zip(tape.gradient(total, params), params))

    before = encode().numpy()
    loss0 = per_seed_loss(encode()).numpy()
    for _ in range(steps):
        step()
    after = encode().numpy()
    loss1 = per_seed_loss(encode()).numpy()
    c0 = np.array([_cosines(e, labels) for e in before])
    c1 = np.array([_cosines(e, labels) for e in after])
    return {"intra0": c0[:, 0], "inter0": c0[:, 1], "intra": c1[:, 0], "inter": c1[:, 1],
            "loss_drop": (loss0 - loss1) / np.abs(loss0)}


@pytest.mark.parametrize("name", list(TOY_LOSSES))
def test_toy_encoder_pulls_classes_together_without_collapse(name):
    """Training with each loss separates the classes instead of collapsing (the study's failure:
    its losses ignored the labels, and every embedding drifted to one point, cosine 1).

    One toy run can collapse or stall by itself (a bad start: batch-hard triplets from a few
    seeds end at inter-class cosine 0.998), so the statistic asserted is the MEDIAN over seeds
    0-4 of each quantity. Its distribution, measured as the medians of 10 disjoint groups of 5
    seeds out of seeds 0-49 (``python benchmarks/seed_spread.py toy-losses``; TF 2.21 CPU, the
    same figures to 3 decimals with oneDNN on and off), min [per-loss medians] max over the five
    losses and ten groups, and the threshold set beyond the worst group by the margin:

                                         min    per-loss medians   max     threshold (margin)
        drop of the inter-class cosine   0.551  0.61 to 0.99       1.119   >= 0.40 (0.15)
        inter-class cosine after         -0.421 -0.35 to -0.04     0.104   <= 0.25 (0.15)
        intra-class cosine after         0.958  0.96 to 0.99       0.995   >= 0.93 (0.03)
        relative loss drop               0.086  0.12 to 1.00       1.000   >= 0.04 (0.05)

    Single runs span -0.43 ... 1.31 for the drop: one seed is not a test.
    A collapsed embedding would give an inter-class cosine near 1 and a drop near 0 or negative.
    """
    r = toy_encoder_runs(TOY_LOSSES[name], seeds=range(5))
    med = {k: float(np.median(v)) for k, v in r.items()}
    assert float(np.median(r["inter0"] - r["inter"])) >= 0.40, (name, r)
    assert med["inter"] <= 0.25, (name, r)
    assert med["intra"] >= 0.93, (name, r)
    assert med["loss_drop"] >= 0.04, (name, r)
