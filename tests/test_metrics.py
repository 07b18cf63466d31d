"""Known-answer tests for cervical.metrics: scikit-learn on random vectors, hand-derived cases, the
study's own printed confusion matrix, calibration toys with values worked out by hand."""

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from cervical import metrics as M

SIPAKMED = ["Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal", "Superficial-Intermediate"]


def _random_case(seed, k, n=200):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, t, rng.integers(0, k, n))
    prob = rng.dirichlet(np.ones(k), n)
    return t, p, prob


# ------------------------------------------------------------------------------------------
# agreement with scikit-learn
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 5), (3, 7)])
def test_summary_equals_sklearn_on_random_vectors(seed, k):
    t, p, prob = _random_case(seed, k)
    names = [f"c{i}" for i in range(k)]
    s = M.summarize(t, p, names, y_prob=prob, n_boot=0)
    labels = list(range(k))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    np.testing.assert_allclose([s["per_class"][c]["precision"] for c in names], pr, atol=1e-12)
    np.testing.assert_allclose([s["per_class"][c]["recall"] for c in names], rc, atol=1e-12)
    np.testing.assert_allclose([s["per_class"][c]["f1"] for c in names], f1, atol=1e-12)
    assert [s["per_class"][c]["support"] for c in names] == sup.tolist()
    for avg in ("macro", "weighted"):
        P, R, F, _ = skm.precision_recall_fscore_support(t, p, labels=labels, average=avg, zero_division=0)
        assert s[f"{avg}_precision"] == pytest.approx(P, abs=1e-12)
        assert s[f"{avg}_recall"] == pytest.approx(R, abs=1e-12)
        assert s[f"{avg}_f1"] == pytest.approx(F, abs=1e-12)
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(t, p), abs=1e-12)
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(t, p), abs=1e-12)
    assert s["kappa"] == pytest.approx(skm.cohen_kappa_score(t, p), abs=1e-12)
    assert s["confusion_matrix"] == skm.confusion_matrix(t, p, labels=labels).tolist()
    assert s["log_loss"] == pytest.approx(skm.log_loss(t, prob, labels=labels), rel=1e-9)
    if k == 2:
        assert s["roc_auc"] == pytest.approx(skm.roc_auc_score(t, prob[:, 1]), abs=1e-12)
    else:
        assert s["roc_auc"] == pytest.approx(skm.roc_auc_score(t, prob, multi_class="ovr", average="macro"),
                                             abs=1e-12)
    # Brier: plain-loop reference
    ref = np.mean([sum((prob[i, j] - (t[i] == j)) ** 2 for j in range(k)) for i in range(len(t))])
    assert s["brier"] == pytest.approx(ref, abs=1e-12)


