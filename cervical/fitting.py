"""Resumable fitting: one training phase of a run, checkpointed every epoch, selected on validation.

``train.py`` decides *what* to train (regime, model, loss, data); this module owns *how* an epoch
loop survives: ``run_phase`` wraps ``keras.Model.fit`` with four callbacks and a checkpoint folder
``RUN/checkpoints/<phase>/``:

    PreciseBatchNorm  BatchNorm statistics re-estimated with the current weights before validation
    Control           early stopping, LR on plateau, best-epoch tracking and a NaN guard, with state
    Checkpoint        after every good epoch: every variable + optimizer state (epoch_<n>.npz), the
                      best epoch's weights (best.npz), history and control state (state.json)
    (the caller's)    extra callbacks, e.g. progress

A rerun of the same phase finds ``state.json`` and continues after the last completed epoch with
the same weights, optimizer moments, RNG states and callback states, so a resumed run reproduces
the uninterrupted one. A finished phase is marked ``finished`` and only its final weights are kept.

Under MultiWorkerMirroredStrategy (``--strategy multiworker``) the epoch loop is
``fit_across_workers`` instead of ``keras.Model.fit``, which cannot feed that strategy in Keras 3;
the callbacks and the checkpoint folder are the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from cervical import files
from cervical.pipeline import read_rows

__all__ = ["TrainError", "PLATEAU_MIN_DELTA", "Phase", "PhaseResult", "run_phase", "Control",
           "Checkpoint", "PreciseBatchNorm", "precise_bn_images", "save_variables",
           "load_variables", "RunLog", "across_workers", "fit_across_workers"]

PLATEAU_MIN_DELTA = 1e-4     # keras ReduceLROnPlateau's default min_delta (the study's callback)


class TrainError(ValueError):
    """Bad training argument or a failed run; the message is one line naming the cause and the fix.

    Defined here, where a phase can fail (NaN loss, a checkpoint of another model), and raised by
    ``cervical.train`` for everything else."""


class RunLog:
    """Appends timestamped lines to a run's train.log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self, line: str) -> None:
        with open(self.path, "a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# ------------------------------------------------------------------------------------------------
# BatchNorm statistics (PreciseBN)
# ------------------------------------------------------------------------------------------------

class PreciseBatchNorm(keras.callbacks.Callback):
    """Re-estimate BatchNorm population statistics from a fixed set of training images.

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
    layers before it in training mode (as when the averages were collected).

    Args:
        images: uint8 (N, H, W, 3) training images (a fixed subset; raw pixels, as the model takes).
        batch_size: images per forward pass.
        after: "test" re-estimates before every validation (``on_test_begin``, so the validation
            score, the best-epoch choice and the checkpoint all use the new statistics), "epoch"
            at the end of every epoch (phases without validation, e.g. contrastive phase 1).
    A model without trainable BatchNorm layers is left alone.
    """

    def __init__(self, images: np.ndarray, batch_size: int, after: str = "test") -> None:
        super().__init__()
        if after not in ("test", "epoch"):
            raise ValueError(f"after={after!r}: choose 'test' or 'epoch'")
        self.images, self.batch_size, self.after = images, int(batch_size), after
        self._layers: Optional[list] = None
        self._moments: Optional[Callable] = None

    def _build(self) -> None:
        self._layers = [layer for layer in self.model.layers
                        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
        if not self._layers:
            return
        probe = keras.Model(self.model.inputs, [layer.input for layer in self._layers])
        axes = [[a for a in range(len(layer.input.shape))
                 if a != layer.axis % len(layer.input.shape)] for layer in self._layers]

        @tf.function(reduce_retracing=True)
        def moments(x):
            outs = probe(x, training=True)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [(tf.reduce_mean(tf.cast(o, tf.float32), ax),
                     tf.reduce_mean(tf.square(tf.cast(o, tf.float32)), ax))
                    for o, ax in zip(outs, axes)]

        self._moments = moments

    def recalibrate(self) -> None:
        """Set every trainable BatchNorm layer's moving mean and variance to the population
        statistics of ``images`` under the current weights."""
        if self._layers is None:
            self._build()
        if not self._layers:
            return
        n = len(self.images)
        sums = [(0.0, 0.0)] * len(self._layers)
        for start in range(0, n, self.batch_size):
            batch = read_rows(self.images, slice(start, start + self.batch_size))
            w = len(batch) / n                      # equal weight per image and position
            stats = self._moments(tf.constant(batch, tf.float32))
            sums = [(a + w * m.numpy().astype(np.float64), b + w * q.numpy().astype(np.float64))
                    for (a, b), (m, q) in zip(sums, stats)]
        for layer, (mean, mean_sq) in zip(self._layers, sums):
            layer.moving_mean.assign(mean.astype(np.float32))
            layer.moving_variance.assign(np.maximum(mean_sq - mean ** 2, 0.0).astype(np.float32))

    def on_test_begin(self, logs=None):
        if self.after == "test":
            self.recalibrate()

    def on_epoch_end(self, epoch, logs=None):
        if self.after == "epoch":
            self.recalibrate()


def precise_bn_images(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The fixed training subset behind PreciseBatchNorm: ``n`` images drawn without replacement
    with ``seed``, in file order, as an in-memory copy; or ``x`` itself (a memory-mapped split
    stays mapped, and PreciseBatchNorm reads it a batch at a time) when ``n`` <= 0 or ``x`` has
    no more than ``n`` images."""
    if n <= 0 or len(x) <= n:
        return x
    idx = np.sort(np.random.default_rng([int(seed), 7]).choice(len(x), n, replace=False))
    return read_rows(x, idx)


# ------------------------------------------------------------------------------------------------
# Control: early stopping, LR on plateau, best epoch, NaN guard
# ------------------------------------------------------------------------------------------------

class Control(keras.callbacks.Callback):
    """Early stopping, LR-on-plateau, best-epoch tracking and a NaN guard, with saveable state.

    The rules are keras' EarlyStopping (min_delta 0) and ReduceLROnPlateau (min_delta 1e-4,
    cooldown 0), the study's callbacks, written out so that their state can be checkpointed:

      improved_es  = v < best       (val_accuracy: v > best);  es_wait = 0 if improved else +1;
                     stop when es_wait >= patience (patience 0: never)
      improved_lr  = v < lr_best - 1e-4;  lr_wait = 0 if improved else +1; when lr_wait >=
                     lr_patience and lr > min_lr: lr = max(lr * factor, min_lr), lr_wait = 0
      best epoch   = the first epoch with the best v (its weights are restored at the end).

    Args:
        monitor: logged quantity to watch ("val_loss", "val_accuracy", or the training "loss" as
            the study's contrastive notebooks did), or None (no selection, no early stopping, no
            schedule: the NaN guard only).
        patience, lr_patience, lr_factor, min_lr: as the Keras callbacks.
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
        self.improved = False

    def on_epoch_begin(self, epoch, logs=None):
        self.improved = False

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        lr = float(np.asarray(self.model.optimizer.learning_rate))
        logs["lr"] = float(f"{lr:.7g}")       # the float32 value, without float64 noise
        if self._nan_guard(epoch, logs) or self.monitor is None:
            return
        v = self.sign * float(logs[self.monitor])
        self._early_stopping(epoch, v)
        if self.lr_patience:
            self._plateau(v, lr)

    def _nan_guard(self, epoch: int, logs: dict) -> bool:
        bad = [k for k in ("loss", self.monitor) if k and k in logs
               and not math.isfinite(float(logs[k]))]
        if self.nan is None and bad:
            self.nan = f"epoch {epoch + 1} ({bad[0]} = {logs[bad[0]]})"
        if self.nan is not None:
            self.model.stop_training = True
        return self.nan is not None

    def _early_stopping(self, epoch: int, v: float) -> None:
        s = self.state
        if s["best"] is None or v < s["best"]:
            s["best"], s["best_epoch"], s["es_wait"] = v, epoch, 0
            self.improved = True
            return
        s["es_wait"] += 1
        if self.patience and s["es_wait"] >= self.patience:
            s["stopped_epoch"] = epoch
            self.model.stop_training = True

    def _plateau(self, v: float, lr: float) -> None:
        s = self.state
        if s["lr_best"] is None or v < s["lr_best"] - PLATEAU_MIN_DELTA:
            s["lr_best"], s["lr_wait"] = v, 0
            return
        s["lr_wait"] += 1
        if s["lr_wait"] >= self.lr_patience:
            if lr > float(np.float32(self.min_lr)):
                self.model.optimizer.learning_rate = max(lr * self.lr_factor, self.min_lr)
            s["lr_wait"] = 0


# ------------------------------------------------------------------------------------------------
# Checkpoint: variables, history and control state after every good epoch
# ------------------------------------------------------------------------------------------------

def _variables(model, optimizer: bool) -> list:
    out = list(model.variables)
    if optimizer and model.optimizer is not None:
        out += list(model.optimizer.variables)
    return out


def save_variables(path: Path, model, optimizer: bool) -> None:
    """Every model variable (weights, BN statistics, RNG states) [+ optimizer state] to .npz."""
    arrays = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(_variables(model, optimizer))}
    files.save_npz(path, arrays, compressed=False)


def load_variables(path: Path, model, optimizer: bool) -> None:
    """Restore what ``save_variables`` wrote; a checkpoint of another model raises TrainError."""
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


class Checkpoint(keras.callbacks.Callback):
    """After every good epoch: variables + optimizer state, history, control state (atomic).

    Args:
        folder: the phase's checkpoint folder.
        control: the phase's Control (its state is saved; a NaN epoch is not checkpointed).
        rows: the phase's history rows (appended to).
        columns: history.csv columns ("epoch" first).
        history_path: where history.csv is (re)written after every epoch.
        log: a RunLog.
        phase: the phase's name, recorded in state.json.
    """

    def __init__(self, folder: Path, control: Control, rows: List[dict], columns: Sequence[str],
                 history_path: Path, log: RunLog, phase: str) -> None:
        super().__init__()
        self.folder, self.control, self.rows, self.columns = folder, control, rows, columns
        self.history_path, self.log, self.phase = history_path, log, phase
        self.t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if self.control.nan is not None:
            return
        row = self._history_row(epoch, logs or {})
        save_variables(self.folder / f"epoch_{epoch + 1}.npz", self.model, optimizer=True)
        if self.control.improved:
            save_variables(self.folder / "best.npz", self.model, optimizer=False)
        files.write_json(self.folder / "state.json", {
            "phase": self.phase, "epochs_done": epoch + 1, "history": self.rows,
            "control": self.control.state, "stopped": bool(self.model.stop_training),
            "finished": False})
        for old in self.folder.glob("epoch_*.npz"):
            if old.name != f"epoch_{epoch + 1}.npz":
                old.unlink()
        files.write_csv(self.history_path, self.columns, self.rows)
        metrics = " ".join(f"{k}={row[k]:.4g}" for k in self.columns[1:] if k in row)
        self.log(f"{self.phase} epoch {epoch + 1}: {metrics} ({row['seconds']:.1f} s)")

    def _history_row(self, epoch: int, logs: dict) -> dict:
        row = {"epoch": epoch + 1}
        for k in self.columns[1:]:
            if k in logs:
                row[k] = float(logs[k])
        row["seconds"] = time.time() - self.t0       # kept in state.json, not in the CSV
        self.rows.append(row)
        return row


# ------------------------------------------------------------------------------------------------
# One phase
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Phase:
    """What one fit needs besides the model.

    Attributes:
        name: "classifier" or "contrastive" (the checkpoint sub-folder).
        run: the run folder.
        dataset_fn: ``dataset_fn(start, stop)`` -> the training batches of epochs [start, stop).
        steps: steps per epoch.
        epochs: maximum epochs.
        columns: history columns ("epoch" first).
        history_path: the CSV rewritten after every epoch.
        val_ds: validation batches (None: no validation).
        monitor, patience, lr_patience, lr_factor, min_lr: see Control (a validation monitor
            needs ``val_ds``).
        keep: "best" restores the best epoch on ``monitor`` at the end; "last" keeps the final
            epoch's weights (what the study's notebooks saved).
        callbacks: extra callbacks, after Control and Checkpoint (PreciseBatchNorm goes first).
        verbose: Keras fit verbosity.
        tensorboard: also write TensorBoard logs to RUN/tensorboard/<name>.
        learning_rate: when resuming, continue at this rate instead of the checkpoint's (a resume
            with a saner --lr after a NaN loss).
    """

    name: str
    run: Path
    dataset_fn: Callable
    steps: int
    epochs: int
    columns: Sequence[str]
    history_path: Path
    val_ds: object = None
    monitor: Optional[str] = None
    keep: str = "best"
    patience: int = 0
    lr_patience: int = 0
    lr_factor: float = 0.2
    min_lr: float = 1e-5
    precise_bn: Optional[PreciseBatchNorm] = None
    callbacks: Sequence = ()
    verbose: int = 0
    tensorboard: bool = False
    learning_rate: Optional[float] = None


@dataclasses.dataclass
class PhaseResult:
    rows: List[dict]
    best_epoch: Optional[int]       # 1-based, on the monitor
    epochs_run: int
    kept_epoch: Optional[int] = None   # 1-based: whose weights the phase ends with

    @property
    def epoch_seconds(self) -> Optional[float]:
        """Median seconds per epoch (robust to the first epoch's graph tracing)."""
        times = [r["seconds"] for r in self.rows if "seconds" in r]
        return float(np.median(times)) if times else None


def run_phase(model, phase: Phase, log: RunLog) -> PhaseResult:
    """Fit ``model`` (compiled) for one phase, resuming from RUN/checkpoints/<phase> when present.

    Without a monitor (contrastive phase 1) or with ``keep="last"`` the last epoch is kept;
    otherwise the best epoch on ``monitor`` is restored at the end.

    Raises:
        TrainError: the loss became NaN/inf (the last good checkpoint is kept for --resume), or a
            checkpoint that belongs to another model.
    """
    folder = phase.run / "checkpoints" / phase.name
    folder.mkdir(parents=True, exist_ok=True)
    monitor = phase.monitor
    if monitor and monitor.startswith("val_") and phase.val_ds is None:
        raise TrainError(f"{phase.name}: --monitor {monitor} needs validation data; monitor loss")
    control = Control(monitor, phase.patience if monitor else 0,
                      phase.lr_patience if monitor else 0, phase.lr_factor, phase.min_lr)
    rows, start, stopped, finished = _restore(folder, model, control, log, phase.name)
    if start and not finished and phase.learning_rate is not None:
        model.optimizer.learning_rate = phase.learning_rate
    if finished:
        return _result(rows, control, start, phase.keep)
    if start < phase.epochs and not stopped:
        callbacks = ([phase.precise_bn] if phase.precise_bn else []) + [
            control, Checkpoint(folder, control, rows, phase.columns, phase.history_path, log,
                                phase.name)]
        if phase.tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(
                log_dir=str(phase.run / "tensorboard" / phase.name)))
        fit = fit_across_workers if across_workers() else _keras_fit
        fit(model, phase.dataset_fn(start, phase.epochs), phase.val_ds, phase.epochs, start,
            phase.steps, callbacks + list(phase.callbacks), phase.verbose)
    if control.nan is not None:
        _stop_on_nan(model, control, rows, folder, phase.name)
    _finish(folder, model, control, rows, monitor if phase.keep == "best" else None, phase.name)
    return _result(rows, control, len(rows), phase.keep)


