"""Supervised contrastive and cost-sensitive losses, usable as plain functions and as Keras losses.

The study (thesis section 3.3, 5.3c, Fig. 6.3) compared three contrastive losses. Only one worked in its
code (docs/study.md §4): its "NT-Xent" ignored the labels and collapsed to ln 31, and
its triplet loss used only the first three samples of each batch and collapsed to the margin 0.2. Here
each loss follows its paper, and tests/test_losses.py checks each against a plain NumPy reference.

Contrastive losses (``labels`` (B,) or (B, 1) integers, ``features`` (B, D) or (B, V, D)):

    supcon_loss    Khosla et al. 2020, "Supervised Contrastive Learning" (self excluded).
    npairs_loss    the study's "multi-class N-pairs": tensorflow-addons ``npairs_loss`` on cosine / tau
                   logits, with the self-pair kept (what its notebooks computed).
    triplet_loss   Schroff et al. 2015 (semi-hard), Hermans et al. 2017 (batch-all, batch-hard).

Cost-sensitive losses (Keras ``Loss`` objects; ``y_true`` integer (B,) / (B, 1) or one-hot (B, K),
``y_pred`` probabilities (B, K), or logits with ``from_logits=True``):

    weighted_crossentropy(class_weights)   thesis Eq. 3.2 generalised to K classes.
    cost_matrix_loss(cost_matrix)          expected misclassification cost sum_j C[y, j] p_j.

Each contrastive function returns a float32 scalar tensor and can be differentiated with
tf.GradientTape. ``make_loss(name, **kw)`` returns the matching ``keras.losses.Loss`` for
``model.compile(loss=...)``. Every Loss class is registered as serializable (package "cervical"),
so a model compiled with one can be saved and loaded again.

A check by hand (``python -m doctest losses.py`` on this file alone needs only TensorFlow): two
perfectly separated pairs at temperature 1. For SupCon each anchor has one positive at cosine 1
and two negatives at cosine 0 in its denominator, so L = -log(e / (e + 2)) = log(1 + 2/e); the
study's N-pairs keeps the anchor itself as a second positive, L = log(2 + 2/e):

>>> import numpy as np
>>> labels = np.array([0, 0, 1, 1])
>>> emb = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
>>> round(float(supcon_loss(labels, emb, temperature=1.0, base_temperature=1.0)), 4)
0.5514
>>> round(float(np.log(1 + 2 / np.e)), 4)
0.5514
>>> round(float(npairs_loss(labels, emb, temperature=1.0)), 4), round(float(np.log(2 + 2 / np.e)), 4)
(1.0064, 1.0064)

This file imports nothing from the rest of ``cervical``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "LossError", "supcon_loss", "npairs_loss", "triplet_loss", "TRIPLET_MINING",
    "CONTRASTIVE_LOSSES", "SupConLoss", "NPairsLoss", "TripletLoss", "WeightedCrossentropy",
    "CostMatrixLoss", "weighted_crossentropy", "cost_matrix_loss", "clinical_cost_matrix",
    "LOSS_NAMES", "make_loss",
]

TRIPLET_MINING = ("batch_all", "batch_hard", "semi_hard")
PROB_EPSILON = 1e-7          # probabilities are clipped to [eps, 1] before the log (as Keras does)
_MASKED = -1e9               # logit for excluded entries: exp() gives exactly 0 but stays finite
_FAR = 1e9                   # distance sentinel for "not a negative" (real distances lie in [0, 4])

ArrayLike = Union[np.ndarray, tf.Tensor, Sequence]


class LossError(ValueError):
    """Bad loss argument; the message is one line naming the argument and the fix."""


# ------------------------------------------------------------------------------------------------
# Input plumbing shared by the contrastive losses
# ------------------------------------------------------------------------------------------------

def _check_positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is finite and > 0, else raise LossError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise LossError(f"{name}={value!r}: must be a number > 0") from None
    if not math.isfinite(v) or v <= 0.0:
        raise LossError(f"{name}={value!r}: must be a finite number > 0 (e.g. {name}=0.07)")
    return v


def _flat_labels(labels: ArrayLike, arg: str = "labels") -> tf.Tensor:
    """Labels of shape (B,) or (B, 1) -> (B,) tensor; any other shape raises LossError."""
    y = tf.convert_to_tensor(labels)
    rank = y.shape.rank
    if rank == 2 and y.shape[1] not in (1, None):
        raise LossError(f"{arg}: shape {tuple(y.shape)} is not (B,) or (B, 1); pass integer class "
                        f"ids, not one-hot vectors (use argmax)")
    if rank not in (None, 1, 2):
        raise LossError(f"{arg}: shape {tuple(y.shape)} is not (B,) or (B, 1); pass one integer "
                        f"class id per sample")
    return tf.reshape(y, [-1])


def _prepare_contrastive(labels: Optional[ArrayLike], features: ArrayLike,
                         need_labels: bool = True) -> Tuple[tf.Tensor, tf.Tensor]:
    """Flatten views and L2-normalise.

    Args:
        labels: (B,) or (B, 1) class ids, or None (then each sample is its own class: SimCLR).
        features: (B, D) or (B, V, D) embeddings, any float dtype.
        need_labels: if True, ``labels=None`` is an error.
    Returns:
        (y, z): y (N,) labels and z (N, D) float32 unit vectors, N = B * V. Views are stacked view by
        view (all samples of view 0, then view 1, ...), each view keeping its sample's label.
    Raises:
        LossError: wrong ranks or a labels / features batch mismatch.
    """
    f = tf.cast(tf.convert_to_tensor(features), tf.float32)
    rank = f.shape.rank
    if rank not in (2, 3):
        raise LossError(f"features: shape {tuple(f.shape)} must be (B, D) or (B, V, D) "
                        f"(V augmented views)")
    if labels is None:
        if need_labels:
            raise LossError("labels=None: this loss needs class ids of shape (B,) or (B, 1)")
        y = tf.range(tf.shape(f)[0])
    else:
        y = _flat_labels(labels)
        b_lab, b_feat = y.shape[0], f.shape[0]
        if b_lab is not None and b_feat is not None and b_lab != b_feat:
            raise LossError(f"labels: {b_lab} labels for {b_feat} feature rows; pass one label per "
                            f"sample (not per view)")
    if rank == 3:
        v = tf.shape(f)[1]
        f = tf.reshape(tf.transpose(f, [1, 0, 2]), [-1, tf.shape(f)[2]])   # (V*B, D), view-major
        y = tf.tile(y, [v])
    z = tf.math.l2_normalize(f, axis=-1, epsilon=1e-12)
    return y, z


def _label_masks(y: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(same, positive, negative) boolean (N, N) masks: y_i == y_j; same and i != j; y_i != y_j."""
    same = tf.equal(y[:, None], y[None, :])
    not_self = tf.logical_not(tf.eye(tf.shape(y)[0], dtype=tf.bool))
    return same, tf.logical_and(same, not_self), tf.logical_not(same)


