"""Training: a prepared dataset -> a run folder (fine-tune, cost-sensitive, contrastive, baseline).

Thesis sections 3.1-3.3 and 5.3; the study's real settings are in study_code_findings.md sections 3-4.
``train(TrainConfig(...))`` is what ``python cli.py train`` calls.

Regimes
    finetune        Adam, categorical cross-entropy; the study's defaults: lr 1e-3, batch 32, 50
                    epochs, early stopping patience 3 on val_loss, LR x0.2 after 2 epochs without
                    val_loss improvement (min 1e-5). Unlike the study (which kept the last epoch),
                    the best validation epoch's weights are restored and saved.
    cost-sensitive  the same with class weights w_c = n / (K n_c) of the TRAIN labels (the study used
                    its test labels: ``class_weights="thesis"`` reproduces its constants), or the
                    expected-cost loss sum_j C[y, j] p_j of a cost matrix (``cost_matrix``).
                    ``init=RUN`` continues from a fine-tuned run, as the study did.
    contrastive     phase 1: encoder + projection Dense(128) trained with a supervised contrastive loss
                    (npairs = the study's, supcon, triplet; lr 1e-4, batch 32, temperature 0.05) on two
                    augmented views of each image; phase 2: encoder frozen, Dropout .5 - Dense 512 relu -
                    Dropout .5 - Dense K trained with cross-entropy, selected on validation.
    baseline        the same classifier trained end to end with cross-entropy (the study's comparison).

The test split is never loaded here: every choice (early stopping, LR schedule, best epoch) uses the
validation split.

Run folder: config.json, model.keras, history.csv, contrastive_history.csv,
class_weights.json, cost_matrix.json, summary.json, train.log, loss/accuracy PNGs, checkpoints/
(one per epoch, for ``resume``), tensorboard/ (``tensorboard=True``).

``model.keras`` loads with ``keras.models.load_model(path)`` after ``import cervical.models`` (which
registers the in-model preprocessing layer); it holds no optimizer and no compiled loss.

Reproducibility: the seed fixes the initial weights (``keras.utils.set_random_seed``), the order of
every epoch (a stateless permutation keyed on (seed, epoch)) and every augmentation (stateless ops
keyed on (seed, epoch, step)); TensorFlow's deterministic ops are switched on for the duration of the
run. So two CPU runs with the same seed give the same history, and a resumed run gives the history
of an uninterrupted one (weights, optimizer moments, RNG states and callback states are restored).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import data as cdata
from cervical import models

__all__ = ["TrainError", "TrainConfig", "REGIMES", "CONTRASTIVE_LOSS_NAMES", "STRATEGIES",
           "MONITORS", "train", "format_summary", "make_train_dataset", "make_eval_dataset",
           "augment_images", "channel_statistics", "load_class_weights", "load_cost_matrix",
           "make_strategy", "default_weights"]

REGIMES = ("finetune", "cost-sensitive", "contrastive", "baseline")
CONTRASTIVE_LOSS_NAMES = ("npairs", "supcon", "triplet")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
MONITORS = ("val_loss", "val_accuracy")
TRIPLET_MINING = ("semi_hard", "batch_hard", "batch_all")
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
CONTRASTIVE_COLUMNS = ("epoch", "loss")
PLATEAU_MIN_DELTA = 1e-4     # keras ReduceLROnPlateau's default min_delta (the study's callback)
PRECISE_BN_IMAGES = 1024     # training images behind each BatchNorm re-estimate (PreciseBatchNorm)

# Fields that define a run: a resumed run must agree with the saved config on all of them.
_RUN_FIELDS = ("data", "model", "regime", "variant", "weights", "freeze", "epochs", "batch_size",
               "lr", "patience", "lr_patience", "lr_factor", "min_lr", "monitor", "class_weights",
               "cost_matrix", "init", "loss", "temperature", "margin", "mining",
               "contrastive_epochs", "contrastive_lr", "projection_dim", "online_augment", "precise_bn",
               "seed",
               "deterministic", "mixed_precision")


class TrainError(ValueError):
    """Bad training argument or a failed run; the message is one line naming the cause and the fix."""


@dataclasses.dataclass
class TrainConfig:
    """Every argument of a training run (saved to RUN/config.json).

    Args:
        data: prepared dataset folder (``cli.py prepare``).
        out: run folder to write.
        model: one of models.MODEL_NAMES; None with ``init`` takes the init run's model.
        regime: one of REGIMES.
        variant: "standard" or "thesis" (models module docstring).
        weights: "imagenet", "none" or a weights file; None = ``default_weights(...)``.
        freeze: "auto" (the study's freeze points when the weights are pretrained), "study", "none".
        epochs: maximum classifier epochs (phase 2 in the contrastive regime).
        batch_size: images per replica per step (global batch = batch_size x replicas).
        lr: classifier learning rate; None = 1e-3 (finetune, cost-sensitive) or 1e-4 (contrastive,
            baseline), the study's values.
        patience: early stopping patience on ``monitor`` (0 disables).
        lr_patience, lr_factor, min_lr: LR-on-plateau schedule on ``monitor`` (lr_patience 0 disables).
        monitor: validation quantity for early stopping, LR schedule and best-epoch selection.
        class_weights: cost-sensitive only: "train" (default), "thesis", "none" or a JSON file
            {class id or name: weight}.
        cost_matrix: cost-sensitive only: a (K, K) JSON or CSV file (rows true, columns predicted).
        init: a run folder whose model.keras initialises the classifier (finetune, cost-sensitive).
        loss: contrastive loss (default "supcon"; "npairs" is the study's).
        temperature: contrastive temperature (npairs, supcon).
        margin, mining: triplet loss settings.
        contrastive_epochs, contrastive_lr: phase-1 epochs and learning rate (study: 50, 1e-4).
        projection_dim: projection head width (study: 128).
        online_augment: random flips/transposes, crops and brightness/contrast per batch.
        precise_bn: training images over which BatchNorm statistics are re-estimated with the
            current weights before every validation (``PreciseBatchNorm``); 0 keeps Keras' moving
            averages (the study's behaviour). None = 1024, or 0 with ``variant="thesis"``.
        seed: seed of initial weights, epoch order and augmentation.
        deterministic: switch on TensorFlow's deterministic ops for the run.
        strategy: one of STRATEGIES (tf.distribute).
        mixed_precision: float16 (GPU) or bfloat16 (CPU) compute with float32 variables.
        resume: continue the interrupted run in ``out`` from its last completed epoch.
        overwrite: replace a non-empty ``out`` (otherwise refused).
        tensorboard: write TensorBoard logs to RUN/tensorboard.
        verbose: 0 silent, 1 Keras progress bar, 2 one line per epoch.
    """

    data: str
    out: str
    model: Optional[str] = None
    regime: str = "finetune"
    variant: str = "standard"
    weights: Optional[str] = None
    freeze: str = "auto"
    epochs: int = 50
    batch_size: int = 32
    lr: Optional[float] = None
    patience: int = 3
    lr_patience: int = 2
    lr_factor: float = 0.2
    min_lr: float = 1e-5
    monitor: str = "val_loss"
    class_weights: Optional[str] = None
    cost_matrix: Optional[str] = None
    init: Optional[str] = None
    loss: Optional[str] = None
    temperature: float = 0.05
    margin: float = 0.2
    mining: str = "semi_hard"
    contrastive_epochs: int = 50
    contrastive_lr: float = 1e-4
    projection_dim: int = 128
    online_augment: bool = False
    precise_bn: Optional[int] = None
    seed: int = 42
    deterministic: bool = True
    strategy: str = "auto"
    mixed_precision: bool = False
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = False
    verbose: int = 0


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def default_weights(model: str, regime: str, variant: str) -> str:
    """The weights a run uses when none are given.

    "none" for tiny and for the thesis variant of the contrastive and baseline regimes (the study
    trained those encoders from scratch, study_code_findings.md section 4); "imagenet" otherwise.
    """
    if model == "tiny" or (variant == "thesis" and regime in ("contrastive", "baseline")):
        return "none"
    return "imagenet"


def _check_number(name: str, value, low: float, integer: bool = False, allow_low: bool = True):
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise TrainError(f"--{name} {value!r}: must be a number") from None
    if integer and float(value) != v:
        raise TrainError(f"--{name} {value!r}: must be an integer")
    if not math.isfinite(v) or v < low or (not allow_low and v == low):
        raise TrainError(f"--{name} {value}: must be {'>=' if allow_low else '>'} {low}")
    return v


def _validate(cfg: TrainConfig) -> TrainConfig:
    """Check choices and numbers; fill the regime-dependent defaults. Returns a new config."""
    c = dataclasses.replace(cfg)
    if c.regime not in REGIMES:
        raise TrainError(f"--regime {c.regime!r}: unknown; choose one of {', '.join(REGIMES)}")
    if c.model is None and not c.init:
        raise TrainError("--model: required (one of " + ", ".join(models.MODEL_NAMES) + ")")
    if c.model is not None and c.model not in models.MODEL_NAMES:
        raise TrainError(f"--model {c.model!r}: unknown; choose one of "
                         f"{', '.join(models.MODEL_NAMES)}")
    if c.variant not in models.VARIANTS:
        raise TrainError(f"--variant {c.variant!r}: unknown; choose one of "
                         f"{', '.join(models.VARIANTS)}")
    if c.freeze not in ("auto", "study", "none"):
        raise TrainError(f"--freeze {c.freeze!r}: choose auto, study or none")
    if c.monitor not in MONITORS:
        raise TrainError(f"--monitor {c.monitor!r}: choose one of {', '.join(MONITORS)}")
    if c.strategy not in STRATEGIES:
        raise TrainError(f"--strategy {c.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if c.mining not in TRIPLET_MINING:
        raise TrainError(f"--mining {c.mining!r}: choose one of {', '.join(TRIPLET_MINING)}")
    c.epochs = _check_number("epochs", c.epochs, 1, integer=True)
    c.batch_size = _check_number("batch-size", c.batch_size, 1, integer=True)
    c.patience = _check_number("patience", c.patience, 0, integer=True)
    c.lr_patience = _check_number("lr-patience", c.lr_patience, 0, integer=True)
    c.contrastive_epochs = _check_number("contrastive-epochs", c.contrastive_epochs, 1, integer=True)
    c.projection_dim = _check_number("projection-dim", c.projection_dim, 1, integer=True)
    c.seed = _check_number("seed", c.seed, 0, integer=True)
    c.lr_factor = _check_number("lr-factor", c.lr_factor, 0.0, allow_low=False)
    if c.lr_factor >= 1:
        raise TrainError(f"--lr-factor {c.lr_factor}: must be < 1 (the study used 0.2)")
    c.min_lr = _check_number("min-lr", c.min_lr, 0.0)
    c.temperature = _check_number("temperature", c.temperature, 0.0, allow_low=False)
    c.margin = _check_number("margin", c.margin, 0.0)
    c.contrastive_lr = _check_number("contrastive-lr", c.contrastive_lr, 0.0, allow_low=False)
    if c.lr is None:
        c.lr = 1e-3 if c.regime in ("finetune", "cost-sensitive") else 1e-4
    c.lr = _check_number("lr", c.lr, 0.0, allow_low=False)
    c.verbose = int(c.verbose)
    if c.precise_bn is None:
        c.precise_bn = 0 if c.variant == "thesis" else PRECISE_BN_IMAGES
    c.precise_bn = _check_number("precise-bn", c.precise_bn, 0, integer=True)
    if c.regime == "contrastive":
        c.loss = c.loss or "supcon"
        if c.loss not in CONTRASTIVE_LOSS_NAMES:
            raise TrainError(f"--loss {c.loss!r}: unknown; choose one of "
                             f"{', '.join(CONTRASTIVE_LOSS_NAMES)}")
    elif c.loss is not None:
        raise TrainError(f"--loss {c.loss}: only for --regime contrastive; drop --loss")
    if c.regime != "cost-sensitive":
        for flag, value in (("class-weights", c.class_weights), ("cost-matrix", c.cost_matrix)):
            if value is not None:
                raise TrainError(f"--{flag}: only for --regime cost-sensitive; drop it or add "
                                 f"--regime cost-sensitive")
    elif c.class_weights is None:
        c.class_weights = "none" if c.cost_matrix else "train"
    if c.init and c.regime not in ("finetune", "cost-sensitive"):
        raise TrainError("--init: only for --regime finetune or cost-sensitive (continue a run)")
    if c.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TrainError("--tensorboard: the tensorboard package is not installed; "
                             "'pip install tensorboard' or drop --tensorboard")
    c.data = str(Path(c.data).expanduser().resolve())
    c.out = str(Path(c.out).expanduser().absolute())
    if c.init:
        c.init = str(Path(c.init).expanduser().resolve())
    if c.cost_matrix:
        c.cost_matrix = str(Path(c.cost_matrix).expanduser().resolve())
    if c.class_weights not in (None, "train", "thesis", "none"):
        c.class_weights = str(Path(c.class_weights).expanduser().resolve())
    return c


# ------------------------------------------------------------------------------------------------
# Class weights and cost matrices
# ------------------------------------------------------------------------------------------------

def load_class_weights(spec: str, train_labels: np.ndarray, class_names: Sequence[str]
                       ) -> Tuple[Optional[Dict[int, float]], str]:
    """Resolve ``--class-weights``.

    Args:
        spec: "train" (balanced weights n / (K n_c) of the training labels, thesis Eq. 3.2's weights
            done right), "thesis" (the study's constants, from its test labels), "none", or a JSON
            file {class id or class name: weight}.
        train_labels: labels of the training split.
        class_names: the K class names.
    Returns:
        ({class id: weight} or None, description of the source).
    Raises:
        TrainError: thesis weights with K != 5, unreadable file, missing/unknown classes, weights
            that are negative or not finite.
    """
    k = len(class_names)
    if spec == "none":
        return None, "none"
    if spec == "train":
        return cdata.class_weights(train_labels, num_classes=k), "train labels: n / (K * n_c)"
    if spec == "thesis":
        if k != len(cdata.THESIS_CLASS_WEIGHTS):
            raise TrainError(f"--class-weights thesis: the study's weights are for its 5 classes, "
                             f"this dataset has {k}; use --class-weights train")
        return dict(cdata.THESIS_CLASS_WEIGHTS), "thesis constants (the study's test-label weights)"
    path = Path(spec)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"--class-weights {spec}: cannot read a JSON object ({type(exc).__name__}); "
                         f"pass train, thesis, none or a JSON file {{class: weight}}") from None
    if not isinstance(raw, dict):
        raise TrainError(f"--class-weights {spec}: must be a JSON object {{class: weight}}")
    weights: Dict[int, float] = {}
    for key, value in raw.items():
        cid = class_names.index(key) if key in class_names else (
            int(key) if str(key).isdigit() and int(key) < k else None)
        if cid is None:
            raise TrainError(f"--class-weights {spec}: unknown class {key!r}; use ids 0..{k - 1} "
                             f"or names {list(class_names)}")
        try:
            w = float(value)
        except (TypeError, ValueError):
            w = float("nan")
        if not math.isfinite(w) or w < 0:
            raise TrainError(f"--class-weights {spec}: weight of {key!r} must be a number >= 0")
        weights[cid] = w
    missing = [class_names[i] for i in range(k) if i not in weights]
    if missing:
        raise TrainError(f"--class-weights {spec}: no weight for {missing}; give every class")
    return weights, f"file {path}"


def load_cost_matrix(path: str, class_names: Sequence[str]) -> np.ndarray:
    """Read a (K, K) cost matrix (rows: true class, columns: predicted class).

    Accepted files: JSON (a list of K lists, or {"matrix": [[...]]}), or CSV of numbers with an
    optional header row and an optional first column of class names.

    Raises:
        TrainError: unreadable, not K x K, negative or non-finite entries.
    """
    k = len(class_names)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TrainError(f"--cost-matrix {path}: cannot read ({exc.strerror or exc})") from None
    rows: List[List[float]]
    try:
        if p.suffix.lower() == ".json":
            obj = json.loads(text)
            obj = obj.get("matrix") if isinstance(obj, dict) else obj
            rows = [[float(v) for v in r] for r in obj]
        else:
            rows = []
            for r in csv.reader(io.StringIO(text)):
                cells = [c.strip() for c in r if c.strip() != ""]
                if not cells:
                    continue
                try:
                    rows.append([float(v) for v in cells])
                except ValueError:
                    try:
                        rows.append([float(v) for v in cells[1:]])   # a leading class-name column
                    except ValueError:
                        continue                                     # a header row
    except (ValueError, TypeError, json.JSONDecodeError):
        raise TrainError(f"--cost-matrix {path}: not a matrix of numbers; write {k} rows of {k} "
                         f"costs (JSON list of lists or CSV)") from None
    c = np.asarray(rows, dtype=np.float64) if rows and len({len(r) for r in rows}) == 1 else None
    if c is None or c.shape != (k, k):
        shape = "ragged" if c is None else f"{c.shape[0]}x{c.shape[1] if c.ndim > 1 else 1}"
        raise TrainError(f"--cost-matrix {path}: is {shape}, the data has {k} classes; write a "
                         f"{k}x{k} matrix (rows true class, columns predicted)")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise TrainError(f"--cost-matrix {path}: costs must be finite and >= 0")
    return c


# ------------------------------------------------------------------------------------------------
# Input pipeline (tf.data)
# ------------------------------------------------------------------------------------------------

def augment_images(x, seed, strength: str = "light"):
    """Random per-image augmentation of a float batch (B, H, W, 3) in 0..255, stateless.

    Each image independently gets: a horizontal and a vertical flip (p = 0.5 each), a transpose
    (square images, p = 0.5; with the flips this reaches all 8 rotations/reflections, which leave a
    cell's class unchanged), a random resized crop (area fraction s ~ U(s_min, 1), aspect ratio
    r ~ U(3/4, 4/3), bilinear back to H x W) and brightness/contrast jitter
    x' = (x - m) * c + m + 255 * b, with m the image mean, c ~ U(1 - a, 1 + a), b ~ U(-d, d).

        strength "light"  (online augmentation):       s_min 0.8, a 0.1, d 0.05
        strength "strong" (contrastive views):         s_min 0.5, a 0.3, d 0.1

    The same (x, seed) always gives the same output (``tf.random.stateless_*`` ops).

    Args:
        x: float32 tensor (B, H, W, 3), raw 0..255.
        seed: int tensor of shape (2,).
        strength: "light" or "strong".
    Returns:
        float32 tensor (B, H, W, 3) clipped to 0..255.
    """
    import tensorflow as tf

    s_min, a, d = {"light": (0.8, 0.1, 0.05), "strong": (0.5, 0.3, 0.1)}[strength]
    b = tf.shape(x)[0]
    h, w = int(x.shape[1]), int(x.shape[2])

    def uniform(k, shape, low=0.0, high=1.0):
        return tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, k),
                                           minval=low, maxval=high)

    def where(cond, yes, no):
        return tf.where(cond[:, None, None, None], yes, no)

    x = where(uniform(1, [b]) < 0.5, tf.reverse(x, [2]), x)
    x = where(uniform(2, [b]) < 0.5, tf.reverse(x, [1]), x)
    if h == w:
        x = where(uniform(3, [b]) < 0.5, tf.transpose(x, [0, 2, 1, 3]), x)
    # Random resized crop: box height/width (fractions of the image) from area s and aspect r.
    area = uniform(4, [b], s_min, 1.0)
    ratio = tf.exp(uniform(5, [b], math.log(3 / 4), math.log(4 / 3)))
    bh = tf.minimum(tf.sqrt(area / ratio), 1.0)
    bw = tf.minimum(tf.sqrt(area * ratio), 1.0)
    y0 = uniform(6, [b]) * (1.0 - bh)
    x0 = uniform(7, [b]) * (1.0 - bw)
    boxes = tf.stack([y0, x0, y0 + bh, x0 + bw], axis=1)
    x = tf.image.crop_and_resize(x, boxes, tf.range(b), [h, w], method="bilinear")
    # Brightness / contrast around each image's mean.
    mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
    contrast = uniform(8, [b], 1.0 - a, 1.0 + a)[:, None, None, None]
    bright = 255.0 * uniform(9, [b], -d, d)[:, None, None, None]
    return tf.clip_by_value((x - mean) * contrast + mean + bright, 0.0, 255.0)


def make_train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                       epochs: Tuple[int, int], num_classes: Optional[int] = None,
                       augment: Optional[str] = None, views: int = 1,
                       class_weight: Optional[Dict[int, float]] = None):
    """Training batches for epochs [start, stop), reshuffled every epoch, from in-memory arrays.

    Epoch e visits the images in the order argsort(u), u ~ stateless_uniform(seed = (seed, e)), in
    batches of ``batch_size`` (the last one smaller), so the order depends only on (seed, e): a
    resumed run sees exactly the batches an uninterrupted one would. Images are gathered from a
    tensor kept on the CPU, cast to float32 (raw 0..255, the model preprocesses), optionally
    augmented (``augment_images`` seeded on (seed, e, step)) and prefetched.

    Args:
        x: uint8 (N, H, W, 3).
        y: int (N,).
        batch_size: global batch size.
        seed: run seed.
        epochs: (start, stop) epoch indices (0-based); the dataset holds
            (stop - start) * ceil(N / batch_size) batches.
        num_classes: if given, targets are one-hot float32 (B, K); else int32 labels (B,).
        augment: None, "light" or "strong".
        views: 1, or 2 for contrastive training: each image appears twice (two independent
            augmentations), interleaved [a0, b0, a1, b1, ...] so a batch split across replicas keeps
            pairs together; labels are repeated the same way (the batch holds 2B images).
        class_weight: {class id: w}: adds per-sample weights w[y] (Keras sample_weight), the study's
            ``fit(class_weight=...)``.
    Returns:
        tf.data.Dataset of (images, targets) or (images, targets, sample_weights).
    """
    import tensorflow as tf

    n = int(len(y))
    with tf.device("/cpu:0"):
        xs = tf.constant(x)
        ys = tf.constant(np.asarray(y, np.int32))
        ws = None if class_weight is None else tf.constant(
            [float(class_weight.get(i, 0.0)) for i in range(max(class_weight) + 1)], tf.float32)
    base = tf.constant(int(seed), tf.int64)

    def load(epoch, step, idx):
        images = tf.cast(tf.gather(xs, idx), tf.float32)
        labels = tf.gather(ys, idx)
        key = tf.stack([base, epoch * 1_000_003 + step])
        if views == 2:
            a = augment_images(images, tf.random.experimental.stateless_fold_in(key, 1), "strong")
            b = augment_images(images, tf.random.experimental.stateless_fold_in(key, 2), "strong")
            images = tf.reshape(tf.stack([a, b], axis=1), [-1] + list(x.shape[1:]))
            labels = tf.repeat(labels, 2)
        elif augment:
            images = augment_images(images, key, augment)
        targets = labels if num_classes is None else tf.one_hot(labels, num_classes)
        if ws is None:
            return images, targets
        return images, targets, tf.gather(ws, labels)

    def one_epoch(epoch):
        order = tf.argsort(tf.random.stateless_uniform(
            [n], tf.stack([base, epoch]), dtype=tf.float32), stable=True)
        batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
        return batches.map(lambda step, idx: load(epoch, step, idx),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    ds = tf.data.Dataset.range(int(epochs[0]), int(epochs[1])).flat_map(one_epoch)
    return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int,
                      num_classes: Optional[int] = None):
    """Validation batches in file order: (float32 images 0..255, one-hot or int targets)."""
    import tensorflow as tf

    with tf.device("/cpu:0"):
        ds = tf.data.Dataset.from_tensor_slices((x, np.asarray(y, np.int32)))

    def cast(images, labels):
        images = tf.cast(images, tf.float32)
        return images, (labels if num_classes is None else tf.one_hot(labels, num_classes))

    return _with_options(ds.batch(batch_size).map(cast, num_parallel_calls=tf.data.AUTOTUNE)
                         .prefetch(tf.data.AUTOTUNE))


def _with_options(ds):
    import tensorflow as tf

    opts = tf.data.Options()
    opts.deterministic = True
    # Index-based pipelines have no files to shard: multi-worker training shards by data.
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(opts)


def channel_statistics(x: np.ndarray, chunk: int = 512) -> Tuple[List[float], List[float]]:
    """Per-channel mean and standard deviation of uint8 images (N, H, W, 3), in float64 chunks.

    What the study's contrastive encoders' ``Normalization().adapt(x_train)`` computed:
    mean_c = (1/M) sum x_c, std_c = sqrt((1/M) sum x_c^2 - mean_c^2), M = N H W.
    """
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].reshape(-1, 3).astype(np.float64)
        total += part.sum(0)
        total_sq += (part ** 2).sum(0)
    m = float(np.prod(x.shape[:3]))
    mean = total / m
    std = np.sqrt(np.maximum(total_sq / m - mean ** 2, 0.0))
    return mean.tolist(), std.tolist()


# ------------------------------------------------------------------------------------------------
# Devices: strategy, mixed precision, determinism
# ------------------------------------------------------------------------------------------------

def make_strategy(name: str):
    """tf.distribute strategy for ``--strategy``.

    "default": one device; "mirrored": all local GPUs (or, without GPUs, all logical CPU devices);
    "multiworker": MultiWorkerMirroredStrategy across the hosts in TF_CONFIG; "auto": mirrored when
    more than one GPU is visible, else default.
    """
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.MultiWorkerMirroredStrategy()


class _Session:
    """Seeds, deterministic ops and the mixed-precision policy for one run; restored on exit."""

    def __init__(self, seed: int, deterministic: bool, mixed_precision: bool) -> None:
        self.seed, self.deterministic, self.mixed = seed, deterministic, mixed_precision
        self.policy_name = None

    def __enter__(self):
        import keras
        import tensorflow as tf
        from tensorflow.python.framework import config as tf_config   # enable/disable pair

        self._tf_config = tf_config
        self._was_deterministic = tf_config.is_op_determinism_enabled()
        if self.deterministic:
            tf_config.enable_op_determinism()
        keras.utils.set_random_seed(self.seed)
        self._old_policy = keras.mixed_precision.global_policy().name
        if self.mixed:
            self.policy_name = ("mixed_float16" if tf.config.list_logical_devices("GPU")
                                else "mixed_bfloat16")
            keras.mixed_precision.set_global_policy(self.policy_name)
        return self

    def __exit__(self, *exc):
        import keras

        keras.mixed_precision.set_global_policy(self._old_policy)
        if self.deterministic and not self._was_deterministic:
            self._tf_config.disable_op_determinism()
        return False


# ------------------------------------------------------------------------------------------------
# Run folder helpers
# ------------------------------------------------------------------------------------------------

def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(v)) if isinstance(v, float) else v) for k, v in r.items()})
    _atomic_text(path, buf.getvalue())


def _git_commit() -> Optional[str]:
    """HEAD commit of the repository holding this package, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def _prepare_run_folder(cfg: TrainConfig) -> Tuple[Path, Optional[dict]]:
    """Create (or reopen with ``resume``) the run folder; return (folder, saved config or None)."""
    out = Path(cfg.out)
    if cfg.resume:
        f = out / "config.json"
        if not f.is_file():
            raise TrainError(f"--resume: {out} holds no run (no config.json); drop --resume to "
                             f"start one")
        saved = json.loads(f.read_text())
        for field in _RUN_FIELDS:
            if field == "model" and cfg.model is None:
                continue
            if saved.get(field) != getattr(cfg, field):
                raise TrainError(f"--resume: {out} was started with --{field.replace('_', '-')} "
                                 f"{saved.get(field)}, not {getattr(cfg, field)}; repeat the "
                                 f"original flags or start a new --out")
        if (out / "model.keras").is_file() and (out / "summary.json").is_file():
            raise TrainError(f"--resume: the run in {out} is already complete; start a new --out")
        return out, saved
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not cfg.overwrite:
            raise TrainError(f"--out {out}: exists and is not empty; choose a new folder, add "
                             f"--resume to continue it or --overwrite to replace it")
        if out.is_dir() and not (out / "config.json").is_file():
            raise TrainError(f"--out {out}: not a run folder; --overwrite only replaces run folders")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TrainError(f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__}); "
                         f"choose a writable folder") from None
    if cfg.overwrite:
        import shutil

        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return out, None


class _Log:
    """Appends timestamped lines to RUN/train.log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, line: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# ------------------------------------------------------------------------------------------------
# Callbacks: control (early stopping, plateau, best, NaN) and per-epoch checkpoints
# ------------------------------------------------------------------------------------------------

def _make_callbacks():
    import keras

    class Control(keras.callbacks.Callback):
        """Early stopping, LR-on-plateau, best-epoch tracking and a NaN guard, with saveable state.

        The rules are keras' EarlyStopping (min_delta 0) and ReduceLROnPlateau (min_delta 1e-4,
        cooldown 0), the study's callbacks, written out so that their state can be checkpointed:

          improved_es  = v < best       (val_accuracy: v > best);  es_wait = 0 if improved else +1;
                         stop when es_wait >= patience (patience 0: never)
          improved_lr  = v < lr_best - 1e-4;  lr_wait = 0 if improved else +1; when lr_wait >=
                         lr_patience and lr > min_lr: lr = max(lr * factor, min_lr), lr_wait = 0
          best epoch   = the first epoch with the best v (its weights are restored at the end).
        """

        def __init__(self, monitor: Optional[str], patience: int, lr_patience: int,
                     lr_factor: float, min_lr: float) -> None:
            super().__init__()
            self.monitor, self.patience, self.lr_patience = monitor, patience, lr_patience
            self.lr_factor, self.min_lr = lr_factor, min_lr
            self.sign = -1.0 if monitor == "val_accuracy" else 1.0   # minimise sign * v
            self.state = {"best": None, "best_epoch": None, "es_wait": 0, "lr_best": None,
                          "lr_wait": 0, "stopped_epoch": None}
            self.nan: Optional[str] = None
            self.epoch = 0
            self.improved = False

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self.improved = False

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            lr = float(np.asarray(self.model.optimizer.learning_rate))
            logs["lr"] = float(f"{lr:.7g}")       # the float32 value, without float64 noise
            bad = [k for k in ("loss", self.monitor) if k and k in logs
                   and not math.isfinite(float(logs[k]))]
            if self.nan is None and bad:
                self.nan = f"epoch {epoch + 1} ({bad[0]} = {logs[bad[0]]})"
            if self.nan is not None:
                self.model.stop_training = True
                return
            if self.monitor is None:
                return
            v = self.sign * float(logs[self.monitor])
            s = self.state
            if s["best"] is None or v < s["best"]:
                s["best"], s["best_epoch"], s["es_wait"] = v, epoch, 0
                self.improved = True
            else:
                s["es_wait"] += 1
                if self.patience and s["es_wait"] >= self.patience:
                    s["stopped_epoch"] = epoch
                    self.model.stop_training = True
            if self.lr_patience:
                if s["lr_best"] is None or v < s["lr_best"] - PLATEAU_MIN_DELTA:
                    s["lr_best"], s["lr_wait"] = v, 0
                else:
                    s["lr_wait"] += 1
                    if s["lr_wait"] >= self.lr_patience:
                        if lr > float(np.float32(self.min_lr)):
                            self.model.optimizer.learning_rate = max(lr * self.lr_factor,
                                                                     self.min_lr)
                        s["lr_wait"] = 0

    class Checkpoint(keras.callbacks.Callback):
        """After every good epoch: variables + optimizer state, history, control state (atomic)."""

        def __init__(self, folder: Path, control, rows: List[dict], columns: Sequence[str],
                     history_path: Path, log, phase: str) -> None:
            super().__init__()
            self.folder, self.control, self.rows, self.columns = folder, control, rows, columns
            self.history_path, self.log, self.phase = history_path, log, phase
            self.t0 = time.time()

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            if self.control.nan is not None:
                return
            logs = logs or {}
            row = {"epoch": epoch + 1}
            for k in self.columns[1:]:
                if k in logs:
                    row[k] = float(logs[k])
            row["seconds"] = time.time() - self.t0       # kept in state.json, not in the CSV
            self.rows.append(row)
            _save_variables(self.folder / f"epoch_{epoch + 1}.npz", self.model, optimizer=True)
            if self.control.improved:
                _save_variables(self.folder / "best.npz", self.model, optimizer=False)
            _write_json_atomic(self.folder / "state.json", {
                "phase": self.phase, "epochs_done": epoch + 1, "history": self.rows,
                "control": self.control.state, "stopped": bool(self.model.stop_training),
                "finished": False})
            for old in self.folder.glob("epoch_*.npz"):
                if old.name != f"epoch_{epoch + 1}.npz":
                    old.unlink()
            _write_csv(self.history_path, self.columns, self.rows)
            metrics = " ".join(f"{k}={row[k]:.4g}" for k in self.columns[1:] if k in row)
            self.log(f"{self.phase} epoch {epoch + 1}: {metrics} ({row['seconds']:.1f} s)")

    return Control, Checkpoint


def precise_batchnorm_callback(images: np.ndarray, batch_size: int, after: str = "test"):
    """A Keras callback that re-estimates BatchNorm population statistics from ``images``.

    Why: a BatchNormalization layer normalises with the statistics of the current batch while
    training, but at inference with exponential moving averages of past batch statistics
    (momentum m: mu <- m mu + (1 - m) mu_batch). When the weights change fast (a network trained
    from scratch at lr 1e-3, a small dataset, few steps per epoch) those averages still describe
    the weights of many steps ago, so the validation score, computed with them, measures a model
    that never existed: tiny's validation accuracy swung by up to 30 points between epochs (demo,
    seed 42: 0.46, 0.54, 0.38, 0.71, 0.44) while the same weights scored a steady 0.65, 0.66, 0.75,
    0.73, 0.72 with re-estimated statistics, and which epoch early stopping kept then depended on
    rounding differences between machines. PreciseBN (Wu & Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021, section 3) replaces the averages by the population statistics of a fixed
    set of training images under the current weights:

        mu_l = E[x_l],  sigma^2_l = E[x_l^2] - mu_l^2

    over every image and position of the input x_l of each trainable BatchNorm layer l, with the
    layers before it in training mode (as when the statistics were collected by the averages).

    Args:
        images: uint8 (N, H, W, 3) training images (a fixed subset; raw pixels, as the model takes).
        batch_size: images per forward pass.
        after: "test" re-estimates before every validation (``on_test_begin``, so the validation
            score, the best-epoch choice and the checkpoint all use the new statistics), "epoch"
            at the end of every epoch (phases without validation, e.g. contrastive phase 1).
    Returns:
        a keras.callbacks.Callback; it does nothing on a model without trainable BatchNorm layers.
    """
    import keras
    import tensorflow as tf

    class PreciseBatchNorm(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self._moments = None
            self._layers = None

        def _build(self) -> None:
            self._layers = [layer for layer in self.model.layers
                            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
            if not self._layers:
                return
            probe = keras.Model(self.model.inputs, [layer.input for layer in self._layers])
            axes = [[a for a in range(len(layer.input.shape)) if a != layer.axis % len(layer.input.shape)]
                    for layer in self._layers]

            @tf.function(reduce_retracing=True)
            def moments(x):
                outs = probe(x, training=True)
                outs = outs if isinstance(outs, (list, tuple)) else [outs]
                out = []
                for o, ax in zip(outs, axes):
                    o = tf.cast(o, tf.float32)
                    out.append((tf.reduce_mean(o, ax), tf.reduce_mean(tf.square(o), ax)))
                return out

            self._moments = moments

        def recalibrate(self) -> None:
            if self._layers is None:
                self._build()
            if not self._layers:
                return
            sums = None
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size]
                w = len(batch) / len(images)
                stats = self._moments(tf.constant(batch, tf.float32))
                part = [(w * m.numpy().astype(np.float64), w * q.numpy().astype(np.float64))
                        for m, q in stats]
                sums = part if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, part)]
            for layer, (mean, mean_sq) in zip(self._layers, sums):
                layer.moving_mean.assign(mean.astype(np.float32))
                layer.moving_variance.assign(np.maximum(mean_sq - mean ** 2, 0.0).astype(np.float32))

        def on_test_begin(self, logs=None):
            if after == "test":
                self.recalibrate()

        def on_epoch_end(self, epoch, logs=None):
            if after == "epoch":
                self.recalibrate()

    return PreciseBatchNorm()


def precise_bn_images(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The fixed training subset behind PreciseBatchNorm: ``n`` images drawn without replacement
    with ``seed`` (all of them when there are fewer), in file order."""
    if n <= 0 or len(x) <= n:
        return x
    idx = np.sort(np.random.default_rng([int(seed), 7]).choice(len(x), n, replace=False))
    return x[idx]