def _keras_fit(model, dataset, val_ds, epochs: int, initial_epoch: int, steps: int,
               callbacks: list, verbose: int) -> None:
    model.fit(dataset, validation_data=val_ds, epochs=epochs, initial_epoch=initial_epoch,
              steps_per_epoch=steps, callbacks=callbacks, verbose=verbose, shuffle=False)


# ------------------------------------------------------------------------------------------------
# Several workers: the epoch loop of fit, on TensorFlow's multi-worker engine
# ------------------------------------------------------------------------------------------------

def across_workers() -> bool:
    """True inside the scope of a MultiWorkerMirroredStrategy (``--strategy multiworker``)."""
    return isinstance(tf.distribute.get_strategy(),
                      (tf.distribute.MultiWorkerMirroredStrategy,
                       tf.distribute.experimental.MultiWorkerMirroredStrategy))


def fit_across_workers(model, dataset, val_ds, epochs: int, initial_epoch: int, steps: int,
                       callbacks: list, verbose: int = 0) -> None:
    """What ``model.fit`` does for a run phase, for MultiWorkerMirroredStrategy.

    Keras 3's ``fit`` cannot feed this strategy (its data adapter hands the strategy's per-replica
    batches to an op that expects tensors), so this loop does it with TensorFlow's own primitives:
    each step runs ``model.train_step`` in every replica (``strategy.run``) on that replica's share
    of the global batch (``experimental_distribute_dataset``, sharded by data), and the optimizer
    all-reduces the gradients, so every worker applies the same update. The callbacks see what
    ``fit`` shows them (on_train/epoch/batch/test begin and end, the same log keys).

    Validation: every worker scores the whole validation set with its own copy of the weights, and
    the scores are averaged over the workers, so early stopping, the LR schedule and the NaN guard
    decide the same on every worker (a worker that stopped alone would leave the others waiting
    forever). The copies agree except for BatchNorm moving statistics of layers that are not
    synchronized, which each worker averages over its own share of the batches; PreciseBatchNorm,
    run by every worker on the same images, makes those equal too.
    """
    strategy = tf.distribute.get_strategy()
    # Create the compiled loss and metric state before tracing (fit's own first step does this).
    model._symbolic_build(data_batch=dataset.element_spec)
    replicated = strategy.experimental_distribute_dataset(dataset)

    @tf.function
    def train_step(batch):
        logs = strategy.run(model.train_step, args=(batch,))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    mean_over_workers = tf.function(lambda v: strategy.reduce(
        "MEAN", strategy.run(tf.identity, args=(v,)), axis=None))
    cbs = keras.callbacks.CallbackList(callbacks, model=model, verbose=verbose, epochs=epochs,
                                       steps=steps)
    batches = iter(replicated)
    model.stop_training = False
    cbs.on_train_begin()
    logs: dict = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        cbs.on_epoch_begin(epoch)
        for step in range(steps):
            cbs.on_train_batch_begin(step)
            logs = train_step(next(batches))
            cbs.on_train_batch_end(step)
        logs = {k: float(v) for k, v in logs.items()}
        if val_ds is not None:
            cbs.on_test_begin()
            scores = _validate_locally(model, forward, val_ds)
            cbs.on_test_end(scores)
            keys = sorted(scores)       # the average over the workers, the same on every worker
            mean = mean_over_workers(tf.constant([scores[k] for k in keys], tf.float64))
            logs.update({f"val_{k}": float(v) for k, v in zip(keys, mean.numpy())})
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end(logs)