def _mean_or_zero(total: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    """total / count, and 0 where count == 0 (no valid anchor / pair / triplet in the batch)."""
    return tf.math.divide_no_nan(total, tf.cast(count, tf.float32))


# ------------------------------------------------------------------------------------------------
# Contrastive losses (functions)
# ------------------------------------------------------------------------------------------------

def supcon_loss(labels: Optional[ArrayLike], features: ArrayLike, temperature: float = 0.07,
                base_temperature: float = 0.07) -> tf.Tensor:
    r"""Supervised contrastive loss (SupCon, "L_out"), Khosla et al., NeurIPS 2020.

    With z_i the L2-normalised embeddings (all N = B*V views as anchors, contrast mode "all"),
    s_ia = z_i . z_a / tau, P(i) = {p != i : y_p = y_i} and A(i) = {a != i}:

        L = (tau / tau_base) * (1/N) * sum_i  -1/|P(i)| * sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ]

    An anchor with no positive (|P(i)| = 0) contributes 0 and still counts in the 1/N. The self-pair
    is excluded from both the positives and the denominator (compare ``npairs_loss``). The
    log-sum-exp subtracts the maximum over A(i) itself (not over all a, self included), so the loss
    stays finite even at tau = 0.01, where exp((s_ia - 1) / tau) would underflow to 0 in float32.
    Same definition as HobbitLong/SupContrast ``SupConLoss`` and the current keras-io example.

    Args:
        labels: integer class ids, shape (B,) or (B, 1). ``None`` gives SimCLR's NT-Xent (Chen et
            al. 2020): the only positives are the other views of the same sample (needs V >= 2).
        features: embeddings (B, D), or (B, V, D) for V augmented views of each sample; normalised
            here, so their scale does not matter.
        temperature: tau > 0 (the study used 0.05, the paper 0.07 or 0.1).
        base_temperature: tau_base > 0; the loss is scaled by tau / tau_base (paper code). Set it
            equal to ``temperature`` for the unscaled loss (keras-io example).
    Returns:
        float32 scalar tensor.
    Raises:
        LossError: non-positive temperature, bad shapes, or labels=None with a single view.
    """
    tau = _check_positive("temperature", temperature)
    tau_base = _check_positive("base_temperature", base_temperature)
    if labels is None:
        f_shape = tf.convert_to_tensor(features).shape
        if f_shape.rank != 3 or (f_shape[1] is not None and f_shape[1] < 2):
            raise LossError("labels=None: self-supervised SupCon needs features (B, V, D) with V >= 2 "
                            "views; pass labels for (B, D) features")
    y, z = _prepare_contrastive(labels, features, need_labels=False)
    _, positive, _ = _label_masks(y)
    n = tf.shape(z)[0]
    not_self = tf.logical_not(tf.eye(n, dtype=tf.bool))

    # Similarity logits s_ia = z_i . z_a / tau; the self-pair is removed from the denominator.
    logits = tf.matmul(z, z, transpose_b=True) / tau
    log_denominator = tf.reduce_logsumexp(tf.where(not_self, logits, _MASKED), axis=1, keepdims=True)
    log_prob = logits - log_denominator                       # log p(a | i) over a in A(i)

    # Average log-probability of the positives of each anchor (0 when it has none).
    n_pos = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
    sum_log_prob_pos = tf.reduce_sum(tf.where(positive, log_prob, 0.0), axis=1)
    mean_log_prob_pos = sum_log_prob_pos / tf.maximum(n_pos, 1.0)

    loss = -(tau / tau_base) * _mean_or_zero(tf.reduce_sum(mean_log_prob_pos), n)
    return tf.cast(loss, tf.float32)


def npairs_loss(labels: ArrayLike, features: ArrayLike, temperature: float = 0.05) -> tf.Tensor:
    r"""The study's "multi-class N-pairs" loss: tensorflow-addons ``npairs_loss`` on cosine logits.

    This is exactly what the study's notebooks computed (docs/study.md §4, following
    the 2020 keras-io "Supervised Contrastive Learning" example): z_i = L2-normalised features,
    logits s_ij = z_i . z_j / tau, target rows T_ij = 1[y_i = y_j] / sum_k 1[y_i = y_k] with the
    SELF-PAIR INCLUDED (j = i counts as a positive and stays in the softmax), and

        L = (1/N) * sum_i  -sum_j T_ij * log( exp(s_ij) / sum_k exp(s_ik) )
          = (1/N) * sum_i [ log sum_k exp(s_ik) - sum_j T_ij s_ij ].

    The name is historical: Sohn's N-pair loss (NeurIPS 2016) assumes one positive per anchor and
    adds an L2 penalty on the embeddings; tensorflow-addons generalised it to this soft-target
    cross-entropy, and the study used that. Versus ``supcon_loss`` (tau_base = tau) the only
    difference is the self-pair term s_ii = 1/tau, kept here in the positives and the denominator.
    Because s_ii = 1/tau is the largest logit, a fully collapsed embedding (all z equal) gives
    L = log N, not 0. tensorflow-addons is end-of-life; this is an independent implementation. With
    (B, V, D) features the views are stacked and labelled like their sample (tfa took (B, D) only).

    Args:
        labels: integer class ids, shape (B,) or (B, 1).
        features: embeddings (B, D) or (B, V, D); normalised here.
        temperature: tau > 0 (the study used 0.05).
    Returns:
        float32 scalar tensor.
    Raises:
        LossError: non-positive temperature or bad shapes.
    """
    tau = _check_positive("temperature", temperature)
    y, z = _prepare_contrastive(labels, features)
    same, _, _ = _label_masks(y)
    logits = tf.matmul(z, z, transpose_b=True) / tau
    # Row-normalised label matrix, self-pair included (so every row has at least one target).
    targets = tf.cast(same, tf.float32)
    targets = targets / tf.reduce_sum(targets, axis=1, keepdims=True)
    per_anchor = tf.reduce_logsumexp(logits, axis=1) - tf.reduce_sum(targets * logits, axis=1)
    return tf.cast(_mean_or_zero(tf.reduce_sum(per_anchor), tf.shape(z)[0]), tf.float32)


def _squared_distances(z: tf.Tensor) -> tf.Tensor:
    """Pairwise squared L2 distances of unit vectors: d_ij = |z_i - z_j|^2 = 2 - 2 z_i.z_j in [0, 4]."""
    d = 2.0 - 2.0 * tf.matmul(z, z, transpose_b=True)
    d = tf.maximum(d, 0.0)                                       # round-off can give -1e-7
    return tf.linalg.set_diag(d, tf.zeros(tf.shape(d)[0], d.dtype))


def _sorted_negative_distances(d: tf.Tensor, negative: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """Per anchor: its negatives' distances in ascending order, padded with _FAR; and their count."""
    sorted_neg = tf.sort(tf.where(negative, d, _FAR), axis=1)
    n_neg = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1)
    return sorted_neg, n_neg


def _triplet_batch_all(d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor,
                       margin: float) -> tf.Tensor:
    """Mean of max(d_ap - d_an + m, 0) over the triplets where it is > 0 (Hermans et al. "batch all").

    Computed in O(N^2 log N) memory-light form rather than as an (N, N, N) tensor: for a pair (a, p)
    with threshold t = d_ap + m, the k negatives with d_an < t contribute k * t - (sum of their
    d_an), read from the prefix sums of the anchor's sorted negative distances.
    """
    sorted_neg, _ = _sorted_negative_distances(d, negative)
    thresholds = d + margin                                            # t_ap = d_ap + m
    k = tf.searchsorted(sorted_neg, thresholds, side="left")           # #{n : d_an < t_ap}
    prefix = tf.pad(tf.cumsum(sorted_neg, axis=1), [[0, 0], [1, 0]])   # prefix[a, k] = sum of k smallest
    sum_k = tf.gather(prefix, k, batch_dims=1)
    pair_total = tf.cast(k, tf.float32) * thresholds - sum_k          # sum_n max(t_ap - d_an, 0)
    total = tf.reduce_sum(tf.where(positive, pair_total, 0.0))
    count = tf.reduce_sum(tf.where(positive, k, 0))                    # triplets with loss > 0
    return _mean_or_zero(total, count)


def _triplet_batch_hard(d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor,
                        margin: float) -> tf.Tensor:
    """Mean over anchors of max(max_p d_ap - min_n d_an + m, 0) (Hermans et al. "batch hard").

    Only anchors with at least one positive and one negative count.
    """
    hardest_pos = tf.reduce_max(tf.where(positive, d, 0.0), axis=1)
    hardest_neg = tf.reduce_min(tf.where(negative, d, _FAR), axis=1)
    valid = tf.logical_and(tf.reduce_any(positive, axis=1), tf.reduce_any(negative, axis=1))
    per_anchor = tf.maximum(hardest_pos - hardest_neg + margin, 0.0)
    total = tf.reduce_sum(tf.where(valid, per_anchor, 0.0))
    return _mean_or_zero(total, tf.reduce_sum(tf.cast(valid, tf.int32)))


def _triplet_semi_hard(d: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor,
                       margin: float) -> tf.Tensor:
    """Mean over positive pairs of max(d_ap - d_an* + m, 0), n* semi-hard (Schroff et al. 2015).

    n* is the closest negative farther than the positive (d_an > d_ap); if no negative is farther,
    n* is the farthest negative (the tensorflow-addons ``triplet_semihard_loss`` rule). Pairs whose
    anchor has no negative at all are skipped.
    """
    sorted_neg, n_neg = _sorted_negative_distances(d, negative)
    idx = tf.searchsorted(sorted_neg, d, side="right")                 # first negative with d_an > d_ap
    has_outside = idx < n_neg[:, None]
    farthest = tf.maximum(n_neg - 1, 0)[:, None] + tf.zeros_like(idx)
    chosen = tf.gather(sorted_neg, tf.where(has_outside, idx, farthest), batch_dims=1)
    per_pair = tf.maximum(d - chosen + margin, 0.0)
    valid = tf.logical_and(positive, (n_neg > 0)[:, None])
    total = tf.reduce_sum(tf.where(valid, per_pair, 0.0))
    return _mean_or_zero(total, tf.reduce_sum(tf.cast(valid, tf.int32)))


_MINERS: Dict[str, Callable] = {"batch_all": _triplet_batch_all, "batch_hard": _triplet_batch_hard,
                                "semi_hard": _triplet_semi_hard}


def _check_triplet_args(margin: float, mining: str) -> float:
    """Validate (margin, mining); return the margin as a float."""
    if mining not in _MINERS:
        raise LossError(f"mining={mining!r}: choose one of {', '.join(TRIPLET_MINING)}")
    try:
        m = float(margin)
    except (TypeError, ValueError):
        raise LossError(f"margin={margin!r}: must be a number >= 0 (e.g. margin=0.2)") from None
    if not math.isfinite(m) or m < 0.0:
        raise LossError(f"margin={margin!r}: must be a finite number >= 0 (e.g. margin=0.2)")
    return m


def triplet_loss(labels: ArrayLike, features: ArrayLike, margin: float = 0.2,
                 mining: str = "semi_hard") -> tf.Tensor:
    r"""Label-aware triplet loss with in-batch mining, on squared L2 distances of unit embeddings.

    d_ij = |z_i - z_j|^2 with z the L2-normalised features (so d in [0, 4]); a triplet (a, p, n) has
    y_p = y_a, p != a and y_n != y_a; its loss is  l(a, p, n) = max(d_ap - d_an + m, 0).

    mining:
      "semi_hard"   (Schroff, Kalenichenko, Philbin, CVPR 2015, FaceNet): for every positive pair
                    (a, p) take the closest negative with d_an > d_ap, or the farthest negative if
                    none is farther; average over the positive pairs (as tensorflow-addons
                    ``triplet_semihard_loss``, here on squared distances of normalised embeddings).
      "batch_hard"  (Hermans, Beyer, Leibe 2017, "In Defense of the Triplet Loss"): per anchor the
                    farthest positive and the closest negative; average over the anchors.
      "batch_all"   (Hermans et al. 2017): every valid triplet; average over the triplets with a
                    non-zero loss (0 if there are none).
    Anchors without a positive or without a negative are skipped; a batch with no valid triplet
    gives 0. A collapsed embedding (all z equal) gives exactly the margin m with every mining,
    which is the value the study's label-blind triplet loss got stuck at (0.2).

    Args:
        labels: integer class ids, shape (B,) or (B, 1).
        features: embeddings (B, D) or (B, V, D); normalised here.
        margin: m >= 0.
        mining: one of TRIPLET_MINING.
    Returns:
        float32 scalar tensor.
    Raises:
        LossError: negative margin, unknown mining, bad shapes.
    """
    m = _check_triplet_args(margin, mining)
    y, z = _prepare_contrastive(labels, features)
    _, positive, negative = _label_masks(y)
    return tf.cast(_MINERS[mining](_squared_distances(z), positive, negative, m), tf.float32)


CONTRASTIVE_LOSSES: Dict[str, Callable[..., tf.Tensor]] = {
    "npairs": npairs_loss, "supcon": supcon_loss, "triplet": triplet_loss}


# ------------------------------------------------------------------------------------------------
# Keras wrappers of the contrastive losses
# ------------------------------------------------------------------------------------------------

def _per_sample(value: tf.Tensor, y_true) -> tf.Tensor:
    """Repeat a batch-level scalar once per sample, shape (B,).

    Keras then averages it back to the same scalar, and, because the value is no longer a bare
    scalar, also divides it by the number of replicas under a tf.distribute strategy, as it does
    for every built-in loss (a bare scalar would skip that and give R-times gradients on R GPUs).
    """
    return tf.broadcast_to(value, tf.shape(tf.reshape(y_true, [-1])))


@keras.saving.register_keras_serializable(package="cervical")
class SupConLoss(keras.losses.Loss):
    """Keras form of ``supcon_loss``: ``loss(y_true=labels (B,)|(B,1), y_pred=features (B,[V,]D))``.

    The loss is one value for the whole batch: ``call`` repeats it once per sample so that Keras's
    mean and its per-replica scaling under tf.distribute work as for built-in losses. A
    ``sample_weight`` therefore only rescales it (by its mean); it does not weight samples. Under
    a multi-GPU strategy each replica contrasts its own sub-batch only (no cross-replica gather).

    Args:
        temperature: tau > 0.
        base_temperature: tau_base > 0.
        name, reduction, dtype: as keras.losses.Loss.
    """

    def __init__(self, temperature: float = 0.07, base_temperature: float = 0.07,
                 name: str = "supcon_loss", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.temperature = _check_positive("temperature", temperature)
        self.base_temperature = _check_positive("base_temperature", base_temperature)

    def call(self, y_true, y_pred):
        return _per_sample(supcon_loss(y_true, y_pred, self.temperature, self.base_temperature),
                           y_true)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature,
                "base_temperature": self.base_temperature}


@keras.saving.register_keras_serializable(package="cervical")
class NPairsLoss(keras.losses.Loss):
    """Keras form of ``npairs_loss`` (the study's loss): ``loss(labels, features)``.

    The loss is one value for the whole batch: ``call`` repeats it once per sample so that Keras's
    mean and its per-replica scaling under tf.distribute work as for built-in losses. A
    ``sample_weight`` therefore only rescales it (by its mean); it does not weight samples. Under
    a multi-GPU strategy each replica contrasts its own sub-batch only (no cross-replica gather).

    Args:
        temperature: tau > 0 (the study used 0.05).
        name, reduction, dtype: as keras.losses.Loss.
    """

    def __init__(self, temperature: float = 0.05, name: str = "npairs_loss", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.temperature = _check_positive("temperature", temperature)

    def call(self, y_true, y_pred):
        return _per_sample(npairs_loss(y_true, y_pred, self.temperature), y_true)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="cervical")
class TripletLoss(keras.losses.Loss):
    """Keras form of ``triplet_loss``: ``loss(labels, features)``.

    The loss is one value for the whole batch: ``call`` repeats it once per sample so that Keras's
    mean and its per-replica scaling under tf.distribute work as for built-in losses. A
    ``sample_weight`` therefore only rescales it (by its mean); it does not weight samples. Under
    a multi-GPU strategy each replica contrasts its own sub-batch only (no cross-replica gather).

    Args:
        margin: m >= 0.
        mining: one of TRIPLET_MINING.
        name, reduction, dtype: as keras.losses.Loss.
    """

    def __init__(self, margin: float = 0.2, mining: str = "semi_hard", name: str = "triplet_loss",
                 **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.margin = _check_triplet_args(margin, mining)
        self.mining = mining

    def call(self, y_true, y_pred):
        return _per_sample(triplet_loss(y_true, y_pred, self.margin, self.mining), y_true)

    def get_config(self) -> dict:
        return {**super().get_config(), "margin": self.margin, "mining": self.mining}


# ------------------------------------------------------------------------------------------------
# Cost-sensitive losses
# ------------------------------------------------------------------------------------------------

def _class_weight_vector(class_weights: Union[Mapping[int, float], Sequence[float], np.ndarray]
                         ) -> np.ndarray:
    """{class: weight} or a sequence of K weights -> float64 (K,); finite, >= 0, classes 0..K-1."""
    if isinstance(class_weights, Mapping):
        try:
            keys = sorted(int(k) for k in class_weights)
        except (TypeError, ValueError):
            raise LossError("class_weights: dict keys must be integer class ids 0..K-1") from None
        if keys != list(range(len(keys))):
            raise LossError(f"class_weights: keys {keys} must be exactly 0..K-1; give every class a "
                            f"weight")
        w = np.array([float(class_weights[k]) for k in sorted(class_weights, key=int)])
    else:
        try:
            w = np.asarray(class_weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise LossError("class_weights: must be a dict {class: weight} or a list of K "
                            "numbers") from None
    if w.ndim != 1 or w.size == 0:
        raise LossError(f"class_weights: shape {w.shape} must be (K,) with K >= 1")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise LossError("class_weights: every weight must be finite and >= 0")
    return w


def _cost_matrix(cost_matrix: Union[Sequence[Sequence[float]], np.ndarray]) -> np.ndarray:
    """Validate a (K, K) cost matrix: finite, >= 0. Returns float64 array."""
    try:
        c = np.asarray(cost_matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise LossError("cost_matrix: must be a K x K array of numbers") from None
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] == 0:
        raise LossError(f"cost_matrix: shape {c.shape} must be square (K, K), rows = true class, "
                        f"columns = predicted class")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise LossError("cost_matrix: every cost must be finite and >= 0")
    return c


def _targets_and_log_probs(y_true, y_pred, num_classes: int, from_logits: bool,
                           arg: str) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Return (targets (B, K) float32, probabilities (B, K), log-probabilities (B, K)).

    ``y_true`` is sparse (B,) / (B, 1) integer ids or dense (B, K) one-hot / soft labels. An
    out-of-range id raises LossError when running eagerly; inside a compiled graph its row becomes
    NaN, so the training loss shows NaN instead of silently ignoring the sample.
    """
    p = tf.cast(tf.convert_to_tensor(y_pred), tf.float32)
    if p.shape.rank != 2:
        raise LossError(f"{arg}: y_pred shape {tuple(p.shape)} must be (B, K) class scores")
    if p.shape[1] is not None and p.shape[1] != num_classes:
        raise LossError(f"{arg}: y_pred has {p.shape[1]} classes but the loss was built for "
                        f"{num_classes}; give one weight / cost row per class")
    if from_logits:
        log_p = tf.nn.log_softmax(p, axis=-1)
        probs = tf.exp(log_p)
    else:
        probs = p
        log_p = tf.math.log(tf.clip_by_value(p, PROB_EPSILON, 1.0))
    t = tf.convert_to_tensor(y_true)
    dense = t.shape.rank == 2 and t.shape[1] == num_classes and num_classes > 1
    if dense:
        return tf.cast(t, tf.float32), probs, log_p
    ids = tf.cast(tf.round(tf.cast(_flat_labels(t, "y_true"), tf.float32)), tf.int32)
    in_range = tf.logical_and(ids >= 0, ids < num_classes)
    if tf.executing_eagerly() and not bool(tf.reduce_all(in_range)):
        bad = ids.numpy()[~in_range.numpy()][0]
        raise LossError(f"y_true: class id {bad} outside 0..{num_classes - 1}; pass integer class "
                        f"ids matching the model's {num_classes} outputs")
    onehot = tf.one_hot(ids, num_classes, dtype=tf.float32)
    onehot = tf.where(in_range[:, None], onehot, float("nan"))
    return onehot, probs, log_p


@keras.saving.register_keras_serializable(package="cervical")
class WeightedCrossentropy(keras.losses.Loss):
    r"""Class-weighted cross-entropy, thesis Eq. 3.2 generalised to K classes.

        L = (1/N) * sum_i  -sum_k w_k * y_ik * log p_ik      (= (1/N) sum_i -w_{y_i} log p_{i, y_i})

    with y_ik the one-hot (or soft) target and p_ik the predicted probability, clipped to
    [1e-7, 1]. For K = 2, p = (1 - y_hat, y_hat), this is thesis Eq. 3.2,
    (1/N) sum_i -(w_0 y_i log y_hat_i + w_1 (1 - y_i) log(1 - y_hat_i)), where the thesis's w_0 weighs
    the positive class (our class 1) and w_1 the negative one (our class 0). The division is by the
    batch size N, not by sum_i w_{y_i}: the same value as Keras ``fit(class_weight=...)`` (the study's
    CS step) and not PyTorch's ``CrossEntropyLoss(weight=...)``. Cost-sensitive learning by class
    weights: e.g. Khan et al., IEEE TNNLS 2018 (thesis ref. [19]).

    Args:
        class_weights: {class id: w} for every class 0..K-1, or a sequence of K weights (>= 0),
            e.g. ``cervical.data.class_weights(train_labels)``.
        from_logits: True if y_pred are logits (softmax applied here).
        name, reduction, dtype: as keras.losses.Loss.
    Call:
        y_true: integer ids (B,) or (B, 1), or one-hot / soft labels (B, K).
        y_pred: probabilities (B, K) (or logits with from_logits=True).
        Returns the float32 scalar batch mean (per-sample values with reduction=None).
    """

    def __init__(self, class_weights, from_logits: bool = False,
                 name: str = "weighted_crossentropy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.class_weights = [float(v) for v in _class_weight_vector(class_weights)]
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        k = len(self.class_weights)
        targets, _, log_p = _targets_and_log_probs(y_true, y_pred, k, self.from_logits,
                                                   "weighted_crossentropy")
        w = tf.constant(self.class_weights, tf.float32)
        return -tf.reduce_sum(w * targets * log_p, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "class_weights": list(self.class_weights),
                "from_logits": self.from_logits}


@keras.saving.register_keras_serializable(package="cervical")
class CostMatrixLoss(keras.losses.Loss):
    r"""Expected misclassification cost (cost-sensitive learning with a cost matrix).

        L = (1/N) * sum_i  sum_j C[y_i, j] * p_ij   [ + lambda * (1/N) sum_i -log p_{i, y_i} ]

    C[t, j] is the cost of predicting class j when the truth is t (rows: true class, columns:
    predicted class). For a soft target y_i the first term is y_i^T C p_i. Minimising the
    expected cost under the predicted distribution gives the Bayes decision of Elkan, "The
    Foundations of Cost-Sensitive Learning", IJCAI 2001; as a training loss see Khan et al., IEEE
    TNNLS 2018 (thesis ref. [19]). With C = 1 - I this is 1 - p_{i, y_i}, the expected 0-1 loss.
    The clinical asymmetry of thesis section 3.2 (calling an abnormal cell normal costs more than the
    reverse) is a C with large C[abnormal, normal]; see ``clinical_cost_matrix``. The expected cost
    alone has small gradients once a sample is confidently wrong; ``crossentropy_weight`` = lambda
    > 0 adds plain cross-entropy to keep learning in that case.

    Args:
        cost_matrix: (K, K) non-negative costs, rows = true class, columns = predicted class.
        from_logits: True if y_pred are logits.
        crossentropy_weight: lambda >= 0 (default 0: the pure expected cost).
        name, reduction, dtype: as keras.losses.Loss.
    Call:
        y_true: integer ids (B,) or (B, 1), or one-hot / soft labels (B, K).
        y_pred: probabilities (B, K) (or logits with from_logits=True).
        Returns the float32 scalar batch mean.
    """

    def __init__(self, cost_matrix, from_logits: bool = False, crossentropy_weight: float = 0.0,
                 name: str = "cost_matrix_loss", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.cost_matrix = _cost_matrix(cost_matrix).tolist()
        self.from_logits = bool(from_logits)
        lam = float(crossentropy_weight)
        if not math.isfinite(lam) or lam < 0:
            raise LossError(f"crossentropy_weight={crossentropy_weight!r}: must be a finite "
                            f"number >= 0")
        self.crossentropy_weight = lam

    def call(self, y_true, y_pred):
        k = len(self.cost_matrix)
        targets, probs, log_p = _targets_and_log_probs(y_true, y_pred, k, self.from_logits,
                                                       "cost_matrix_loss")
        c = tf.constant(self.cost_matrix, tf.float32)
        expected_cost = tf.reduce_sum(tf.matmul(targets, c) * probs, axis=-1)
        if self.crossentropy_weight:
            expected_cost += self.crossentropy_weight * -tf.reduce_sum(targets * log_p, axis=-1)
        return expected_cost

    def get_config(self) -> dict:
        return {**super().get_config(), "cost_matrix": [list(r) for r in self.cost_matrix],
                "from_logits": self.from_logits, "crossentropy_weight": self.crossentropy_weight}


def weighted_crossentropy(class_weights, from_logits: bool = False) -> WeightedCrossentropy:
    """Class-weighted cross-entropy as a Keras loss ``(y_true, y_pred) -> scalar``.

    See ``WeightedCrossentropy`` for the equation (thesis Eq. 3.2 for K classes). ``y_true``: sparse
    integer ids (B,) / (B, 1) or one-hot (B, K); ``y_pred``: probabilities (B, K).

    Args:
        class_weights: {class id: weight} for classes 0..K-1, or a sequence of K weights.
        from_logits: True if y_pred are logits.
    Returns:
        A serializable ``keras.losses.Loss``.
    Raises:
        LossError: missing classes, negative or non-finite weights.
    """
    return WeightedCrossentropy(class_weights, from_logits=from_logits)


def cost_matrix_loss(cost_matrix, from_logits: bool = False,
                     crossentropy_weight: float = 0.0) -> CostMatrixLoss:
    """Expected misclassification cost sum_j C[y, j] p_j as a Keras loss ``(y_true, y_pred) -> scalar``.

    See ``CostMatrixLoss`` for the equation and references. ``y_true``: sparse integer ids (B,) /
    (B, 1) or one-hot (B, K); ``y_pred``: probabilities (B, K).

    Args:
        cost_matrix: (K, K) non-negative costs, rows = true class, columns = predicted class.
        from_logits: True if y_pred are logits.
        crossentropy_weight: weight of an added plain cross-entropy term (default 0).
    Returns:
        A serializable ``keras.losses.Loss``.
    Raises:
        LossError: not square, negative or non-finite costs.
    """
    return CostMatrixLoss(cost_matrix, from_logits=from_logits,
                          crossentropy_weight=crossentropy_weight)


def clinical_cost_matrix(class_names: Sequence[str], abnormal: Sequence[str],
                         miss_cost: float = 5.0, false_alarm_cost: float = 1.0,
                         confusion_cost: float = 1.0) -> np.ndarray:
    """Cost matrix for the clinical asymmetry of thesis section 3.2: missing an abnormal cell costs most.

        C[t, j] = 0                 if j == t
                  miss_cost         if t is abnormal and j is not (a false negative)
                  false_alarm_cost  if t is not abnormal and j is (a false positive)
                  confusion_cost    otherwise (a mix-up within the abnormal or the non-abnormal group)

    The default costs are illustrative, not from the thesis (it gives none); choose them with
    clinicians. On SIPaKMeD the abnormal classes are Dyskeratotic and Koilocytotic; Metaplastic is
    benign and Parabasal / Superficial-Intermediate are normal (in this package the one definition
    of which classes are abnormal is ``cervical.metrics.default_abnormal_classes``).

    Args:
        class_names: the K class names in label order.
        abnormal: names of the abnormal classes (each must be in class_names), e.g.
            ``["Dyskeratotic", "Koilocytotic"]`` for SIPaKMeD.
        miss_cost: cost of calling an abnormal cell non-abnormal.
        false_alarm_cost: cost of calling a non-abnormal cell abnormal.
        confusion_cost: cost of any other error.
    Returns:
        float64 (K, K) array, rows = true class, columns = predicted class.
    Raises:
        LossError: unknown abnormal class names, negative costs.
    """
    names = list(class_names)
    unknown = [a for a in abnormal if a not in names]
    if unknown:
        raise LossError(f"abnormal: {unknown} not among the class names {names}; pass names from "
                        f"the dataset's class list")
    for arg, v in (("miss_cost", miss_cost), ("false_alarm_cost", false_alarm_cost),
                   ("confusion_cost", confusion_cost)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise LossError(f"{arg}={v!r}: must be a finite number >= 0")
    is_abn = np.array([n in set(abnormal) for n in names])
    c = np.full((len(names), len(names)), float(confusion_cost))
    c[np.ix_(is_abn, ~is_abn)] = float(miss_cost)
    c[np.ix_(~is_abn, is_abn)] = float(false_alarm_cost)
    np.fill_diagonal(c, 0.0)
    return c


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------

_FACTORY: Dict[str, Callable[..., keras.losses.Loss]] = {
    "supcon": SupConLoss, "npairs": NPairsLoss, "triplet": TripletLoss,
    "weighted_crossentropy": WeightedCrossentropy, "cost_matrix": CostMatrixLoss}
LOSS_NAMES = tuple(_FACTORY)


def make_loss(name: str, **kwargs) -> keras.losses.Loss:
    """Build a Keras loss by name, for ``model.compile(loss=make_loss(...))``.

    Args:
        name: one of LOSS_NAMES: "supcon", "npairs", "triplet" (y_true = labels, y_pred = embeddings),
            "weighted_crossentropy", "cost_matrix" (y_true = labels, y_pred = probabilities).
        **kwargs: the loss's own arguments, e.g. temperature=0.05, mining="batch_hard",
            class_weights={0: 1.0, 1: 2.0}, cost_matrix=[[0, 5], [1, 0]].
    Returns:
        A serializable keras.losses.Loss; calling it as ``loss(y_true, y_pred)`` gives a scalar.
    Raises:
        LossError: unknown name, or bad / unknown arguments for that loss.
    """
    if name not in _FACTORY:
        raise LossError(f"loss {name!r}: unknown; choose one of {', '.join(LOSS_NAMES)}")
    try:
        return _FACTORY[name](**kwargs)
    except TypeError as exc:
        raise LossError(f"loss {name!r}: bad arguments {sorted(kwargs)} ({exc})") from None