def _write_json_atomic(path: Path, obj) -> None:
    cdata.write_json(path, obj)


def _variables(model, optimizer: bool) -> list:
    out = list(model.variables)
    if optimizer and model.optimizer is not None:
        out += list(model.optimizer.variables)
    return out


def _save_variables(path: Path, model, optimizer: bool) -> None:
    """Every model variable (weights, BN statistics, RNG states) [+ optimizer state] to .npz."""
    arrays = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(_variables(model, optimizer))}
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_variables(path: Path, model, optimizer: bool) -> None:
    if optimizer and model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = _variables(model, optimizer)
    with np.load(path) as f:
        keys = sorted(f.files)
        if len(keys) != len(variables):
            raise TrainError(f"--resume: checkpoint {path} holds {len(keys)} variables, the model "
                             f"{len(variables)}; it belongs to another model, start a new --out")
        for v, k in zip(variables, keys):
            value = f[k]
            if tuple(value.shape) != tuple(v.shape):
                raise TrainError(f"--resume: checkpoint {path} does not match the model; start a "
                                 f"new --out")
            v.assign(value)


# ------------------------------------------------------------------------------------------------
# One training phase (fit with checkpoints, resume, selection)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PhaseResult:
    rows: List[dict]
    best_epoch: Optional[int]       # 1-based
    epochs_run: int

    @property
    def epoch_seconds(self) -> Optional[float]:
        """Median seconds per epoch (robust to the first epoch's graph tracing)."""
        times = [r["seconds"] for r in self.rows if "seconds" in r]
        return float(np.median(times)) if times else None


