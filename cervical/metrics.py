"""Classification metrics for the study, plus the ones it never reported.

Thesis §5.4 and §6.1 (Eqs. 6.1–6.4) evaluate with accuracy and per-class precision, recall and F1,
the numbers scikit-learn's ``classification_report`` prints. The study's code labelled the classes
0–4 and, in half of its notebooks, passed ``confusion_matrix(y_pred, y_test)`` with the arguments
swapped (docs/study.md §5). Here every matrix is ``C[i, j] = #{true = i, predicted = j}``
(rows = true class, columns = predicted class) and every number is keyed by class *name*.

Added on top of the study: balanced accuracy, Cohen's kappa, sensitivity and specificity for the
"abnormal" classes, one-vs-rest ROC-AUC, log loss, the Brier score, the expected calibration error
with its reliability-diagram data (Guo et al. 2017) and percentile-bootstrap confidence intervals
(Efron & Tibshirani 1993).

scikit-learn is used wherever it has the metric; the rest is plain NumPy. No TensorFlow import.

Typical use::

    from cervical import metrics
    s = metrics.summarize(y_true, y_pred, class_names, y_prob=probs)
    s["macro_f1"], s["ci"]["macro_f1"]["low"], s["confusion_matrix"]

A check by hand (``python -m doctest metrics.py`` on this file alone): four cells, one class-a
cell called b. Class a: precision 1, recall 1/2, F1 2/3; class b: precision 2/3, recall 1, F1 4/5;
macro-F1 = (2/3 + 4/5) / 2 = 0.7333; the confusion matrix has the truth in rows:

>>> s = summarize([0, 0, 1, 1], [0, 1, 1, 1], ["a", "b"], n_boot=0)
>>> s["accuracy"], round(s["macro_f1"], 4), s["confusion_matrix"]
(0.75, 0.7333, [[1, 1], [0, 2]])

This file imports nothing from the rest of ``cervical`` and never imports TensorFlow.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "MetricsError",
    "confusion_matrix",
    "per_class_scores",
    "accuracy",
    "macro_f1",
    "default_abnormal_classes",
    "sensitivity_specificity",
    "expected_calibration_error",
    "reliability_data",
    "brier_score",
    "roc_auc_ovr",
    "bootstrap_ci",
    "cluster_mean_ci",
    "class_adjusted_difference",
    "balanced_contrasts",
    "verdict",
    "summarize",
    "NAMED_METRICS",
]

# SIPaKMeD: Plissiti et al. 2018 group Dyskeratotic and Koilocytotic as abnormal, Metaplastic as
# benign, Parabasal and Superficial-Intermediate as normal.  Herlev (Jantzen et al. 2005): the
# three normal_* classes are normal, the four dysplasia/carcinoma classes abnormal.
_ABNORMAL_MARKERS = ("dyskeratotic", "koilocytotic", "dysplas", "carcinoma")


class MetricsError(ValueError):
    """Bad input to a metric; the message is one line naming the argument and the fix."""


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------
def _labels(y: Sequence[int], name: str) -> np.ndarray:
    """Return ``y`` as a 1-D int64 array; raise MetricsError on anything else."""
    arr = np.asarray(y)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise MetricsError(f"{name} must be a 1-D vector of integer labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise MetricsError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _pair(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int]):
    """Validate a (y_true, y_pred) pair; return the arrays and the number of classes K."""
    t = _labels(y_true, "y_true")
    p = _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise MetricsError(f"y_true and y_pred differ in length ({t.size} vs {p.size}); pass one prediction per label")
    if t.size == 0:
        raise MetricsError("y_true is empty; evaluate on a split with at least one sample")
    if num_classes is None:
        num_classes = int(max(t.max(), p.max())) + 1
    lo, hi = int(min(t.min(), p.min())), int(max(t.max(), p.max()))
    if lo < 0 or hi >= num_classes:
        raise MetricsError(f"labels must lie in 0..{num_classes - 1} (one per class name), found {lo}..{hi}")
    return t, p, int(num_classes)


def _probs(y_prob, n: int, num_classes: int) -> np.ndarray:
    """Validate probabilities (n, K); renormalise rows in float64 (softmax output in float32 sums to 1 ± 1e-7)."""
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != (n, num_classes):
        raise MetricsError(f"y_prob must have shape ({n}, {num_classes}) (samples, classes), got {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise MetricsError("y_prob must hold finite non-negative probabilities; apply a softmax to logits first")
    s = p.sum(axis=1, keepdims=True)
    if np.any(np.abs(s - 1.0) > 1e-3):
        raise MetricsError("y_prob rows must sum to 1 (softmax probabilities); apply a softmax to logits first")
    return p / s


def _safe_div(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    """num / den elementwise, ``zero_division`` where den == 0 (scikit-learn's convention)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, float(zero_division))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _num(x) -> Optional[float]:
    """A JSON-safe float: NaN/inf/None become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------
# confusion matrix and the scores derived from it
# --------------------------------------------------------------------------------------------
def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None) -> np.ndarray:
    """Confusion matrix with rows = true class and columns = predicted class.

    C[i, j] = #{n : y_true[n] = i and y_pred[n] = j}, i, j in 0..K-1, so row sums are the class
    supports and column sums the prediction counts.  Same as ``sklearn.metrics.confusion_matrix(
    y_true, y_pred, labels=range(K))`` (the study swapped the arguments in its VGG and contrastive
    notebooks, which transposes the matrix).

    Args:
        y_true: true labels, ints in 0..K-1, shape (N,).
        y_pred: predicted labels, same shape.
        num_classes: K; default max label + 1. Pass it so absent classes still get a row/column.

    Returns:
        int64 array (K, K).

    Raises:
        MetricsError: empty input, length mismatch, or labels outside 0..K-1.
    """
    t, p, k = _pair(y_true, y_pred, num_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _scores_from_cm(cm: np.ndarray, zero_division: float = 0.0) -> Dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support from a (K, K) or (B, K, K) confusion matrix.

    precision_k = TP_k / (TP_k + FP_k), recall_k = TP_k / (TP_k + FN_k) (thesis Eqs. 6.2, 6.3),
    F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k) (= harmonic mean of the two, Eq. 6.4; the form
    scikit-learn >= 1.3 uses, so a 0/0 becomes ``zero_division``).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    pred = cm.sum(axis=-2)
    true = cm.sum(axis=-1)
    return {
        "precision": _safe_div(tp, pred, zero_division),
        "recall": _safe_div(tp, true, zero_division),
        "f1": _safe_div(2 * tp, pred + true, zero_division),
        "support": true,
    }


def per_class_scores(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None,
                     zero_division: float = 0.0) -> Dict[str, np.ndarray]:
    """Per-class precision, recall, F1 and support (``sklearn.metrics.precision_recall_fscore_support``).

    Args:
        y_true: true labels (N,).
        y_pred: predicted labels (N,).
        num_classes: K (default max label + 1).
        zero_division: value for a 0/0 score (a class never predicted has undefined precision, a
            class absent from y_true undefined recall); scikit-learn's default behaviour is 0.

    Returns:
        dict of float arrays (K,): "precision", "recall", "f1", "support".

    Raises:
        MetricsError: see :func:`confusion_matrix`.
    """
    return _scores_from_cm(confusion_matrix(y_true, y_pred, num_classes), zero_division)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Accuracy = correct / total (thesis Eq. 6.1)."""
    t, p, _ = _pair(y_true, y_pred, None)
    return float(np.mean(t == p))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None,
             zero_division: float = 0.0) -> float:
    """Macro-F1 = (1/K) Σ_k F1_k over all K classes (scikit-learn ``average="macro"``, ``labels=range(K)``)."""
    return float(np.mean(per_class_scores(y_true, y_pred, num_classes, zero_division)["f1"]))