def test_hand_made_with_never_predicted_and_absent_class():
    # true:  0 0 0 1 1 2     pred: 0 0 1 1 1 1     class 2 never predicted, class 3 absent everywhere
    t = [0, 0, 0, 1, 1, 2]
    p = [0, 0, 1, 1, 1, 1]
    names = ["a", "b", "c", "d"]
    s = M.summarize(t, p, names, n_boot=0)
    assert s["confusion_matrix"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    # precision: a 2/2, b 2/4, c 0/0 -> 0, d 0/0 -> 0; recall: a 2/3, b 2/2, c 0/1, d 0/0 -> 0
    assert [s["per_class"][c]["precision"] for c in names] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [s["per_class"][c]["recall"] for c in names] == pytest.approx([2 / 3, 1.0, 0.0, 0.0])
    # F1 = 2PR/(P+R): a 0.8, b 2/3
    assert [s["per_class"][c]["f1"] for c in names] == pytest.approx([0.8, 2 / 3, 0.0, 0.0])
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 4)
    assert s["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 2 / 3) / 6)
    assert s["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)  # classes present in y_true only
    # kappa: p_o = 4/6, p_e = (3*2 + 2*4 + 1*0)/36 = 14/36 -> (24-14)/(36-14) = 10/22
    assert s["kappa"] == pytest.approx(10 / 22)
    assert s["never_predicted"] == ["c", "d"]
    assert s["absent_classes"] == ["d"]
    # and scikit-learn agrees on the averages over all four labels
    assert s["macro_f1"] == pytest.approx(skm.f1_score(t, p, labels=[0, 1, 2, 3], average="macro", zero_division=0))
    assert s["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(t, p))


def test_class_predicted_but_absent_from_y_true():
    t = [0, 0, 1, 1]
    p = [0, 2, 1, 1]
    s = M.summarize(t, p, ["a", "b", "c"], n_boot=0)
    assert s["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a: P 1/1, R 1/2, F1 2/3; b: P 1, R 1, F1 1
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert s["macro_precision"] == pytest.approx(skm.precision_score(t, p, labels=[0, 1, 2], average="macro",
                                                                     zero_division=0))
    assert s["absent_classes"] == ["c"] and s["never_predicted"] == []
    # zero_division=1: the 0/0 recall of the absent class becomes 1, its F1 stays 0 (2TP/(2TP+FP+FN)=0/1)
    s1 = M.summarize(t, p, ["a", "b", "c"], n_boot=0, zero_division=1)
    assert s1["per_class"]["c"]["recall"] == 1.0 and s1["per_class"]["c"]["f1"] == 0.0


def test_confusion_matrix_orientation_rows_true_columns_predicted():
    # three class-0 cells, two of them called class 1; one class-1 cell called class 1
    cm = M.confusion_matrix([0, 0, 0, 1], [1, 1, 0, 1], 2)
    assert cm.tolist() == [[1, 2], [0, 1]]          # the study's swapped call gives [[1, 0], [2, 1]]
    assert cm.sum(axis=1).tolist() == [3, 1]        # row sums = supports


def test_study_confusion_matrix_reproduces_thesis_table_6_4():
    """The VGG16 N-pairs matrix printed in the study's notebook gives thesis Table 6.4's VGG16 block."""
    pub = json.loads((Path(M.__file__).with_name("published.json")).read_text())
    cm = np.array(pub["study_notebooks"]["confusion_matrices"][0]["confusion_matrix"])
    t = np.repeat(np.repeat(np.arange(5), 5), cm.ravel())          # (true, pred) pairs, count times
    p = np.repeat(np.tile(np.arange(5), 5), cm.ravel())
    s = M.summarize(t, p, SIPAKMED, n_boot=0)
    assert s["n"] == 812 and s["confusion_matrix"] == cm.tolist()
    assert s["accuracy"] == pytest.approx(790 / 812)
    assert round(100 * s["accuracy"], 2) == 97.29
    table = pub["study_tables"]["contrastive"]["models"]["vgg16"]
    for c in SIPAKMED:
        for key in ("precision", "recall", "f1"):
            if (c, key) == ("Koilocytotic", "precision"):
                continue
            assert round(s["per_class"][c][key], 2) == pytest.approx(table["per_class"][c][key]), (c, key)
    # 14 of 15 cells match; Koilocytotic precision is 155/159 = 0.9748 ("0.97" in classification_report),
    # printed 0.98 in the thesis (0.9748 -> 0.975 -> 0.98, rounded twice)
    assert s["per_class"]["Koilocytotic"]["precision"] == pytest.approx(155 / 159)
    assert table["per_class"]["Koilocytotic"]["precision"] == 0.98
    assert round(s["macro_f1"], 4) == 0.9730  # docs/study.md §5
    # Dyskeratotic + Koilocytotic abnormal: TP = 160+2+6+155 = 323 of 328; FP = 1+2+1+0+0+0 = 4 of 484
    assert s["abnormal_classes"] == ["Dyskeratotic", "Koilocytotic"]
    assert s["sensitivity"] == pytest.approx(323 / 328)
    assert s["specificity"] == pytest.approx(480 / 484)


# ------------------------------------------------------------------------------------------
# abnormal mapping
# ------------------------------------------------------------------------------------------
def test_default_abnormal_classes():
    assert M.default_abnormal_classes(SIPAKMED) == ["Dyskeratotic", "Koilocytotic"]
    assert M.default_abnormal_classes(["im_Dyskeratotic", "im_Parabasal"]) == ["im_Dyskeratotic"]
    herlev = ["carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic", "normal_columnar",
              "normal_intermediate", "normal_superficiel", "severe_dysplastic"]
    assert M.default_abnormal_classes(herlev) == ["carcinoma_in_situ", "light_dysplastic",
                                                  "moderate_dysplastic", "severe_dysplastic"]
    assert M.default_abnormal_classes(["abnormal", "benign", "normal"]) == ["abnormal"]
    assert M.default_abnormal_classes(["normal", "abnormal"]) == ["abnormal"]
    assert M.default_abnormal_classes(["cat", "dog"]) is None


def test_sensitivity_specificity_hand_case():
    names = ["Dyskeratotic", "Koilocytotic", "Parabasal"]
    # abnormal = {0, 1}: a Dyskeratotic called Koilocytotic still counts as a detected abnormal cell
    t = [0, 0, 1, 1, 2, 2, 2, 2]
    p = [1, 2, 1, 0, 2, 2, 0, 2]
    r = M.sensitivity_specificity(t, p, names, ["Dyskeratotic", "Koilocytotic"])
    assert (r["tp"], r["fn"], r["tn"], r["fp"]) == (3, 1, 3, 1)
    assert r["sensitivity"] == pytest.approx(3 / 4) and r["specificity"] == pytest.approx(3 / 4)
    assert M.summarize(t, p, names, abnormal=[], n_boot=0)["sensitivity"] is None
    with pytest.raises(M.MetricsError, match="abnormal"):
        M.sensitivity_specificity(t, p, names, ["Koilo"])


# ------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------
def _two_class_probs(conf):
    conf = np.asarray(conf, dtype=float)
    return np.stack([conf, 1 - conf], axis=1)  # always predicts class 0 with confidence conf


def test_ece_perfectly_calibrated_is_zero():
    # 10 cells at confidence 0.8, 8 of them really class 0; 4 cells at 0.75, 3 correct
    conf = [0.8] * 10 + [0.75] * 4
    y = [0] * 8 + [1] * 2 + [0] * 3 + [1]
    assert M.expected_calibration_error(y, _two_class_probs(conf)) == pytest.approx(0.0, abs=1e-12)


def test_ece_over_confident():
    # always 0.9 confident, right 6 times out of 10: ECE = |0.6 - 0.9| = 0.3
    y = [0] * 6 + [1] * 4
    assert M.expected_calibration_error(y, _two_class_probs([0.9] * 10)) == pytest.approx(0.3)
    # two bins: 4 cells at 0.95 (2 right) and 4 at 0.62 (2 right): 0.5*0.45 + 0.5*0.12 = 0.285
    y = [0, 0, 1, 1, 0, 0, 1, 1]
    prob = _two_class_probs([0.95] * 4 + [0.62] * 4)
    assert M.expected_calibration_error(y, prob) == pytest.approx(0.285)
    rd = M.reliability_data(y, prob)
    assert len(rd["count"]) == 15 and sum(rd["count"]) == 8
    assert rd["count"][14] == 4 and rd["count"][9] == 4     # 0.95 in (14/15, 1], 0.62 in (0.6, 0.667]
    assert rd["accuracy"][14] == 0.5 and rd["confidence"][14] == pytest.approx(0.95)
    assert rd["accuracy"][0] is None


def test_ece_matches_plain_loop_reference():
    t, _, prob = _random_case(5, 4, n=300)
    conf, pred = prob.max(1), prob.argmax(1)
    ece = 0.0
    for m in range(15):
        lo, hi = m / 15, (m + 1) / 15
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            ece += inb.mean() * abs((pred[inb] == t[inb]).mean() - conf[inb].mean())
    assert M.expected_calibration_error(t, prob, n_bins=15) == pytest.approx(ece, abs=1e-12)


def test_roc_auc_with_a_class_absent_from_y_true():
    t = np.array([0, 0, 1, 1])
    prob = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.7, 0.2, 0.1]])
    r = M.roc_auc_ovr(t, prob)
    # class 0 vs rest: positives (0.8, 0.6) beat negatives (0.3, 0.7) in 3 of 4 pairs; class 1 likewise
    assert r["per_class"][0] == pytest.approx(0.75)
    assert r["per_class"][1] == pytest.approx(0.75)
    assert r["per_class"][2] is None
    assert r["macro"] == pytest.approx(0.75)


def test_brier_known_values():
    assert M.brier_score([0, 1, 2], np.eye(3)) == 0.0
    assert M.brier_score([0, 1, 2, 3], np.full((4, 4), 0.25)) == pytest.approx(3 / 4)  # (K-1)/K


# ------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------
def test_bootstrap_contains_estimate_and_is_seeded():
    t, p, _ = _random_case(7, 5, n=400)
    a = M.bootstrap_ci(t, p, "accuracy", n=500, seed=3)
    assert a["estimate"] == pytest.approx(np.mean(t == p))
    assert a["low"] <= a["estimate"] <= a["high"] and a["low"] < a["high"]
    assert M.bootstrap_ci(t, p, "accuracy", n=500, seed=3) == a
    assert M.bootstrap_ci(t, p, "accuracy", n=500, seed=4) != a
    f = M.bootstrap_ci(t, p, "macro_f1", n=500, seed=3)
    assert f["low"] <= f["estimate"] <= f["high"]
    assert f["estimate"] == pytest.approx(skm.f1_score(t, p, average="macro"))


def test_bootstrap_vectorised_equals_sklearn_callable():
    t, p, _ = _random_case(8, 4, n=150)
    labels = [0, 1, 2, 3]
    refs = {
        "macro_f1": lambda a, b: skm.f1_score(a, b, labels=labels, average="macro", zero_division=0),
        "weighted_f1": lambda a, b: skm.f1_score(a, b, labels=labels, average="weighted", zero_division=0),
        "accuracy": skm.accuracy_score,
        "kappa": lambda a, b: skm.cohen_kappa_score(a, b, labels=labels),
        "balanced_accuracy": skm.balanced_accuracy_score,
    }
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in refs.items():
            v = M.bootstrap_ci(t, p, name, n=60, seed=11, num_classes=4)
            r = M.bootstrap_ci(t, p, fn, n=60, seed=11, num_classes=4)
            assert v["low"] == pytest.approx(r["low"], abs=1e-12), name
            assert v["high"] == pytest.approx(r["high"], abs=1e-12), name
            assert v["estimate"] == pytest.approx(r["estimate"], abs=1e-12), name


def test_bootstrap_degenerate_and_errors():
    r = M.bootstrap_ci([0, 1, 2, 1], [0, 1, 2, 1], "accuracy", n=50)
    assert (r["low"], r["estimate"], r["high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(M.MetricsError, match="unknown metric"):
        M.bootstrap_ci([0, 1], [0, 1], "auc")
    with pytest.raises(M.MetricsError, match="alpha"):
        M.bootstrap_ci([0, 1], [0, 1], "accuracy", alpha=1.5)


def test_summary_has_ci_and_is_json_ready():
    t, p, prob = _random_case(9, 5, n=120)
    s = M.summarize(t, p, SIPAKMED, y_prob=prob, n_boot=200, seed=1)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "weighted_precision",
                "weighted_recall", "kappa", "confusion_matrix", "per_class", "roc_auc", "log_loss",
                "ece", "reliability", "sensitivity", "specificity", "ci"):
        assert key in s
    assert s["ci"]["accuracy"]["low"] <= s["accuracy"] <= s["ci"]["accuracy"]["high"]
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize("args,match", [
    (([0, 1], [0], ["a", "b"]), "differ in length"),
    (([0, 3], [0, 1], ["a", "b"]), "labels must lie"),
    (([], [], ["a", "b"]), "empty"),
    (([0, 1], [0, 1], ["a"]), "at least 2"),
])
def test_bad_input_one_line_errors(args, match):
    with pytest.raises(M.MetricsError, match=match) as e:
        M.summarize(*args, n_boot=0)
    assert "\n" not in str(e.value)


def test_bad_probabilities():
    with pytest.raises(M.MetricsError, match="softmax"):
        M.summarize([0, 1], [0, 1], ["a", "b"], y_prob=[[2.0, 3.0], [1.0, 0.0]], n_boot=0)
    with pytest.raises(M.MetricsError, match="shape"):
        M.summarize([0, 1], [0, 1], ["a", "b"], y_prob=[[1.0, 0.0]], n_boot=0)


def test_cluster_bootstrap_known_answers():
    """Clusters resampled, not cells. Two equal clusters, one all right and one all wrong: a
    resample holds both (p = 1/2), the right one twice (1/4) or the wrong one twice (1/4), so the
    accuracy is 0.5, 1 or 0 and the 95 % interval is [0, 1]; the 200 cells resampled one by one
    give a narrow interval around 0.5. One cell per cluster gives the cell-level interval exactly
    (the same draws)."""
    t = np.zeros(200, int)
    p = np.r_[np.zeros(100, int), np.ones(100, int)]
    groups = ["right"] * 100 + ["wrong"] * 100
    c = M.bootstrap_ci(t, p, "accuracy", n=400, seed=0, num_classes=2, groups=groups)
    assert (c["low"], c["high"], c["method"], c["n_groups"]) == (0.0, 1.0, "cluster percentile", 2)
    cells = M.bootstrap_ci(t, p, "accuracy", n=400, seed=0, num_classes=2)
    assert 0.4 < cells["low"] < 0.5 < cells["high"] < 0.6
    rng = np.random.default_rng(1)
    t2, p2 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    for m in ("accuracy", "macro_f1"):
        a = M.bootstrap_ci(t2, p2, m, n=300, seed=4, num_classes=3, groups=list(range(50)))
        b = M.bootstrap_ci(t2, p2, m, n=300, seed=4, num_classes=3)
        assert (a["low"], a["high"]) == (b["low"], b["high"])
    s = M.summarize(t, p, ["a", "b"], n_boot=200, groups=groups)
    assert s["ci"]["accuracy"]["method"] == "cluster percentile" and "ci_cells" in s


# --------------------------------------------------------------------------------------------
# cluster_mean_ci, class_adjusted_difference, verdict
# --------------------------------------------------------------------------------------------
def test_cluster_mean_ci_exact_bootstrap_distribution():
    """Values (1, 0 | 1, 1 | 0) in clusters a, b, c: mean 3/5. A resample draws counts
    (c_a, c_b, c_c) ~ Multinomial(3, 1/3) and scores (c_a * 1 + c_b * 2) / (2 c_a + 2 c_b + c_c).
    Its lowest value 0 (counts 0, 0, 3) and highest 1 (0, 3, 0) each have probability 1/27 = 3.7 %
    > 2.5 %, so the exact 95 % percentile interval is [0, 1]; 20000 resamples find it."""
    r = M.cluster_mean_ci([1, 0, 1, 1, 0], ["a", "a", "b", "b", "c"], n=20000, seed=1)
    assert r["estimate"] == pytest.approx(0.6)
    assert (r["low"], r["high"]) == (0.0, 1.0)
    assert (r["n"], r["n_groups"]) == (5, 3)
    # NaN values drop out with their cluster; a constant sample has a zero-width interval
    r = M.cluster_mean_ci([2.0, np.nan, 2.0], ["a", "b", "c"], n=100)
    assert (r["estimate"], r["low"], r["high"], r["n"], r["n_groups"]) == (2.0, 2.0, 2.0, 2, 2)
    assert M.cluster_mean_ci([np.nan])["estimate"] is None


def _two_arm_table():
    """Class A: arm 1 9/10 correct, arm 0 8/10; class B: arm 1 15/30, arm 0 1/5."""
    rows = []
    for cls, n1, k1, n0, k0 in (("A", 10, 9, 10, 8), ("B", 30, 15, 5, 1)):
        rows += [(cls, 1, int(i < k1)) for i in range(n1)] + [(cls, 0, int(i < k0)) for i in range(n0)]
    strata, arm, y = zip(*rows)
    return np.array(y), np.array(arm, bool), np.array(strata)


def test_class_adjusted_difference_hand_table():
    """d_A = 0.9 - 0.8 = 0.1, d_B = 0.5 - 0.2 = 0.3. Mantel-Haenszel weights n1 n0 / (n1 + n0):
    w_A = 100 / 20 = 5, w_B = 150 / 35 = 30 / 7, so the estimate is (5 * 0.1 + 30/7 * 0.3) /
    (5 + 30/7) = (1/2 + 9/7) / (65/7) = (25/14) / (65/7) = 5/26. Equal weights: 0.2; standardised
    to arm 0's mix (10, 5): (1 + 1.5) / 15 = 1/6. The crude difference 24/40 - 9/15 = 0 hides the
    effect because arm 1 holds mostly the hard class B."""
    y, arm, strata = _two_arm_table()
    r = M.class_adjusted_difference(y, arm, strata, n=200)
    assert r["estimate"] == pytest.approx(5 / 26)
    assert r["crude"] == pytest.approx(0.0)
    assert (r["n1"], r["n0"]) == (40, 15)
    by = {s["stratum"]: s for s in r["strata"]}
    assert by["A"]["difference"] == pytest.approx(0.1) and by["A"]["weight"] == pytest.approx(5)
    assert by["B"]["difference"] == pytest.approx(0.3) and by["B"]["weight"] == pytest.approx(30 / 7)
    assert M.class_adjusted_difference(y, arm, strata, weights="equal", n=10)["estimate"] == \
        pytest.approx(0.2)
    assert M.class_adjusted_difference(y, arm, strata, weights="unexposed", n=10)["estimate"] == \
        pytest.approx(1 / 6)
    assert r["low"] <= r["estimate"] <= r["high"]


def test_class_adjusted_difference_resamples_clusters_not_cells():
    """20 clusters of 10 identical cells (all right or all wrong), 10 per arm, one class. Each
    resample draws cluster multiplicities; since a cluster's cells are identical, the data with
    each cluster collapsed to one cell gives exactly the same resamples and interval. Ignoring the
    clusters (200 'independent' cells) gives a narrower, wrong interval."""
    rng = np.random.default_rng(0)
    cluster_y = rng.integers(0, 2, 20)
    cluster_arm = np.arange(20) < 10
    y, arm, g = np.repeat(cluster_y, 10), np.repeat(cluster_arm, 10), np.repeat(np.arange(20), 10)
    strata = np.zeros(200)
    clustered = M.class_adjusted_difference(y, arm, strata, groups=g, n=500, seed=3)
    collapsed = M.class_adjusted_difference(cluster_y, cluster_arm, np.zeros(20),
                                            groups=np.arange(20), n=500, seed=3)
    cells = M.class_adjusted_difference(y, arm, strata, n=500, seed=3)
    assert (clustered["low"], clustered["high"]) == pytest.approx((collapsed["low"], collapsed["high"]))
    assert clustered["estimate"] == pytest.approx(collapsed["estimate"])
    assert cells["high"] - cells["low"] < 0.5 * (clustered["high"] - clustered["low"])
    with pytest.raises(M.MetricsError, match="two strata"):
        M.class_adjusted_difference([1, 0], [1, 0], ["A", "B"], groups=["g", "g"])


def test_class_adjusted_difference_stratum_without_both_arms_is_left_out():
    """Class C has only arm-1 cells: it carries no comparison and gets weight 0."""
    y, arm, strata = _two_arm_table()
    r = M.class_adjusted_difference(np.concatenate([y, [1, 1]]), np.concatenate([arm, [True, True]]),
                                    np.concatenate([strata, ["C", "C"]]), n=50)
    assert r["estimate"] == pytest.approx(5 / 26)
    assert {s["stratum"]: s["weight"] for s in r["strata"]}["C"] == 0.0
    none = M.class_adjusted_difference([1, 0], [1, 1], ["A", "A"], n=10)
    assert none["estimate"] is None and none["low"] is None


def test_verdict_signs():
    assert M.verdict({"low": 0.01, "high": 0.2}) == "beats"
    assert M.verdict({"low": -0.2, "high": -0.01}) == "loses"
    assert M.verdict({"low": -0.2, "high": 0.01}) == "ties"
    assert M.verdict({"low": -0.2, "high": -0.01}, higher_is_better=False) == "beats"
    assert M.verdict({"low": None, "high": None}) == "n/a"


def test_balanced_contrasts_hand_table_and_pairing():
    """Arm x: class A 3/4 right, class B 1/2 -> balanced accuracy (0.75 + 0.5) / 2 = 0.625;
    arm y: A 1/2, B 1/2 -> 0.5; contrast x - y = 0.125 (the crude accuracies 4/6 and 2/4 would give
    1/6). Arm z scores exactly arm y's cells (same clusters, same outcomes): z - y is 0 in every
    joint resample, so its interval is [0, 0]."""
    rows = [("x", "A", 1), ("x", "A", 1), ("x", "A", 1), ("x", "A", 0), ("x", "B", 1), ("x", "B", 0)]
    y_rows = [("y", "A", 1), ("y", "A", 0), ("y", "B", 1), ("y", "B", 0)]
    rows += y_rows + [("z",) + r[1:] for r in y_rows]
    arm, strata, out = map(np.array, zip(*rows))
    groups = [f"{s}{i}" for i, s in enumerate(strata)]
    for i in range(4):                                   # z's cells are y's cells (same clusters)
        groups[10 + i] = groups[6 + i]
    r = M.balanced_contrasts(out.astype(float), arm, strata,
                             {"x-y": {"x": 1, "y": -1}, "z-y": {"z": 1, "y": -1}}, groups=groups,
                             n=300, seed=0)
    assert r["arms"]["x"]["estimate"] == pytest.approx(0.625)
    assert r["arms"]["y"]["estimate"] == pytest.approx(0.5)
    assert r["contrasts"]["x-y"]["estimate"] == pytest.approx(0.125)
    zy = r["contrasts"]["z-y"]
    assert (zy["estimate"], zy["low"], zy["high"]) == pytest.approx((0.0, 0.0, 0.0))
    assert r["arms"]["x"]["n"] == 6
    with pytest.raises(M.MetricsError, match="unknown arm"):
        M.balanced_contrasts([1.0], ["x"], ["A"], {"bad": {"w": 1}})