def _run_phase(model, phase: str, run: Path, dataset_fn, steps: int, val_ds, epochs: int,
               monitor: Optional[str], patience: int, lr_patience: int, lr_factor: float,
               min_lr: float, columns: Sequence[str], history_path: Path, cfg: TrainConfig,
               log, extra_callbacks: Sequence, precise_bn: Sequence = ()) -> _PhaseResult:
    """Fit ``model`` (compiled) for a phase, resuming from RUN/checkpoints/<phase> when present.

    Monitor None (contrastive phase 1): no validation, no early stopping or schedule; the last
    epoch is kept. Otherwise the best epoch on ``monitor`` is restored at the end.
    """
    import keras

    folder = run / "checkpoints" / phase
    folder.mkdir(parents=True, exist_ok=True)
    Control, Checkpoint = _make_callbacks()
    control = Control(monitor, patience if monitor else 0, lr_patience if monitor else 0,
                      lr_factor, min_lr)
    rows: List[dict] = []
    start, stopped = 0, False
    state_file = folder / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        rows = list(state["history"])
        control.state.update(state["control"])
        start, stopped = int(state["epochs_done"]), bool(state["stopped"])
        if state.get("finished"):
            _load_variables(folder / "final.npz", model, optimizer=False)
            best = control.state["best_epoch"]
            return _PhaseResult(rows, None if best is None else best + 1, start)
        _load_variables(folder / f"epoch_{start}.npz", model, optimizer=True)
        log(f"{phase}: resuming after epoch {start}")
    if start < epochs and not stopped:
        callbacks = list(precise_bn) + [control, Checkpoint(folder, control, rows, columns,
                                                            history_path, log, phase)]
        if cfg.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run / "tensorboard" / phase)))
        callbacks += list(extra_callbacks)
        model.fit(dataset_fn(start, epochs), validation_data=val_ds if monitor else None,
                  epochs=epochs, initial_epoch=start, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=cfg.verbose, shuffle=False)
    if control.nan is not None:
        done = len(rows)
        kept = (f"the last good checkpoint (epoch {done}) is kept in {folder}" if done else
                "no epoch completed")
        lr = float(np.asarray(model.optimizer.learning_rate))
        raise TrainError(f"{phase}: loss became NaN at {control.nan}; training stopped and "
                         f"{kept}; lower --lr (now {lr:.3g}) or check the data")
    best = control.state["best_epoch"]
    if monitor and best is not None:
        _load_variables(folder / "best.npz", model, optimizer=False)
    _save_variables(folder / "final.npz", model, optimizer=False)
    _write_json_atomic(state_file, {"phase": phase, "epochs_done": len(rows), "history": rows,
                                    "control": control.state, "stopped": True, "finished": True})
    for old in folder.glob("epoch_*.npz"):
        old.unlink()
    return _PhaseResult(rows, None if best is None else best + 1, len(rows))


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------