def _validate_locally(model, forward, val_ds) -> dict:
    """Loss (the compiled one) and accuracy of ``forward`` (the model, inference mode) on every
    batch of ``val_ds``, in this worker only: {"loss": mean over images, "accuracy": fraction}."""
    loss_fn = keras.losses.get(model.loss) if isinstance(model.loss, str) else model.loss
    total = correct = count = 0.0
    for x, y in val_ds:
        p = forward(x)
        n = float(x.shape[0])
        total += float(tf.reduce_mean(loss_fn(y, p))) * n     # a function: per image
        truth = tf.argmax(y, -1) if len(y.shape) > 1 else tf.cast(y, tf.int64)
        correct += float(tf.reduce_sum(tf.cast(tf.argmax(p, -1) == truth, tf.float32)))
        count += n
    return {"loss": total / count, "accuracy": correct / count}


def _restore(folder: Path, model, control: Control, log: RunLog, name: str):
    """Load the phase's saved state: (rows, epochs done, stopped, finished)."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        return [], 0, False, False
    state = json.loads(state_file.read_text())
    rows = list(state["history"])
    control.state.update(state["control"])
    start = int(state["epochs_done"])
    if state.get("finished"):
        load_variables(folder / "final.npz", model, optimizer=False)
        return rows, start, True, True
    load_variables(folder / f"epoch_{start}.npz", model, optimizer=True)
    log(f"{name}: resuming after epoch {start}")
    return rows, start, bool(state["stopped"]), False


def _stop_on_nan(model, control: Control, rows: List[dict], folder: Path, name: str) -> None:
    done = len(rows)
    kept = (f"the last good checkpoint (epoch {done}) is kept in {folder}" if done else
            "no epoch completed")
    lr = float(np.asarray(model.optimizer.learning_rate))
    then = ("rerun the same command with --resume and a lower --lr (now "
            f"{lr:.3g})" if done else f"lower --lr (now {lr:.3g}) and rerun, or check the data")
    raise TrainError(f"{name}: loss became NaN at {control.nan}; training stopped and {kept}; "
                     f"{then}")


def _finish(folder: Path, model, control: Control, rows: List[dict], monitor: Optional[str],
            name: str) -> None:
    """Restore the best epoch (when selecting), save the final weights, mark the phase finished."""
    if monitor and control.state["best_epoch"] is not None:
        load_variables(folder / "best.npz", model, optimizer=False)
    save_variables(folder / "final.npz", model, optimizer=False)
    files.write_json(folder / "state.json", {"phase": name, "epochs_done": len(rows),
                                             "history": rows, "control": control.state,
                                             "stopped": True, "finished": True})
    for old in folder.glob("epoch_*.npz"):
        old.unlink()


def _result(rows: List[dict], control: Control, epochs_run: int, keep: str = "best"
            ) -> PhaseResult:
    best = control.state["best_epoch"]
    return PhaseResult(rows, None if best is None else best + 1, epochs_run,
                       kept_epoch=epochs_run if keep == "last" or best is None else best + 1)