# --------------------------------------------------------------------------------------------
# clinical view: abnormal vs the rest
# --------------------------------------------------------------------------------------------
def default_abnormal_classes(class_names: Sequence[str]) -> Optional[List[str]]:
    """The classes a screener must not miss, chosen by name.

    - SIPaKMeD (Plissiti et al. 2018): Dyskeratotic and Koilocytotic are abnormal; Metaplastic
      (benign), Parabasal and Superficial-Intermediate (normal) are not.
    - Herlev (Jantzen et al. 2005): light/moderate/severe_dysplastic and carcinoma_in_situ are
      abnormal, the normal_* classes are not.
    - Grouped tasks (3class / 2class): the class named "abnormal".

    Matching is case-insensitive and ignores an "im_" prefix.

    Args:
        class_names: the task's class names, in label order.

    Returns:
        the abnormal class names (in label order), or None when no name is recognised (then
        sensitivity and specificity are not reported unless a mapping is passed explicitly).
    """
    out = []
    for name in class_names:
        key = str(name).lower()
        key = key[3:] if key.startswith("im_") else key
        if key == "abnormal" or any(m in key for m in _ABNORMAL_MARKERS):
            out.append(name)
    if not out or len(out) == len(class_names):
        return None
    return out


def sensitivity_specificity(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str],
                            abnormal: Sequence[str]) -> Dict[str, Optional[float]]:
    """Sensitivity and specificity for "abnormal" after collapsing the classes to two.

    With A = the abnormal class indices, a sample is positive when its label is in A:
        sensitivity = TP / (TP + FN)  (abnormal cells called abnormal, any abnormal class counts),
        specificity = TN / (TN + FP)  (other cells not called abnormal).

    Args:
        y_true: true labels (N,).
        y_pred: predicted labels (N,).
        class_names: names in label order.
        abnormal: the names counted as abnormal (a subset of class_names).

    Returns:
        {"sensitivity", "specificity", "tp", "fn", "tn", "fp"}; a rate is None when its
        denominator is zero (no abnormal / no normal sample).

    Raises:
        MetricsError: an abnormal name that is not in class_names.
    """
    names = list(class_names)
    unknown = [a for a in abnormal if a not in names]
    if unknown:
        raise MetricsError(f"abnormal classes {unknown} are not among class_names {names}; pass names from the task")
    t, p, _ = _pair(y_true, y_pred, len(names))
    idx = np.array([names.index(a) for a in abnormal], dtype=np.int64)
    pos_t, pos_p = np.isin(t, idx), np.isin(p, idx)
    tp, fn = int(np.sum(pos_t & pos_p)), int(np.sum(pos_t & ~pos_p))
    tn, fp = int(np.sum(~pos_t & ~pos_p)), int(np.sum(~pos_t & pos_p))
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
    }