def _plot(path: Path, rows: Sequence[dict], series: Sequence[Tuple[str, str]], ylabel: str,
          title: str, best_epoch: Optional[int] = None) -> None:
    """One line plot per (column, label) over epochs, saved atomically as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    epochs = [r["epoch"] for r in rows]
    for col, label in series:
        values = [r.get(col, float("nan")) for r in rows]
        if any(math.isfinite(v) for v in values):
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1,
                   label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def _load_init_model(init: str, num_classes: int, image_size: Tuple[int, int]):
    """The classifier of a finished run (``--init``), checked against the data."""
    import keras

    f = Path(init) / "model.keras"
    if not f.is_file():
        raise TrainError(f"--init {init}: no model.keras there; pass a finished run folder")
    try:
        model = keras.models.load_model(f, compile=False)
    except Exception as exc:   # noqa: BLE001 - keras raises many types for a bad archive
        raise TrainError(f"--init {init}: cannot load model.keras ({type(exc).__name__}); pass a "
                         f"run made by 'cli.py train'") from None
    k = int(model.output_shape[-1])
    if k != num_classes:
        raise TrainError(f"--init {init}: the model has {k} classes, the data {num_classes}; use a "
                         f"run trained on the same classes")
    if tuple(model.input_shape[1:3]) != tuple(image_size):
        raise TrainError(f"--init {init}: the model takes {model.input_shape[1]}x"
                         f"{model.input_shape[2]} images, the data is {image_size[0]}x"
                         f"{image_size[1]}; use a run trained on this image size")
    return model


def heldout_signature(data_dir: os.PathLike) -> Optional[str]:
    """SHA-256 of the validation and test membership of a prepared dataset (split, class, stem).

    Two prepared folders with the same signature hold out the same cells, whatever their paths.
    Recorded in every run's config.json, so ``--init`` can refuse a run whose training cells may
    include this dataset's validation or test cells (another fold, seed or split protocol).
    None when the manifest lacks the columns.
    """
    import hashlib

    rows = cdata.read_manifest(data_dir)
    if not rows or not {"split", "stem", "augmented"} <= set(rows[0]):
        return None
    held = sorted(f"{r['split']},{r.get('source_class') or r.get('class_name', '')},{r['stem']}"
                  for r in rows
                  if r["split"] in ("val", "test") and str(r["augmented"]).lower() in ("0", "false", ""))
    return hashlib.sha256("\n".join(held).encode()).hexdigest()


def _compile_classifier(model, lr: float, loss) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss=loss,
                  metrics=["accuracy"])


def train(config: TrainConfig, callbacks: Sequence = ()) -> dict:
    """Train one run: a prepared dataset -> RUN/ (see the module docstring).

    Args:
        config: the run's arguments.
        callbacks: extra keras callbacks added to every ``fit`` (after the checkpoint callback).
    Returns:
        The summary (also RUN/summary.json): best epoch, validation loss/accuracy at it, epochs
        run, seconds, images, run folder.
    Raises:
        TrainError: bad arguments, unwritable or conflicting run folder, NaN loss, bad --init.
        cervical.data.DataError: the data folder is not a prepared dataset.
        cervical.models.ModelError: unknown model, input too small, weights unavailable.
    """
    cfg = _validate(config)
    info = cdata.read_info(cfg.data)
    class_names = list(info["class_names"])
    k = len(class_names)
    init_model_name = None
    if cfg.init:
        init_cfg_file = Path(cfg.init) / "config.json"
        init_cfg = json.loads(init_cfg_file.read_text()) if init_cfg_file.is_file() else {}
        init_model_name = init_cfg.get("model")
        if not (Path(cfg.init) / "model.keras").is_file():
            raise TrainError(f"--init {cfg.init}: no model.keras there; pass a finished run folder")
        if cfg.model is None:
            cfg.model = init_model_name
            if cfg.model is None:
                raise TrainError(f"--init {cfg.init}: no config.json naming its model; pass --model")
        elif init_model_name and init_model_name != cfg.model:
            raise TrainError(f"--init {cfg.init}: holds a {init_model_name} model, not {cfg.model}; "
                             f"pass --model {init_model_name}")
        cfg.variant = init_cfg.get("variant", cfg.variant)
    if cfg.weights is None:
        cfg.weights = "none" if cfg.init else default_weights(cfg.model, cfg.regime, cfg.variant)
    image_size = int(info.get("image_size", 0)) or None
    if image_size:
        models.check_input_size(cfg.model, (image_size, image_size, 3))
    cost = load_cost_matrix(cfg.cost_matrix, class_names) if cfg.cost_matrix else None
    if cfg.init and init_cfg.get("class_names") not in (None, class_names):
        n_init = len(init_cfg["class_names"])
        raise TrainError(f"--init {cfg.init}: the model has {n_init} classes, the data {k}"
                         + ("" if n_init != k else " with other names")
                         + "; use a run trained on the same classes")
    if cfg.init:
        theirs, ours = init_cfg.get("heldout_signature"), heldout_signature(cfg.data)
        if theirs and ours and theirs != ours:
            raise TrainError(f"--init {cfg.init}: was trained on another split of the data (its "
                             f"validation/test cells differ from those of --data {cfg.data}), so "
                             f"it may have trained on this split's test cells; continue a run "
                             f"trained on --data {cfg.data}")
    try:
        tr = cdata.load_split(cfg.data, "train")
        va = cdata.load_split(cfg.data, "val")
    except cdata.DataError as exc:
        raise cdata.DataError(f"{exc} (training needs a train and a val split; the test split "
                              f"is never used here)") from None
    input_shape = tuple(int(v) for v in tr.x.shape[1:])
    models.check_input_size(cfg.model, input_shape)
    class_weight, weights_source = (load_class_weights(cfg.class_weights, tr.y, class_names)
                                    if cfg.regime == "cost-sensitive" else (None, None))
    if not cfg.init:
        models.resolve_weights(cfg.model, cfg.weights, input_shape[0])   # fail before writing
    run, saved = _prepare_run_folder(cfg)
    t_start = time.time()
    run_config = {**dataclasses.asdict(cfg),
                  "data_dir": cfg.data, "class_names": class_names, "num_classes": k,
                  "split_protocol": info.get("split"), "image_size": input_shape[0],
                  "input_shape": list(input_shape), "data_fingerprint": info.get("fingerprint"),
                  "heldout_signature": heldout_signature(cfg.data),
                  "dataset": info.get("dataset"), "task": info.get("task"),
                  "train_images": len(tr), "val_images": len(va),
                  "versions": cdata.library_versions(), "git_commit": _git_commit()}
    if not saved:
        cdata.write_json(run / "config.json", run_config)   # completed below once the model exists
    log = _Log(run / "train.log")
    log(("resuming" if saved else "starting") + f" {cfg.model} {cfg.regime} on {cfg.data} "
        f"({len(tr)} train, {len(va)} val images)")

    with _Session(cfg.seed, cfg.deterministic, cfg.mixed_precision) as session:
        strategy = make_strategy(cfg.strategy)
        replicas = int(strategy.num_replicas_in_sync)
        global_batch = cfg.batch_size * replicas
        steps = int(math.ceil(len(tr) / global_batch))

        if cfg.regime == "cost-sensitive":
            weights_info = {
                "source": weights_source, "spec": cfg.class_weights,
                "weights": None if class_weight is None else
                {class_names[i]: class_weight[i] for i in range(k)},
                "weights_by_id": class_weight,
                "train_counts": {c: int((tr.y == i).sum()) for i, c in enumerate(class_names)},
                "formula": "w_c = n / (K * n_c)"}
            cdata.write_json(run / "class_weights.json", weights_info)
            if cfg.cost_matrix:
                cdata.write_json(run / "cost_matrix.json", {
                    "file": cfg.cost_matrix, "class_names": class_names,
                    "rows": "true class", "columns": "predicted class", "matrix": cost.tolist()})

        normalization = None
        if cfg.regime in ("contrastive", "baseline") and cfg.variant == "thesis":
            normalization = channel_statistics(tr.x)   # the study's Normalization.adapt(x_train)

        run_config.update({"replicas": replicas, "global_batch_size": global_batch,
                           "strategy_class": type(strategy).__name__,
                           "precision_policy": session.policy_name or "float32",
                           "normalization": normalization})
        freeze = {"auto": None, "study": True, "none": False}[cfg.freeze]
        val_ds = make_eval_dataset(va.x, va.y, global_batch, num_classes=k)

        def classifier_data(online_augment: bool, weights=None):
            return lambda start, stop: make_train_dataset(
                tr.x, tr.y, global_batch, cfg.seed, (start, stop), num_classes=k,
                augment="light" if online_augment else None, class_weight=weights)

        bn_images = precise_bn_images(tr.x, cfg.precise_bn, cfg.seed)

        def precise_bn(after: str) -> list:
            return ([precise_batchnorm_callback(bn_images, global_batch, after)]
                    if cfg.precise_bn else [])

        phase_args = dict(monitor=cfg.monitor, patience=cfg.patience, lr_patience=cfg.lr_patience,
                          lr_factor=cfg.lr_factor, min_lr=cfg.min_lr, cfg=cfg, log=log,
                          extra_callbacks=callbacks, precise_bn=precise_bn("test"))
        contrastive_rows = None
        with strategy.scope():
            if cfg.regime in ("finetune", "cost-sensitive"):
                model = (_load_init_model(cfg.init, k, input_shape[:2]) if cfg.init else
                         models.build_model(cfg.model, k, input_shape, cfg.weights, cfg.variant,
                                            freeze=freeze))
                if cfg.regime == "cost-sensitive" and cfg.cost_matrix:
                    from cervical import losses

                    loss = losses.cost_matrix_loss(cost)
                else:
                    loss = "categorical_crossentropy"
                _compile_classifier(model, cfg.lr, loss)
                run_config["feature_layer"] = models.feature_layer_name(model)
                run_config["trainable_params"] = _count(model.trainable_weights)
                run_config["total_params"] = int(model.count_params())
                cdata.write_json(run / "config.json", run_config)
                result = _run_phase(model, "classifier", run, classifier_data(
                    cfg.online_augment, class_weight), steps, val_ds, cfg.epochs,
                    columns=HISTORY_COLUMNS, history_path=run / "history.csv", **phase_args)
            else:
                encoder = models.build_encoder(cfg.model, input_shape, cfg.weights, cfg.variant,
                                               freeze=freeze, normalization=normalization)
                if cfg.regime == "contrastive":
                    contrastive_rows = _contrastive_phase(encoder, cfg, run, tr, global_batch,
                                                          steps, log, callbacks,
                                                          precise_bn("epoch"))
                model = models.build_contrastive_classifier(
                    encoder, k, train_encoder=cfg.regime == "baseline")
                _compile_classifier(model, cfg.lr, "categorical_crossentropy")
                run_config["feature_layer"] = models.feature_layer_name(model)
                run_config["trainable_params"] = _count(model.trainable_weights)
                run_config["total_params"] = int(model.count_params())
                cdata.write_json(run / "config.json", run_config)
                result = _run_phase(model, "classifier", run, classifier_data(cfg.online_augment),
                                    steps, val_ds, cfg.epochs, columns=HISTORY_COLUMNS,
                                    history_path=run / "history.csv", **phase_args)
            final = _inference_model(model)
        _save_model(final, run / "model.keras")

    rows = result.rows
    best = result.best_epoch
    best_row = next((r for r in rows if r["epoch"] == best), rows[-1] if rows else {})
    _plot(run / "loss.png", rows, [("loss", "train"), ("val_loss", "validation")], "loss",
          f"{cfg.model} {cfg.regime}: loss", best)
    _plot(run / "accuracy.png", rows, [("accuracy", "train"), ("val_accuracy", "validation")],
          "accuracy", f"{cfg.model} {cfg.regime}: accuracy", best)
    if contrastive_rows:
        _plot(run / "contrastive_loss.png", contrastive_rows, [("loss", f"{cfg.loss} loss")],
              "contrastive loss", f"{cfg.model} phase 1 ({cfg.loss}, tau {cfg.temperature:g})")
    summary = {"run": str(run), "model": cfg.model, "regime": cfg.regime, "variant": cfg.variant,
               "loss": cfg.loss, "best_epoch": best, "epochs_run": result.epochs_run,
               "max_epochs": cfg.epochs,
               "val_loss": best_row.get("val_loss"), "val_accuracy": best_row.get("val_accuracy"),
               "train_images": len(tr), "val_images": len(va),
               "seconds": time.time() - t_start, "seconds_per_epoch": result.epoch_seconds,
               "contrastive_epochs_run": len(contrastive_rows) if contrastive_rows else None,
               "selected_on": cfg.monitor}
    cdata.write_json(run / "summary.json", summary)
    log(format_summary(summary))
    return summary


def _count(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


def _contrastive_phase(encoder, cfg: TrainConfig, run: Path, tr, global_batch: int, steps: int,
                       log, callbacks, precise_bn: Sequence = ()) -> List[dict]:
    """Phase 1: encoder + projection head trained with a contrastive loss on two views per image."""
    import keras
    from cervical import losses

    projector = models.add_projection_head(encoder, cfg.projection_dim,
                                           activation="relu" if cfg.variant == "thesis" else None)
    if cfg.loss == "triplet":
        loss = losses.TripletLoss(margin=cfg.margin, mining=cfg.mining)
    elif cfg.loss == "npairs":
        loss = losses.NPairsLoss(temperature=cfg.temperature)
    else:
        loss = losses.SupConLoss(temperature=cfg.temperature, base_temperature=cfg.temperature)
    projector.compile(optimizer=keras.optimizers.Adam(learning_rate=cfg.contrastive_lr), loss=loss)

    def views(start, stop):
        return make_train_dataset(tr.x, tr.y, global_batch, cfg.seed, (start, stop),
                                  num_classes=None, views=2)

    result = _run_phase(projector, "contrastive", run, views, steps, None, cfg.contrastive_epochs,
                        monitor=None, patience=0, lr_patience=0, lr_factor=cfg.lr_factor,
                        min_lr=cfg.min_lr, columns=CONTRASTIVE_COLUMNS,
                        history_path=run / "contrastive_history.csv", cfg=cfg, log=log,
                        extra_callbacks=callbacks, precise_bn=precise_bn)
    return result.rows


def _inference_model(model):
    """The trained model as a fresh, uncompiled float32 functional model (no optimizer, no loss).

    Same layers when the model computes in float32; after mixed-precision training, a float32
    copy (the variables are float32 anyway), so eval, CAMs and LIME run at full precision.
    """
    import keras

    plain = keras.Model(model.input, model.output, name=model.name)
    if all(layer.dtype_policy.name == "float32" for layer in plain.layers):
        return plain
    config = _replace_policies(plain.get_config())
    copy = keras.Model.from_config(config)
    copy.set_weights(plain.get_weights())
    return copy


def _replace_policies(obj):
    """Layer configs with every mixed dtype policy replaced by float32."""
    if isinstance(obj, dict):
        if obj.get("class_name") == "DTypePolicy" and isinstance(obj.get("config"), dict):
            return {**obj, "config": {**obj["config"], "name": "float32"}}
        return {k: _replace_policies(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_policies(v) for v in obj]
    if obj in ("mixed_float16", "mixed_bfloat16"):
        return "float32"
    return obj


def _save_model(model, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    """One line: what was trained, the selected epoch and its validation scores, time, folder."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    phase1 = (f", {summary['contrastive_epochs_run']} contrastive epochs ({summary['loss']})"
              if summary.get("contrastive_epochs_run") else "")
    per_epoch = summary.get("seconds_per_epoch")
    timing = f"{summary['seconds']:.1f} s" + (f" ({per_epoch:.1f} s/epoch)" if per_epoch else "")
    return (f"trained {summary['model']} ({summary['regime']}, {summary['variant']}){phase1}: "
            f"best epoch {summary['best_epoch']}/{summary['epochs_run']} on {summary['selected_on']}"
            f", val_loss {fmt(summary['val_loss'])}, val_accuracy {fmt(summary['val_accuracy'])}; "
            f"{timing}; run folder {summary['run']}")
