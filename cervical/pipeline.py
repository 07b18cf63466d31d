"""The training input pipeline (tf.data): seeded batches, online augmentation, evaluation batches.

Every random choice is a stateless op keyed on (seed, epoch, step), so the same seed gives the same
batches in the same order on every run and after a resume (cervical.train's reproducibility rule).

    make_train_dataset   one epoch of shuffled, optionally augmented batches per call
    make_eval_dataset    the validation / test batches, in order
    augment_images       our light augmentation (flips, transposes, crops, brightness/contrast)
    study_augment        the study's in-model block (flip, rotation 0.02, width/height +-20 %)
    channel_statistics   per-channel mean and sd for the study's Normalization layer

TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import math
import mmap
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["augment_images", "study_augment", "make_train_dataset", "make_eval_dataset",
           "gather_rows", "channel_statistics"]


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


def study_augment(x, seed):
    """The study's in-model augmentation block, per batch, stateless (docs/study.md §4).

    Its contrastive encoders began with ``Normalization`` (adapted on the training images), then
    ``RandomFlip("horizontal")``, ``RandomRotation(0.02)``, ``RandomWidth(0.2)`` and
    ``RandomHeight(0.2)`` (Keras 2.12). Keras 3 has no RandomWidth/RandomHeight layers, and a
    custom layer would keep model files from loading without this package, so the same transforms
    run here, on the raw pixels of each training batch, with the Normalization still inside the
    model. That is the same computation: the normalisation is a per-channel affine map, and a
    flip, a bilinear rotation with reflected borders and a bilinear resize all commute with it.

        flip      each image mirrored left-right with probability 1/2
        rotation  each image by a ~ U(-0.02, 0.02) x 2 pi (+-7.2 degrees) about its centre,
                  bilinear, borders filled by reflection (Keras' defaults)
        width     the whole batch resized to width floor(W f), f ~ U(0.8, 1.2), bilinear
        height    the whole batch resized to height floor(H g), g ~ U(0.8, 1.2), bilinear

    So, as in the study, the network sees images of varying size while it trains (88-132 px
    sides at 110 px) and 110 x 110 at test time.

    Args:
        x: float32 (B, H, W, 3), raw 0..255.
        seed: int tensor (2,).
    Returns:
        float32 (B, H', W', 3).
    """
    import tensorflow as tf

    def uniform(k, shape, low=0.0, high=1.0):
        return tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, k),
                                           minval=low, maxval=high)

    b = tf.shape(x)[0]
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    x = tf.where((uniform(1, [b]) < 0.5)[:, None, None, None], tf.reverse(x, [2]), x)
    angle = uniform(2, [b], -0.02 * 2 * math.pi, 0.02 * 2 * math.pi)
    hf, wf = tf.cast(h, tf.float32) - 1.0, tf.cast(w, tf.float32) - 1.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = (wf - (cos * wf - sin * hf)) / 2.0
    y_offset = (hf - (sin * wf + cos * hf)) / 2.0
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transforms, output_shape=tf.stack([h, w]), fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")
    new_w = tf.cast(tf.cast(w, tf.float32) * uniform(3, [], 0.8, 1.2), tf.int32)
    new_h = tf.cast(tf.cast(h, tf.float32) * uniform(4, [], 0.8, 1.2), tf.int32)
    return tf.image.resize(x, tf.stack([new_h, new_w]), method="bilinear")


def make_train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                       epochs: Tuple[int, int], num_classes: Optional[int] = None,
                       augment: Optional[str] = None, views: int = 1,
                       class_weight: Optional[Dict[int, float]] = None):
    """Training batches for epochs [start, stop), reshuffled every epoch, from in-memory arrays.

    Epoch e visits the images in the order argsort(u), u ~ stateless_uniform(seed = (seed, e)), in
    batches of ``batch_size`` (the last one smaller), so the order depends only on (seed, e): a
    resumed run sees exactly the batches an uninterrupted one would. Each batch's images are
    gathered from ``x`` itself (``gather_rows``: a memory-mapped array is read a batch at a time,
    never copied whole), cast to float32 (raw 0..255, the model preprocesses), optionally
    augmented (``augment_images`` seeded on (seed, e, step)) and prefetched.

    Args:
        x: uint8 (N, H, W, 3).
        y: int (N,).
        batch_size: global batch size.
        seed: run seed.
        epochs: (start, stop) epoch indices (0-based); the dataset holds
            (stop - start) * ceil(N / batch_size) batches.
        num_classes: if given, targets are one-hot float32 (B, K); else int32 labels (B,).
        augment: None, "light", "strong" (``augment_images``) or "study" (``study_augment``:
            the batch's images may change size).
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
        ys = tf.constant(np.asarray(y, np.int32))
        ws = None if class_weight is None else tf.constant(
            [float(class_weight.get(i, 0.0)) for i in range(max(class_weight) + 1)], tf.float32)
    base = tf.constant(int(seed), tf.int64)

    def load(epoch, step, idx):
        images = tf.cast(gather_rows(x, idx), tf.float32)
        labels = tf.gather(ys, idx)
        key = tf.stack([base, epoch * 1_000_003 + step])
        if views == 2:
            a = augment_images(images, tf.random.experimental.stateless_fold_in(key, 1), "strong")
            b = augment_images(images, tf.random.experimental.stateless_fold_in(key, 2), "strong")
            images = tf.reshape(tf.stack([a, b], axis=1), [-1] + list(x.shape[1:]))
            labels = tf.repeat(labels, 2)
        elif augment == "study":
            images = study_augment(images, key)
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


def gather_rows(x: np.ndarray, idx):
    """The rows ``idx`` (an int tensor) of the array ``x``, as a uint8 tensor, read in NumPy: a
    memory-mapped ``x`` is paged in a batch at a time, an in-memory one is not copied into a
    TensorFlow constant (which doubled the memory of training before)."""
    import tensorflow as tf

    out = tf.numpy_function(lambda i: read_rows(x, np.asarray(i)), [idx], tf.as_dtype(x.dtype),
                            stateful=False)
    out.set_shape([None] + list(x.shape[1:]))
    return out


def read_rows(x: np.ndarray, idx) -> np.ndarray:
    """``x[idx]`` (``idx`` an index array or a slice) as an in-memory array.

    For a memory-mapped ``x`` the rows are read ``ROWS_PER_READ`` at a time and the pages just read
    are released from this process after each group (``madvise(MADV_DONTNEED)``; the operating
    system keeps them in its file cache). A page fault maps more than the row it needs (read-around
    and large page-cache folios: about 0.9 MB per 110 px row on the development machine), so rows
    scattered over a large file would otherwise map most of it: what a read holds is bounded by
    the group, not by the number of rows asked for or the size of the split."""
    handle = getattr(x, "_mmap", None)
    if handle is None or not hasattr(handle, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return np.array(x[idx])
    rows = np.arange(len(x))[idx] if isinstance(idx, slice) else np.asarray(idx)
    out = np.empty((len(rows),) + tuple(x.shape[1:]), dtype=x.dtype)
    contiguous = isinstance(idx, slice) and idx.step in (None, 1)
    for start in range(0, len(rows), ROWS_PER_READ):
        part = rows[start:start + ROWS_PER_READ]
        out[start:start + len(part)] = (x[part[0]:part[-1] + 1] if contiguous else x[part])
        handle.madvise(mmap.MADV_DONTNEED)
    return out


#: Rows ``read_rows`` maps at once from a memory-mapped split.
ROWS_PER_READ = 64


def make_eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int,
                      num_classes: Optional[int] = None):
    """Validation batches in file order: (float32 images 0..255, one-hot or int targets), read
    from ``x`` a batch at a time (``gather_rows``)."""
    import tensorflow as tf

    with tf.device("/cpu:0"):
        ys = tf.constant(np.asarray(y, np.int32))
        ds = tf.data.Dataset.range(int(len(y))).batch(batch_size)

    def load(idx):
        images = tf.cast(gather_rows(x, idx), tf.float32)
        labels = tf.gather(ys, idx)
        return images, (labels if num_classes is None else tf.one_hot(labels, num_classes))

    return _with_options(ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
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
        part = read_rows(x, slice(i, i + chunk)).reshape(-1, 3).astype(np.float64)
        total += part.sum(0)
        total_sq += (part ** 2).sum(0)
    m = float(np.prod(x.shape[:3]))
    mean = total / m
    std = np.sqrt(np.maximum(total_sq / m - mean ** 2, 0.0))
    return mean.tolist(), std.tolist()