# --------------------------------------------------------------------------------------------
# probabilities: calibration, AUC, Brier
# --------------------------------------------------------------------------------------------
def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b holds confidences in (b/M, (b+1)/M]; a confidence of exactly 0 goes to bin 0."""
    inner = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.searchsorted(inner, conf, side="left")


def reliability_data(y_true: Sequence[int], y_prob, n_bins: int = 15) -> Dict[str, list]:
    """Reliability-diagram data (Guo et al. 2017, "On Calibration of Modern Neural Networks").

    For each sample, confidence = max_k p_k and the prediction = argmax_k p_k.  The confidences are
    put in M equal-width bins B_m = ((m-1)/M, m/M]; for each bin

        acc(B_m)  = (1/|B_m|) Σ_{n in B_m} 1[pred_n = y_n],
        conf(B_m) = (1/|B_m|) Σ_{n in B_m} confidence_n.

    Args:
        y_true: true labels (N,).
        y_prob: probabilities (N, K), rows summing to 1.
        n_bins: M (15 as in Guo et al.).

    Returns:
        {"bin_edges": M+1 floats, "count": M ints, "accuracy": M values, "confidence": M values}
        (None for an empty bin).

    Raises:
        MetricsError: bad shapes or probabilities.
    """
    if int(n_bins) < 1:
        raise MetricsError(f"n_bins must be >= 1, got {n_bins}")
    t = _labels(y_true, "y_true")
    p = np.asarray(y_prob, dtype=np.float64)
    k = p.shape[1] if p.ndim == 2 else 0
    p = _probs(p, t.size, k)
    if t.size == 0:
        raise MetricsError("y_true is empty; evaluate on a split with at least one sample")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    b = _bin_index(conf, n_bins)
    count = np.bincount(b, minlength=n_bins)
    acc = _safe_div(np.bincount(b, weights=correct, minlength=n_bins), count, np.nan)
    cnf = _safe_div(np.bincount(b, weights=conf, minlength=n_bins), count, np.nan)
    return {
        "bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": [_num(a) for a in acc],
        "confidence": [_num(c) for c in cnf],
    }


def expected_calibration_error(y_true: Sequence[int], y_prob, n_bins: int = 15) -> float:
    """Expected calibration error (Guo et al. 2017, Eq. 3; Naeini et al. 2015).

        ECE = Σ_m (|B_m| / N) · |acc(B_m) − conf(B_m)|

    with the equal-width confidence bins of :func:`reliability_data`.  0 for a calibrated model; a
    model that always says 0.9 and is right 60 % of the time has ECE = 0.3.

    Args:
        y_true: true labels (N,).
        y_prob: probabilities (N, K).
        n_bins: number of bins M (default 15).

    Returns:
        ECE in [0, 1].

    Raises:
        MetricsError: bad shapes or probabilities.
    """
    rd = reliability_data(y_true, y_prob, n_bins)
    n = float(sum(rd["count"]))
    return float(sum(c / n * abs(a - f) for c, a, f in zip(rd["count"], rd["accuracy"], rd["confidence"]) if c))


def brier_score(y_true: Sequence[int], y_prob) -> float:
    """Multi-class Brier score (Brier 1950): (1/N) Σ_n Σ_k (p_nk − 1[y_n = k])², in [0, 2]."""
    t = _labels(y_true, "y_true")
    p = np.asarray(y_prob, dtype=np.float64)
    p = _probs(p, t.size, p.shape[1] if p.ndim == 2 else 0)
    onehot = np.eye(p.shape[1])[t]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def roc_auc_ovr(y_true: Sequence[int], y_prob) -> Dict[str, object]:
    """One-vs-rest ROC-AUC per class and their unweighted (macro) mean (Hand & Till 2001 style OvR).

    AUC_k = area under the ROC curve of the score p_k for "class k" vs "any other class"
    (``sklearn.metrics.roc_auc_score`` on the binary problem).  A class with no positive or no
    negative sample has no AUC (None) and is left out of the mean; with every class present the
    mean equals ``roc_auc_score(y_true, y_prob, multi_class="ovr", average="macro")``.

    Args:
        y_true: true labels (N,).
        y_prob: probabilities (N, K).

    Returns:
        {"macro": float or None, "per_class": list of K floats or None}.
    """
    from sklearn.metrics import roc_auc_score

    t = _labels(y_true, "y_true")
    p = np.asarray(y_prob, dtype=np.float64)
    p = _probs(p, t.size, p.shape[1] if p.ndim == 2 else 0)
    per = []
    for k in range(p.shape[1]):
        pos = t == k
        per.append(float(roc_auc_score(pos, p[:, k])) if 0 < pos.sum() < t.size else None)
    defined = [a for a in per if a is not None]
    return {"macro": float(np.mean(defined)) if defined else None, "per_class": per}


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def _vec_accuracy(t: np.ndarray, p: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """Accuracy of every resample (row of idx)."""
    return np.mean(t[idx] == p[idx], axis=1)


def _vec_cms(t: np.ndarray, p: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """One confusion matrix per bootstrap row of ``idx`` (B, N) -> (B, K, K), with a single bincount."""
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * k * k + t[idx] * k + p[idx]).ravel()
    return np.bincount(flat, minlength=b * k * k).reshape(b, k, k)


def _vec_macro_f1(t, p, idx, k):
    """Macro-F1 (all K classes, 0/0 -> 0) of every resample."""
    return _scores_from_cm(_vec_cms(t, p, idx, k))["f1"].mean(axis=1)


def _vec_weighted_f1(t, p, idx, k):
    """Support-weighted F1 of every resample."""
    s = _scores_from_cm(_vec_cms(t, p, idx, k))
    return np.sum(s["f1"] * s["support"], axis=1) / idx.shape[1]


def _vec_balanced_accuracy(t, p, idx, k):
    # mean recall over the classes present in the resample (scikit-learn drops absent classes)
    s = _scores_from_cm(_vec_cms(t, p, idx, k), zero_division=np.nan)
    return np.nanmean(s["recall"], axis=1)


def _vec_kappa(t, p, idx, k):
    # Cohen 1960: kappa = (p_o - p_e) / (1 - p_e), p_e = Σ_k row_k col_k / N²
    cm = _vec_cms(t, p, idx, k).astype(np.float64)
    n = idx.shape[1]
    po = np.trace(cm, axis1=1, axis2=2) / n
    pe = np.sum(cm.sum(axis=2) * cm.sum(axis=1), axis=1) / n ** 2
    return _safe_div(po - pe, 1.0 - pe, 0.0)


def _cluster_stats(t, p, groups, metric, vec, k, n, rng) -> np.ndarray:
    """The metric on ``n`` cluster resamples: G of the G clusters drawn with replacement."""
    g = np.asarray(groups)
    if g.shape[0] != t.size:
        raise MetricsError(f"groups: {g.shape[0]} ids for {t.size} samples; give one per sample")
    _, cluster = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(cluster == c) for c in range(int(cluster.max()) + 1)]
    draws = rng.integers(0, len(members), size=(n, len(members)))
    stats = np.empty(n)
    for b, draw in enumerate(draws):
        idx = np.concatenate([members[c] for c in draw])
        stats[b] = vec(t, p, idx[None, :], k)[0] if vec is not None else float(metric(t[idx], p[idx]))
    return stats


#: Metrics that :func:`bootstrap_ci` computes vectorised over all resamples at once.
NAMED_METRICS: Dict[str, Callable] = {
    "accuracy": _vec_accuracy,
    "macro_f1": _vec_macro_f1,
    "weighted_f1": _vec_weighted_f1,
    "balanced_accuracy": _vec_balanced_accuracy,
    "kappa": _vec_kappa,
}


def bootstrap_ci(y_true: Sequence[int], y_pred: Sequence[int],
                 metric: Union[str, Callable[[np.ndarray, np.ndarray], float]] = "accuracy",
                 n: int = 1000, seed: int = 0, alpha: float = 0.05,
                 num_classes: Optional[int] = None, chunk: int = 200,
                 groups: Optional[Sequence] = None) -> Dict[str, object]:
    """Percentile-bootstrap confidence interval of a metric (Efron & Tibshirani 1993, §13.3).

    Draw B = ``n`` resamples of the N test samples with replacement (one index matrix from
    ``numpy.random.default_rng(seed)``), compute the metric θ*_b on each, and report the
    α/2 and 1 − α/2 quantiles of {θ*_b}: a (1 − α) interval, 95 % by default.  The point
    estimate θ is the metric on the full sample.  Named metrics are computed for all resamples
    at once from per-resample confusion matrices; a callable is called once per resample on the
    same indices, so ``"macro_f1"`` and an equivalent callable give identical intervals.

    Args:
        y_true: true labels (N,).
        y_pred: predicted labels (N,).
        metric: one of ``NAMED_METRICS`` ("accuracy", "macro_f1", "weighted_f1",
            "balanced_accuracy", "kappa") or a callable ``f(y_true, y_pred) -> float``.
        n: number of bootstrap resamples B.
        seed: seed of the resampling generator (same seed, same interval).
        alpha: 1 − confidence level.
        num_classes: K for the named metrics (default max label + 1); macro-F1 averages over K.
        chunk: resamples processed per vectorised step (bounds memory to chunk·N·K² counts).
        groups: optional (N,) cluster ids. Cells of one cluster (e.g. the cells cut from one
            Pap-smear image, which share its stain and focus) are not independent, so a cell-level
            bootstrap understates the uncertainty; with ``groups`` the G clusters are resampled
            with replacement instead and each resample holds every cell of the drawn clusters
            (the cluster bootstrap, Davison & Hinkley 1997, §3.8). One cell per cluster gives
            exactly the cell-level interval.

    Returns:
        {"metric", "estimate", "low", "high", "alpha", "n_boot", "seed", "method"}, method
        "percentile" or "cluster percentile" (then also "n_groups").

    Raises:
        MetricsError: unknown metric name, n < 1, alpha outside (0, 1), or bad labels.
    """
    t, p, k = _pair(y_true, y_pred, num_classes)
    if int(n) < 1:
        raise MetricsError(f"n (bootstrap resamples) must be >= 1, got {n}")
    if not 0.0 < float(alpha) < 1.0:
        raise MetricsError(f"alpha must be in (0, 1), e.g. 0.05 for a 95 % interval; got {alpha}")
    if isinstance(metric, str):
        if metric not in NAMED_METRICS:
            raise MetricsError(f"unknown metric {metric!r}; use one of {sorted(NAMED_METRICS)} or a callable")
        vec = NAMED_METRICS[metric]
        name = metric
        estimate = float(vec(t, p, np.arange(t.size)[None, :], k)[0])
    else:
        vec = None
        name = getattr(metric, "__name__", "custom")
        estimate = float(metric(t, p))
    rng = np.random.default_rng(seed)
    if groups is not None:
        stats = _cluster_stats(t, p, groups, metric, vec, k, int(n), rng)
        low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
        return {"metric": name, "estimate": estimate, "low": float(low), "high": float(high),
                "alpha": float(alpha), "n_boot": int(n), "seed": int(seed),
                "method": "cluster percentile", "n_groups": int(len(set(np.asarray(groups).tolist())))}
    idx = rng.integers(0, t.size, size=(int(n), t.size))
    stats = np.empty(int(n))
    step = max(1, int(chunk))
    for s in range(0, int(n), step):
        block = idx[s:s + step]
        if vec is not None:
            stats[s:s + len(block)] = vec(t, p, block, k)
        else:
            stats[s:s + len(block)] = [float(metric(t[i], p[i])) for i in block]
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {"metric": name, "estimate": estimate, "low": float(low), "high": float(high),
            "alpha": float(alpha), "n_boot": int(n), "seed": int(seed), "method": "percentile"}


# --------------------------------------------------------------------------------------------
# contrasts with a cluster bootstrap: a mean, and a class-adjusted difference between two arms
# --------------------------------------------------------------------------------------------
def _cluster_index(groups: Optional[Sequence], n: int) -> np.ndarray:
    """(n,) cluster numbers 0..G-1 (every sample its own cluster when ``groups`` is None)."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise MetricsError(f"groups: {g.shape[0] if g.ndim else 0} ids for {n} samples; give one "
                           f"per sample")
    return np.unique(g, return_inverse=True)[1].reshape(-1)


def _check_alpha_n(n: int, alpha: float) -> None:
    if int(n) < 1:
        raise MetricsError(f"n (bootstrap resamples) must be >= 1, got {n}")
    if not 0.0 < float(alpha) < 1.0:
        raise MetricsError(f"alpha must be in (0, 1), e.g. 0.05 for a 95 % interval; got {alpha}")


def cluster_mean_ci(values: Sequence[float], groups: Optional[Sequence] = None, n: int = 1000,
                    seed: int = 0, alpha: float = 0.05) -> Dict[str, object]:
    """The mean of per-sample values with a percentile cluster-bootstrap interval.

    Each resample draws G of the G clusters with replacement; its statistic is the mean over every
    sample of the drawn clusters, sum_g c_g S_g / sum_g c_g m_g (c_g = times cluster g was drawn,
    S_g its sum, m_g its size). With one sample per cluster (``groups`` None) this is the ordinary
    bootstrap of a mean. Used for paired per-cell differences (method minus reference): the mean
    difference and whether its interval excludes 0.

    >>> r = cluster_mean_ci([1.0, 1.0, 1.0], n=50)
    >>> r["estimate"], r["low"], r["high"]
    (1.0, 1.0, 1.0)

    Args:
        values: (N,) finite numbers (NaN entries are dropped with their group entry).
        groups: optional (N,) cluster ids (e.g. the cluster image of each cell).
        n: resamples B.
        seed: seed of ``numpy.random.default_rng``.
        alpha: 1 - confidence level.
    Returns:
        {"estimate", "low", "high", "n", "n_groups", "alpha", "n_boot", "seed"}; estimate and
        bounds are None when no value is left.
    """
    _check_alpha_n(n, alpha)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    c = _cluster_index(groups, v.size)
    keep = ~np.isnan(v)
    v, c = v[keep], np.unique(c[keep], return_inverse=True)[1].reshape(-1)
    out = {"estimate": None, "low": None, "high": None, "n": int(v.size), "n_groups": 0,
           "alpha": float(alpha), "n_boot": int(n), "seed": int(seed)}
    if v.size == 0:
        return out
    g = int(c.max()) + 1
    sums, sizes = np.bincount(c, v, g), np.bincount(c, minlength=g).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(g, np.full(g, 1.0 / g), size=int(n))
    stats = (draws @ sums) / (draws @ sizes)
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    out.update(estimate=float(v.mean()), low=float(low), high=float(high), n_groups=g)
    return out


def _clusters_in_strata(groups: Optional[Sequence], strata: np.ndarray
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """(cluster number of each sample, stratum of each cluster); clusters must not span strata."""
    c = _cluster_index(groups, strata.size)
    stratum_of = np.full(int(c.max()) + 1 if c.size else 0, -1)
    stratum_of[c] = strata
    if np.any(stratum_of[c] != strata):
        raise MetricsError("groups: a cluster holds samples of two strata; clusters must lie "
                           "within one stratum (one class)")
    return c, stratum_of


def _stratified_draws(stratum_of: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, G) cluster multiplicities: in every stratum as many clusters as it has, drawn with
    replacement (the stratified cluster bootstrap)."""
    rng = np.random.default_rng(seed)
    draws = np.zeros((int(n), stratum_of.size))
    for j in range(int(stratum_of.max()) + 1 if stratum_of.size else 0):
        members = np.flatnonzero(stratum_of == j)
        if members.size:
            draws[:, members] = rng.multinomial(members.size,
                                                np.full(members.size, 1.0 / members.size),
                                                size=int(n))
    return draws


def _stratum_weights(n1: np.ndarray, n0: np.ndarray, weights: str) -> np.ndarray:
    """Per-stratum weights (..., K); 0 where an arm is empty."""
    both = (n1 > 0) & (n0 > 0)
    if weights == "mh":                  # Mantel-Haenszel risk-difference weights
        w = np.where(both, n1 * n0 / np.maximum(n1 + n0, 1), 0.0)
    elif weights == "unexposed":         # standardised to the unexposed arm's class mix
        w = np.where(both, n0, 0.0)
    else:                                # "equal": the mean of the per-class differences
        w = both.astype(np.float64)
    return w.astype(np.float64)


def class_adjusted_difference(outcome: Sequence[float], arm: Sequence[bool], strata: Sequence,
                              groups: Optional[Sequence] = None, weights: str = "mh",
                              n: int = 2000, seed: int = 0, alpha: float = 0.05
                              ) -> Dict[str, object]:
    """Difference of a mean outcome between two arms, adjusted for strata (e.g. the class), with a
    stratified cluster-bootstrap interval.

    Within stratum k, d_k = mean(outcome | arm 1, k) - mean(outcome | arm 0, k); the estimate is
    sum_k w_k d_k / sum_k w_k over the strata that have both arms, with
        "mh"         w_k = n1_k n0_k / (n1_k + n0_k)   (Mantel-Haenszel risk difference),
        "unexposed"  w_k = n0_k                        (standardised to arm 0's mix),
        "equal"      w_k = 1                           (every class counts alike).
    Comparing raw means instead would mix the arms' effect with their class mix: when the exposed
    arm holds mostly easy classes it scores higher whatever the exposure did.

    Interval: each resample draws, within every stratum, as many clusters as it has, with
    replacement, and takes all their samples in both arms (a cluster in both arms stays paired);
    the estimate is recomputed, weights included, and the alpha/2, 1 - alpha/2 quantiles are kept.
    Clusters must lie within one stratum (a cluster image holds cells of one class).

    >>> r = class_adjusted_difference([1, 1, 0, 0], [1, 1, 0, 0], ["a", "a", "a", "a"], n=20)
    >>> r["estimate"]
    1.0

    Args:
        outcome: (N,) per-sample outcomes (1 correct, 0 wrong; or any number).
        arm: (N,) True for the exposed arm (e.g. a leaked cluster), False for the other.
        strata: (N,) stratum of each sample (its class).
        groups: optional (N,) cluster ids, each within one stratum.
        weights: "mh", "unexposed" or "equal".
        n, seed, alpha: resamples, seed, 1 - confidence level.
    Returns:
        {"estimate", "low", "high", "weights", "strata": [{"stratum", "n1", "n0", "mean1",
        "mean0", "difference", "weight"}], "crude": raw mean1 - mean0, "n1", "n0", "n_groups",
        "alpha", "n_boot", "seed"}; estimate None when no stratum has both arms.
    Raises:
        MetricsError: lengths differ, unknown weights, or a cluster spans two strata.
    """
    _check_alpha_n(n, alpha)
    if weights not in ("mh", "unexposed", "equal"):
        raise MetricsError(f"weights={weights!r}: choose mh, unexposed or equal")
    y = np.asarray(outcome, dtype=np.float64).reshape(-1)
    a = np.asarray(arm).astype(bool).reshape(-1)
    s_names, s = np.unique(np.asarray(strata).astype(str), return_inverse=True)
    if not (a.size == y.size == s.size):
        raise MetricsError(f"outcome, arm and strata: lengths {y.size}, {a.size}, {s.size} differ")
    c, stratum_of = _clusters_in_strata(groups, s)
    g, k = stratum_of.size, len(s_names)
    # per cluster and arm: sums and counts (G, 2)
    sums = np.stack([np.bincount(c, y * (a == arm_), g) for arm_ in (False, True)], 1)
    sizes = np.stack([np.bincount(c, (a == arm_).astype(np.float64), g)
                      for arm_ in (False, True)], 1)

    def estimate(cnt: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """cnt (B, G) cluster multiplicities -> (estimate (B,), per-stratum d (B, K), w (B, K))."""
        tot_s = np.zeros((cnt.shape[0], k, 2))
        tot_n = np.zeros((cnt.shape[0], k, 2))
        for j in range(k):
            members = stratum_of == j
            tot_s[:, j] = cnt[:, members] @ sums[members]
            tot_n[:, j] = cnt[:, members] @ sizes[members]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = tot_s / tot_n
        w = _stratum_weights(tot_n[..., 1], tot_n[..., 0], weights)
        d = np.where(w > 0, mean[..., 1] - mean[..., 0], 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            est = np.where(w.sum(1) > 0, (w * d).sum(1) / w.sum(1), np.nan)
        return est, np.where(w > 0, d, np.nan), w

    est, d, w = estimate(np.ones((1, g)))
    boot = estimate(_stratified_draws(stratum_of, n, seed))[0]
    boot = boot[~np.isnan(boot)]
    ok = not np.isnan(est[0]) and boot.size > 0
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0]) if ok else (None, None)
    table = []
    for j, name in enumerate(s_names):
        n1, n0 = int(sizes[stratum_of == j, 1].sum()), int(sizes[stratum_of == j, 0].sum())
        m1 = float(sums[stratum_of == j, 1].sum() / n1) if n1 else None
        m0 = float(sums[stratum_of == j, 0].sum() / n0) if n0 else None
        table.append({"stratum": str(name), "n1": n1, "n0": n0, "mean1": m1, "mean0": m0,
                      "difference": None if np.isnan(d[0, j]) else float(d[0, j]),
                      "weight": float(w[0, j])})
    n1, n0 = int(a.sum()), int((~a).sum())
    crude = float(y[a].mean() - y[~a].mean()) if n1 and n0 else None
    return {"estimate": float(est[0]) if ok else None,
            "low": None if low is None else float(low), "high": None if high is None else float(high),
            "weights": weights, "strata": table, "crude": crude, "n1": n1, "n0": n0,
            "n_groups": g, "alpha": float(alpha), "n_boot": int(n), "seed": int(seed)}


def balanced_contrasts(outcome: Sequence[float], arm: Sequence, strata: Sequence,
                       contrasts: Dict[str, Dict[str, float]], groups: Optional[Sequence] = None,
                       n: int = 2000, seed: int = 0, alpha: float = 0.05) -> Dict[str, object]:
    """Class-balanced means of several arms and linear contrasts between them, with one joint
    stratified cluster bootstrap.

    The class-balanced mean of arm a is B_a = (1/K_a) sum_k mean(outcome | a, k) over the K_a
    strata the arm has (for 0/1 correctness: its balanced accuracy, the mean per-class recall), so
    arms whose test sets hold other class mixes are compared at equal class weights. A contrast
    is sum_a c_a B_a, e.g. {"study": 1, "ours": -1}. Every resample draws cluster multiplicities
    within each stratum once and applies them to every arm: a cluster that several arms tested
    (the same test cells under two protocols) stays paired, so two arms that score the same cells
    identically differ by exactly 0 in every resample.

    Args:
        outcome: (N,) per-sample outcome (1 correct, 0 wrong).
        arm: (N,) arm name of each sample.
        strata: (N,) stratum (class) of each sample.
        contrasts: {name: {arm: coefficient}}.
        groups: optional (N,) cluster ids, each within one stratum (across arms).
        n, seed, alpha: resamples, seed, 1 - confidence level.
    Returns:
        {"arms": {arm: {"estimate", "low", "high", "n"}}, "contrasts": {name: {"estimate", "low",
        "high", "coefficients"}}, "n_groups", "n_boot", "seed", "alpha"}.
    Raises:
        MetricsError: lengths differ, a contrast names an unknown arm, or a cluster spans strata.
    """
    _check_alpha_n(n, alpha)
    y = np.asarray(outcome, dtype=np.float64).reshape(-1)
    arm_names, a = np.unique(np.asarray(arm).astype(str), return_inverse=True)
    _, s = np.unique(np.asarray(strata).astype(str), return_inverse=True)
    if not (a.size == y.size == s.size):
        raise MetricsError(f"outcome, arm and strata: lengths {y.size}, {a.size}, {s.size} differ")
    for name, coef in contrasts.items():
        unknown = sorted(set(coef) - set(arm_names.tolist()))
        if unknown:
            raise MetricsError(f"contrast {name!r}: unknown arm {unknown[0]!r}; arms are "
                               f"{', '.join(arm_names)}")
    c, stratum_of = _clusters_in_strata(groups, s)
    g, k, m = stratum_of.size, int(s.max()) + 1, len(arm_names)
    sums = np.stack([np.bincount(c, y * (a == j), g) for j in range(m)], 1)        # (G, A)
    sizes = np.stack([np.bincount(c, (a == j).astype(np.float64), g) for j in range(m)], 1)
    coef = np.array([[contrasts[name].get(arm_name, 0.0) for name in contrasts]
                     for arm_name in arm_names], dtype=np.float64).reshape(m, len(contrasts))

    def balanced(cnt: np.ndarray) -> np.ndarray:
        """cnt (B, G) -> (B, A) class-balanced means."""
        per = np.empty((cnt.shape[0], k, m))
        for j in range(k):
            members = stratum_of == j
            with np.errstate(invalid="ignore", divide="ignore"):
                per[:, j] = (cnt[:, members] @ sums[members]) / (cnt[:, members] @ sizes[members])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)        # an arm without any sample
            return np.nanmean(per, axis=1)

    point = balanced(np.ones((1, g)))[0]
    boot = balanced(_stratified_draws(stratum_of, n, seed))
    q = (alpha / 2.0, 1.0 - alpha / 2.0)

    def interval(values: np.ndarray, estimate: float) -> Dict[str, Optional[float]]:
        v = values[~np.isnan(values)]
        if np.isnan(estimate) or v.size == 0:
            return {"estimate": None, "low": None, "high": None}
        low, high = np.quantile(v, q)
        return {"estimate": float(estimate), "low": float(low), "high": float(high)}

    arms = {str(name): {**interval(boot[:, j], point[j]), "n": int(sizes[:, j].sum())}
            for j, name in enumerate(arm_names)}
    out = {name: {**interval(boot @ coef[:, i], float(point @ coef[:, i])),
                  "coefficients": dict(contrasts[name])}
           for i, name in enumerate(contrasts)}
    return {"arms": arms, "contrasts": out, "n_groups": g, "n_boot": int(n), "seed": int(seed),
            "alpha": float(alpha)}


def verdict(interval: Dict[str, object], higher_is_better: bool = True) -> str:
    """"beats", "loses" or "ties": whether a difference's interval lies above 0, below 0, or covers
    it (for a lower-is-better score, such as deletion AUC, the sign is turned); "n/a" without one.

    >>> verdict({"low": 0.01, "high": 0.2}), verdict({"low": -0.1, "high": 0.2})
    ('beats', 'ties')
    >>> verdict({"low": 0.01, "high": 0.2}, higher_is_better=False)
    'loses'
    """
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "n/a"
    if low > 0:
        return "beats" if higher_is_better else "loses"
    if high < 0:
        return "loses" if higher_is_better else "beats"
    return "ties"


# --------------------------------------------------------------------------------------------
# the summary written to metrics.json
# --------------------------------------------------------------------------------------------
def summarize(y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str], y_prob=None,
              abnormal: Optional[Sequence[str]] = None, n_bins: int = 15, n_boot: int = 1000,
              seed: int = 0, zero_division: float = 0.0,
              groups: Optional[Sequence] = None) -> Dict[str, object]:
    """Every number of the study (thesis §6.1) and the ones it lacked, as one JSON-ready dict.

    Definitions (scikit-learn's, with ``labels=range(K)`` so every class has a row):
        accuracy          = Σ_k C[k, k] / N
        per-class P, R, F1 = thesis Eqs. 6.2–6.4 (0/0 -> ``zero_division``)
        macro_*           = (1/K) Σ_k score_k        (all K classes)
        weighted_*        = Σ_k (n_k / N) score_k    (n_k = support; the thesis's "weighted" metrics)
        balanced_accuracy = mean recall over the classes present in y_true
        kappa             = (p_o − p_e) / (1 − p_e)  (Cohen 1960)
    With ``y_prob``: ``roc_auc`` (macro one-vs-rest), ``log_loss`` (−(1/N) Σ log p_{n,y_n}),
    ``brier``, ``ece`` and ``reliability`` (Guo et al. 2017, ``n_bins`` bins).
    With ``n_boot`` > 0: ``ci`` holds 95 % percentile-bootstrap intervals of accuracy and macro-F1
    (over clusters with ``groups``, and then ``ci_cells`` the cell-level ones beside them).

    Args:
        y_true: true labels (N,), ints in 0..K-1.
        y_pred: predicted labels (N,).
        class_names: K names in label order.
        y_prob: optional probabilities (N, K).
        abnormal: names counted as abnormal for sensitivity/specificity; None uses
            :func:`default_abnormal_classes` (SIPaKMeD / Herlev names); an empty list skips them.
        n_bins: calibration bins.
        n_boot: bootstrap resamples (0 skips the intervals).
        groups: optional (N,) cluster ids; the intervals then resample clusters (see
            :func:`bootstrap_ci`), as they must when cells of one image are not independent.
        seed: bootstrap seed.
        zero_division: value of an undefined (0/0) precision, recall or F1: 0 or 1 (the bootstrap
            intervals always use 0).

    Returns:
        dict with top-level keys ``n, num_classes, class_names, accuracy, balanced_accuracy,
        macro_precision, macro_recall, macro_f1, weighted_precision, weighted_recall, weighted_f1,
        kappa, confusion_matrix`` (rows true, columns predicted), ``per_class`` ({name: {precision,
        recall, f1, support[, roc_auc]}}), ``absent_classes``, ``never_predicted``,
        ``abnormal_classes, sensitivity, specificity``, and, when available, ``roc_auc, log_loss,
        brier, ece, reliability, ci``.  Undefined values are None (JSON null).

    Raises:
        MetricsError: inconsistent lengths, labels outside 0..K-1, bad probabilities.
    """
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, log_loss

    names = [str(c) for c in class_names]
    k = len(names)
    if zero_division not in (0, 1):
        raise MetricsError(f"zero_division must be 0 or 1, got {zero_division}")
    if k < 2:
        raise MetricsError(f"class_names must name at least 2 classes, got {names}")
    t, p, _ = _pair(y_true, y_pred, k)
    cm = confusion_matrix(t, p, k)
    sc = _scores_from_cm(cm, zero_division)
    w = sc["support"] / t.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns for classes absent from y_true; we report them below
        bal = balanced_accuracy_score(t, p)
        kappa = cohen_kappa_score(t, p, labels=list(range(k)))
    out: Dict[str, object] = {
        "n": int(t.size),
        "num_classes": k,
        "class_names": names,
        "accuracy": float(np.mean(t == p)),
        "balanced_accuracy": _num(bal),
        "macro_precision": float(sc["precision"].mean()),
        "macro_recall": float(sc["recall"].mean()),
        "macro_f1": float(sc["f1"].mean()),
        "weighted_precision": float(np.sum(w * sc["precision"])),
        "weighted_recall": float(np.sum(w * sc["recall"])),
        "weighted_f1": float(np.sum(w * sc["f1"])),
        "kappa": _num(kappa),
        "confusion_matrix": cm.tolist(),
        "per_class": {
            name: {"precision": float(sc["precision"][i]), "recall": float(sc["recall"][i]),
                   "f1": float(sc["f1"][i]), "support": int(sc["support"][i])}
            for i, name in enumerate(names)
        },
        "absent_classes": [names[i] for i in range(k) if sc["support"][i] == 0],
        "never_predicted": [names[i] for i in range(k) if cm[:, i].sum() == 0],
        "zero_division": float(zero_division),
    }
    ab = default_abnormal_classes(names) if abnormal is None else list(abnormal)
    out["abnormal_classes"] = list(ab) if ab else None
    ss = sensitivity_specificity(t, p, names, ab) if ab else {}
    out["sensitivity"] = ss.get("sensitivity")
    out["specificity"] = ss.get("specificity")
    if y_prob is not None:
        prob = _probs(y_prob, t.size, k)
        auc = roc_auc_ovr(t, prob)
        for i, name in enumerate(names):
            out["per_class"][name]["roc_auc"] = auc["per_class"][i]
        out["roc_auc"] = auc["macro"]
        out["log_loss"] = float(log_loss(t, prob, labels=list(range(k))))
        out["brier"] = brier_score(t, prob)
        out["reliability"] = reliability_data(t, prob, n_bins)
        out["ece"] = expected_calibration_error(t, prob, n_bins)
    if n_boot:
        out.update(_summary_intervals(t, p, k, n_boot, seed, groups))
    return out


def _summary_intervals(t: np.ndarray, p: np.ndarray, k: int, n_boot: int, seed: int,
                       groups: Optional[Sequence]) -> Dict[str, object]:
    """summarize's "ci" (over clusters with ``groups``) and, with groups, "ci_cells" beside it."""
    out = {"ci": {m: bootstrap_ci(t, p, m, n=n_boot, seed=seed, num_classes=k, groups=groups)
                  for m in ("accuracy", "macro_f1")}}
    if groups is not None:     # the cell-level interval too, to show what clustering adds
        out["ci_cells"] = {m: bootstrap_ci(t, p, m, n=n_boot, seed=seed, num_classes=k)
                           for m in ("accuracy", "macro_f1")}
    return out
