"""Training: a prepared dataset -> a run folder (fine-tune, cost-sensitive, contrastive, baseline).

Thesis sections 3.1-3.3 and 5.3; the study's real settings are in docs/study.md §3-4.
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

``model.keras`` loads with plain ``keras.models.load_model(path)`` (safe mode), also where this
package is not installed (only stock Keras layers); it holds no optimizer and no compiled loss.

Reproducibility: the seed fixes the initial weights (``keras.utils.set_random_seed``), the order of
every epoch (a stateless permutation keyed on (seed, epoch)) and every augmentation (stateless ops
keyed on (seed, epoch, step)); TensorFlow's deterministic ops are switched on for the duration of the
run. So two CPU runs with the same seed give the same history, and a resumed run gives the history
of an uninterrupted one (weights, optimizer moments, RNG states and callback states are restored).

Several machines (``strategy="multiworker"``, TF_CONFIG on every worker): every worker runs the same
call; the chief (``worker_role``) writes the run folder, the others train in step into a scratch
folder and, with ``resume``, start from the chief's checkpoints in ``out``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import data as cdata
from cervical import files, fitting, losses, models, options, protocol
from cervical.fitting import TrainError
from cervical.pipeline import (  # noqa: F401  (re-exported: the input pipeline, as before)
    augment_images, channel_statistics, make_eval_dataset, make_train_dataset, study_augment)

__all__ = ["TrainError", "TrainConfig", "REGIMES", "CONTRASTIVE_LOSS_NAMES", "STRATEGIES",
           "MONITORS", "train", "format_summary", "make_train_dataset", "make_eval_dataset",
           "augment_images", "channel_statistics", "load_class_weights", "load_cost_matrix",
           "make_strategy", "worker_role", "WorkerRole", "default_weights", "heldout_signature"]

REGIMES = ("finetune", "cost-sensitive", "contrastive", "baseline")
CONTRASTIVE_LOSS_NAMES = ("npairs", "supcon", "triplet")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
MONITORS = ("val_loss", "val_accuracy", "loss")
KEEP = ("best", "last")
AUGMENTATIONS = ("none", "light", "study")

#: The study's runs that departed from its common callbacks (docs/study.md §3, read from the saved
#: training logs): VGG19 fine-tuning and ResNet50 cost-sensitive training ran all 50 epochs with
#: no early stopping (the LR schedule stayed). The thesis variant repeats that unless --patience
#: is given.
THESIS_NO_EARLY_STOPPING = protocol.STUDY.no_early_stopping
TRIPLET_MINING = losses.TRIPLET_MINING
HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr")
CONTRASTIVE_COLUMNS = ("epoch", "loss")
PRECISE_BN_IMAGES = protocol.OURS.precise_bn   # images behind each BatchNorm re-estimate

# Fields that define a run: a resumed run must agree with the saved config on all of them.
# (The learning rates may change on --resume: after a NaN loss, resuming with a saner --lr is the
# way on; the checkpoint's optimizer then continues at the new rate.)
_RUN_FIELDS = ("data", "model", "regime", "variant", "weights", "freeze", "epochs", "batch_size",
               "patience", "lr_patience", "lr_factor", "min_lr", "monitor", "class_weights",
               "cost_matrix", "init", "loss", "temperature", "margin", "mining",
               "contrastive_epochs", "projection_dim", "online_augment",
               "contrastive_views", "keep", "precise_bn", "seed", "deterministic",
               "mixed_precision")


#: Every argument of a training run, declared once with its flag, help, choices and range
#: (cervical.options): ``cli.py train`` is built from it and config.json is its ``asdict``.
TrainConfig = options.TrainConfig


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------

def default_weights(model: str, regime: str, variant: str) -> str:
    """The weights a run uses when none are given (cervical.protocol): "none" for tiny and for the
    thesis variant of the contrastive and baseline regimes (the study trained those encoders from
    scratch, docs/study.md §4); "imagenet" otherwise."""
    return protocol.PROTOCOLS[variant].default_weights(model, regime)


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
    _check_choices(c)
    _check_numbers(c)
    options.check(c, TrainError)          # every declared choice and range, new fields included
    _regime_defaults(c)
    _resolve_paths(c)
    return c


def _check_choices(c: TrainConfig) -> None:
    if c.regime not in REGIMES:
        raise TrainError(f"--regime {c.regime!r}: unknown; choose one of {', '.join(REGIMES)}")
    if c.model is None and not c.init:
        raise TrainError("--model: required (one of " + ", ".join(models.MODEL_NAMES) + ")")
    if c.model is not None and c.model not in models.MODEL_NAMES:
        raise TrainError(f"--model {c.model!r}: unknown; choose one of "
                         f"{', '.join(models.MODEL_NAMES)}")
    for flag, value, allowed in (("variant", c.variant, models.VARIANTS),
                                 ("freeze", c.freeze, ("auto", "study", "none")),
                                 ("monitor", c.monitor, MONITORS + (None,)),
                                 ("keep", c.keep, KEEP + (None,)),
                                 ("online-augment", c.online_augment,
                                  AUGMENTATIONS + (None, True, False)),
                                 ("contrastive-views", c.contrastive_views, (None, 1, 2)),
                                 ("strategy", c.strategy, STRATEGIES),
                                 ("mining", c.mining, TRIPLET_MINING)):
        if value not in allowed:
            raise TrainError(f"--{flag} {value!r}: unknown; choose one of {', '.join(allowed)}")
    if c.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise TrainError("--tensorboard: the tensorboard package is not installed; "
                             "'pip install tensorboard' or drop --tensorboard")


def _check_numbers(c: TrainConfig) -> None:
    from cervical import LIMITS

    for name in ("epochs", "batch_size", "contrastive_epochs", "projection_dim"):
        setattr(c, name, _check_number(name.replace("_", "-"), getattr(c, name), 1, integer=True))
    for name, limit in (("epochs", "epochs"), ("contrastive_epochs", "epochs"),
                        ("batch_size", "batch_size"), ("projection_dim", "projection_dim"),
                        ("lr_patience", "patience"), ("patience", "patience"),
                        ("precise_bn", "precise_bn"), ("lr", "lr"), ("contrastive_lr", "lr"),
                        ("min_lr", "lr"), ("temperature", "temperature"), ("margin", "margin")):
        value = getattr(c, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value > LIMITS[limit]:
            raise TrainError(f"--{name.replace('_', '-')} {value}: must be <= {LIMITS[limit]}")
    for name in ("lr_patience", "seed"):
        setattr(c, name, _check_number(name.replace("_", "-"), getattr(c, name), 0, integer=True))
    if c.patience is not None:
        c.patience = _check_number("patience", c.patience, 0, integer=True)
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
    if c.precise_bn is not None:      # None: chosen once the variant is known (--init)
        c.precise_bn = _check_number("precise-bn", c.precise_bn, 0, integer=True)
    c.verbose = int(c.verbose)


def _regime_defaults(c: TrainConfig) -> None:
    """The loss, class-weight and --init rules of each regime."""
    if c.regime == "contrastive":
        c.loss = c.loss or protocol_options(c.variant, c.model, c.regime)["loss"]
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
    elif c.class_weights is None and c.cost_matrix:
        c.class_weights = "none"          # otherwise settled with the variant (_class_weight_default)
    if c.init and c.regime not in ("finetune", "cost-sensitive"):
        raise TrainError("--init: only for --regime finetune or cost-sensitive (continue a run)")


def _resolve_paths(c: TrainConfig) -> None:
    c.data = str(Path(c.data).expanduser().resolve())
    c.out = str(Path(c.out).expanduser().absolute())
    if c.init:
        c.init = str(Path(c.init).expanduser().resolve())
    if c.cost_matrix:
        c.cost_matrix = str(Path(c.cost_matrix).expanduser().resolve())
    if c.class_weights not in (None, "train", "thesis", "none"):
        c.class_weights = str(Path(c.class_weights).expanduser().resolve())


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
# Devices: strategy, mixed precision, determinism
# ------------------------------------------------------------------------------------------------

def make_strategy(name: str):
    """tf.distribute strategy for ``--strategy``.

    "default": one device; "mirrored": all local GPUs (or, without GPUs, all logical CPU devices);
    "multiworker": MultiWorkerMirroredStrategy across the hosts in TF_CONFIG; "auto": mirrored when
    more than one GPU is visible, else default.
    """
    import tensorflow as tf

    if name == "multiworker":
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as exc:
            raise TrainError(f"--strategy multiworker: TensorFlow refused TF_CONFIG "
                             f"({str(exc).splitlines()[0]}); check it on every worker") from None
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Where this process stands in a multi-worker run (one process: chief 0 of 1)."""

    chief: bool = True
    index: int = 0
    workers: int = 1


def worker_role(strategy: str) -> WorkerRole:
    """This process's role under ``--strategy multiworker``, from the TF_CONFIG environment
    variable (``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
    "index": i}}``): the chief is the task of type "chief", or worker 0 when the cluster has no
    chief. Any other strategy: a single process, the chief.

    Raises:
        TrainError: multiworker without TF_CONFIG, or a TF_CONFIG that is not of that form.
    """
    if strategy != "multiworker":
        return WorkerRole()
    raw = os.environ.get("TF_CONFIG", "")
    fix = ('set TF_CONFIG on every worker to {"cluster": {"worker": [hosts]}, "task": {"type": '
           '"worker", "index": i}} (docs/robustness.md, "Several machines")')
    if not raw.strip():
        raise TrainError(f"--strategy multiworker: TF_CONFIG is not set; {fix}")
    try:
        spec = json.loads(raw)
        cluster, kind, index = spec["cluster"], spec["task"]["type"], int(spec["task"]["index"])
        hosts = {k: list(cluster.get(k, [])) for k in ("chief", "worker")}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TrainError(f"TF_CONFIG: not a cluster description; {fix}") from None
    workers = len(hosts["chief"]) + len(hosts["worker"])
    if kind not in hosts or not 0 <= index < len(hosts[kind]):
        raise TrainError(f"TF_CONFIG: task {kind} {index} is not in its cluster; {fix}")
    chief = kind == "chief" or (not hosts["chief"] and index == 0)
    return WorkerRole(chief, index + (len(hosts["chief"]) if kind == "worker" else 0), workers)


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

def _prepare_run_folder(cfg: TrainConfig) -> Tuple[Path, Optional[dict]]:
    """Create (or reopen with ``resume``) the run folder; return (folder, saved config or None)."""
    out = Path(cfg.out)
    if cfg.resume:
        f = out / "config.json"
        if not f.is_file():
            raise TrainError(f"--resume: {out} holds no run (no config.json); drop --resume to "
                             f"start one")
        try:
            saved = files.read_run_config(out, required=True)
        except files.OutputError as exc:
            raise TrainError(f"--resume: {exc}") from None
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


def _load_init_model(init: str, num_classes: int, image_size: Tuple[int, int]):
    """The classifier of a finished run (``--init``), checked against the data."""
    f = Path(init) / "model.keras"
    if not f.is_file():
        raise TrainError(f"--init {init}: no model.keras there; pass a finished run folder")
    try:
        model = models.load_model_file(f, "--init")
    except models.ModelError as exc:
        raise TrainError(f"--init {init}: {exc}") from None
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


# ------------------------------------------------------------------------------------------------
# The run, step by step
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Inputs:
    """Everything read and checked before the run folder is touched."""

    info: dict                                   # the prepared dataset's dataset.json
    class_names: List[str]
    tr: cdata.Split
    va: cdata.Split
    class_weight: Optional[Dict[int, float]]     # cost-sensitive: {class id: weight}
    weights_source: Optional[str]
    cost: Optional[np.ndarray]                   # cost-sensitive: (K, K) cost matrix

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        return tuple(int(v) for v in self.tr.x.shape[1:])


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
    role = worker_role(cfg.strategy)
    inputs = _load_inputs(cfg)                  # every check that can fail comes before writing
    if not role.chief:
        return _train_as_worker(cfg, inputs, callbacks, role)
    with files.output_lock(cfg.out):            # one writer per run folder
        return _train(cfg, inputs, callbacks, role)


def _train_as_worker(cfg: TrainConfig, inputs: "_Inputs", callbacks: Sequence,
                     role: "WorkerRole") -> dict:
    """A multi-worker run on a worker that is not the chief: it trains in step with the others but
    writes into a scratch folder, deleted at the end; only the chief writes --out. With --resume
    it starts from the chief's last checkpoint in --out (a folder every worker sees, or a copy)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"cervical-worker{role.index}-") as scratch:
        mine = dataclasses.replace(cfg, out=str(Path(scratch) / "run"), overwrite=False)
        if cfg.resume:
            chief = Path(cfg.out)
            if not (chief / "config.json").is_file():
                raise TrainError(f"--resume: {chief} holds no run on this host (worker "
                                 f"{role.index}); put --out on a folder every worker sees, or "
                                 f"copy the chief's run folder here first")
            Path(mine.out).mkdir()
            shutil.copy2(chief / "config.json", Path(mine.out) / "config.json")
            if (chief / "checkpoints").is_dir():
                shutil.copytree(chief / "checkpoints", Path(mine.out) / "checkpoints")
        summary = _train(mine, inputs, callbacks, role)
    return {**summary, "run": None, "worker": role.index}


def _train(cfg: TrainConfig, inputs: "_Inputs", callbacks: Sequence, role: "WorkerRole") -> dict:
    """The run itself, under the run folder's lock."""
    run, resumed = _prepare_run_folder(cfg)
    record = _run_record(cfg, inputs)
    log = fitting.RunLog(run / "train.log")
    lr_changed = {k: getattr(cfg, k) for k in ("lr", "contrastive_lr")
                  if resumed and resumed.get(k) != getattr(cfg, k)}
    if not resumed or lr_changed:
        files.write_json(run / "config.json", record)   # completed once the model exists
    log(("resuming" if resumed else "starting") + f" {cfg.model} {cfg.regime} on {cfg.data} "
        f"({len(inputs.tr)} train, {len(inputs.va)} val images)"
        + "".join(f"; --{k.replace('_', '-')} {v} (was {resumed[k]})"
                  for k, v in lr_changed.items()))
    t_start = time.time()
    strategy = make_strategy(cfg.strategy)      # first: multi-worker needs a fresh TF runtime
    with _Session(cfg.seed, cfg.deterministic, cfg.mixed_precision) as session:
        global_batch = cfg.batch_size * int(strategy.num_replicas_in_sync)
        record.update({"replicas": int(strategy.num_replicas_in_sync),
                       "workers": role.workers,
                       "global_batch_size": global_batch,
                       "strategy_class": type(strategy).__name__,
                       "precision_policy": session.policy_name or "float32"})
        _write_cost_files(cfg, inputs, run)
        with strategy.scope():
            model, result, contrastive_rows = _fit(cfg, inputs, run, record, global_batch, log,
                                                   callbacks, lr_changed)
            final = _inference_model(model)
        _save_model(final, run / "model.keras")
    _plot_history(cfg, run, result, contrastive_rows)
    summary = _summary(cfg, inputs, run, result, contrastive_rows, time.time() - t_start)
    files.write_json(run / "summary.json", summary)
    log(format_summary(summary))
    return summary


def _load_inputs(cfg: TrainConfig) -> _Inputs:
    """Read the prepared data and settle the model (from --init), weights and class costs."""
    info = cdata.read_info(cfg.data)
    class_names = list(info["class_names"])
    if cfg.init:
        _adopt_init(cfg, class_names)
    if cfg.weights is None:
        cfg.weights = "none" if cfg.init else default_weights(cfg.model, cfg.regime, cfg.variant)
    _protocol_defaults(cfg)
    if cfg.regime == "cost-sensitive" and cfg.class_weights is None:
        cfg.class_weights = _class_weight_default(cfg.variant, class_names)
    if int(info.get("image_size", 0)):
        models.check_input_size(cfg.model, (int(info["image_size"]),) * 2 + (3,))
    cost = load_cost_matrix(cfg.cost_matrix, class_names) if cfg.cost_matrix else None
    try:
        tr = cdata.load_split(cfg.data, "train", mmap=True, masks=False)   # streamed, not read
        va = cdata.load_split(cfg.data, "val", mmap=True, masks=False)
    except cdata.DataError as exc:
        raise cdata.DataError(f"{exc} (training needs a train and a val split; the test split "
                              f"is never used here)") from None
    models.check_input_size(cfg.model, tr.x.shape[1:])
    class_weight, source = (load_class_weights(cfg.class_weights, tr.y, class_names)
                            if cfg.regime == "cost-sensitive" else (None, None))
    if not cfg.init:
        models.resolve_weights(cfg.model, cfg.weights, tr.x.shape[1])   # fail before writing
    return _Inputs(info, class_names, tr, va, class_weight, source, cost)


def _class_weight_default(variant: str, class_names: Sequence[str]) -> str:
    """--class-weights when none is given: the study's constants (its test-label weights) under
    the thesis variant on SIPaKMeD's five classes, as its code did; the train labels' otherwise
    (other class sets have no study constants)."""
    study_classes = tuple(class_names) == cdata.SIPAKMED_CLASSES
    return protocol.PROTOCOLS[variant].class_weights_default(study_classes)


def protocol_options(protocol_name: str, model: str, regime: str) -> dict:
    """The training procedure of a protocol, as TrainConfig fields: "standard" (ours) or "thesis"
    (what the study's code did, docs/study.md §3-4); cervical.protocol holds every choice. Used
    for the defaults of ``variant`` and by ``audit``."""
    return protocol.PROTOCOLS[protocol_name].train_options(model, regime)


def _protocol_defaults(cfg: TrainConfig) -> None:
    """Fill what the variant decides (docs/study.md §3-4): ours by default, the study's code under
    ``variant="thesis"``. Each is also a flag of its own, recorded in config.json."""
    for name, value in protocol_options(cfg.variant, cfg.model, cfg.regime).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if isinstance(cfg.online_augment, bool):
        cfg.online_augment = "light" if cfg.online_augment else "none"


def _adopt_init(cfg: TrainConfig, class_names: List[str]) -> None:
    """--init RUN: take its model and variant, and refuse a run of other classes or another split."""
    try:
        init_cfg = files.read_run_config(cfg.init)
    except files.OutputError as exc:
        raise TrainError(f"--init {cfg.init}: {exc}") from None
    init_model = init_cfg.get("model")
    if not (Path(cfg.init) / "model.keras").is_file():
        raise TrainError(f"--init {cfg.init}: no model.keras there; pass a finished run folder")
    try:                                    # a broken archive fails here, before anything is written
        models.load_model_file(Path(cfg.init) / "model.keras", "--init")
    except models.ModelError as exc:
        raise TrainError(f"--init {cfg.init}: {exc}") from None
    if cfg.model is None:
        cfg.model = init_model
        if cfg.model is None:
            raise TrainError(f"--init {cfg.init}: no config.json naming its model; pass --model")
    elif init_model and init_model != cfg.model:
        raise TrainError(f"--init {cfg.init}: holds a {init_model} model, not {cfg.model}; "
                         f"pass --model {init_model}")
    cfg.variant = init_cfg.get("variant", cfg.variant)
    if init_cfg.get("class_names") not in (None, class_names):
        n_init = len(init_cfg["class_names"])
        raise TrainError(f"--init {cfg.init}: the model has {n_init} classes, the data "
                         f"{len(class_names)}" + ("" if n_init != len(class_names)
                                                  else " with other names")
                         + "; use a run trained on the same classes")
    theirs, ours = init_cfg.get("heldout_signature"), heldout_signature(cfg.data)
    if theirs and ours and theirs != ours:
        raise TrainError(f"--init {cfg.init}: was trained on another split of the data (its "
                         f"validation/test cells differ from those of --data {cfg.data}), so "
                         f"it may have trained on this split's test cells; continue a run "
                         f"trained on --data {cfg.data}")


def _run_record(cfg: TrainConfig, inputs: _Inputs) -> dict:
    """config.json: every setting, the data's identity, library versions and the code's commit."""
    return {**dataclasses.asdict(cfg),
            "data_dir": cfg.data, "class_names": inputs.class_names,
            "num_classes": len(inputs.class_names), "split_protocol": inputs.info.get("split"),
            "image_size": inputs.input_shape[0], "input_shape": list(inputs.input_shape),
            "data_fingerprint": inputs.info.get("fingerprint"),
            "heldout_signature": heldout_signature(cfg.data),
            "dataset": inputs.info.get("dataset"), "task": inputs.info.get("task"),
            "train_images": len(inputs.tr), "val_images": len(inputs.va),
            "versions": files.library_versions(), "git_commit": files.git_commit()}


def _write_cost_files(cfg: TrainConfig, inputs: _Inputs, run: Path) -> None:
    """class_weights.json (and cost_matrix.json) of a cost-sensitive run: the weights really used."""
    if cfg.regime != "cost-sensitive":
        return
    names, w = inputs.class_names, inputs.class_weight
    files.write_json(run / "class_weights.json", {
        "source": inputs.weights_source, "spec": cfg.class_weights,
        "weights": None if w is None else {names[i]: w[i] for i in range(len(names))},
        "weights_by_id": w,
        "train_counts": {c: int((inputs.tr.y == i).sum()) for i, c in enumerate(names)},
        "formula": "w_c = n / (K * n_c)"})
    if cfg.cost_matrix:
        files.write_json(run / "cost_matrix.json", {
            "file": cfg.cost_matrix, "class_names": names, "rows": "true class",
            "columns": "predicted class", "matrix": inputs.cost.tolist()})


def _fit(cfg: TrainConfig, inputs: _Inputs, run: Path, record: dict, global_batch: int, log,
         callbacks: Sequence, lr_changed: Optional[dict] = None):
    """Build the regime's model (running contrastive phase 1 first), then fit the classifier.

    Returns:
        (trained classifier, its PhaseResult, phase-1 history rows or None).
    """
    steps = int(math.ceil(len(inputs.tr) / global_batch))
    bn_images = fitting.precise_bn_images(inputs.tr.x, cfg.precise_bn, cfg.seed)
    contrastive_rows = None
    record["normalization"] = None
    if cfg.regime in ("finetune", "cost-sensitive"):
        model = _classifier(cfg, inputs)
        loss = (losses.make_loss("cost_matrix", cost_matrix=inputs.cost) if cfg.cost_matrix
                else "categorical_crossentropy")
    else:
        normalization = None
        if cfg.variant == "thesis":
            normalization = channel_statistics(inputs.tr.x)   # the study's Normalization.adapt
        record["normalization"] = normalization
        encoder = models.build_encoder(cfg.model, inputs.input_shape, cfg.weights, cfg.variant,
                                       freeze=_FREEZE[cfg.freeze], normalization=normalization)
        if cfg.regime == "contrastive":
            contrastive_rows = _contrastive_phase(encoder, cfg, inputs, run, global_batch, steps,
                                                  bn_images, log, callbacks,
                                                  (lr_changed or {}).get("contrastive_lr"))
        model = models.build_contrastive_classifier(encoder, len(inputs.class_names),
                                                    train_encoder=cfg.regime == "baseline")
        loss = "categorical_crossentropy"
    model.compile(optimizer=_adam(cfg.lr), loss=loss, metrics=["accuracy"])
    record.update({"feature_layer": models.feature_layer_name(model),
                   "trainable_params": _count(model.trainable_weights),
                   "total_params": int(model.count_params())})
    files.write_json(run / "config.json", record)
    phase = _classifier_phase(cfg, inputs, run, global_batch, steps, bn_images, callbacks)
    phase.learning_rate = (lr_changed or {}).get("lr")
    result = fitting.run_phase(model, phase, log)
    return model, result, contrastive_rows


_FREEZE = {"auto": None, "study": True, "none": False}


def _adam(lr: float):
    import keras

    return keras.optimizers.Adam(learning_rate=lr)


def _classifier(cfg: TrainConfig, inputs: _Inputs):
    """finetune / cost-sensitive: a fresh backbone classifier, or the --init run's model."""
    if cfg.init:
        return _load_init_model(cfg.init, len(inputs.class_names), inputs.input_shape[:2])
    return models.build_model(cfg.model, len(inputs.class_names), inputs.input_shape, cfg.weights,
                              cfg.variant, freeze=_FREEZE[cfg.freeze])


def _classifier_phase(cfg: TrainConfig, inputs: _Inputs, run: Path, global_batch: int,
                      steps: int, bn_images: np.ndarray, callbacks: Sequence) -> fitting.Phase:
    """The classifier's fit: cross-entropy (or cost) on the train split, selected on val."""
    k = len(inputs.class_names)

    def batches(start: int, stop: int):
        return make_train_dataset(inputs.tr.x, inputs.tr.y, global_batch, cfg.seed, (start, stop),
                                  num_classes=k,
                                  augment=None if cfg.online_augment == "none" else cfg.online_augment,
                                  class_weight=inputs.class_weight)

    return fitting.Phase(
        name="classifier", run=run, dataset_fn=batches, steps=steps, epochs=cfg.epochs,
        columns=HISTORY_COLUMNS, history_path=run / "history.csv",
        val_ds=make_eval_dataset(inputs.va.x, inputs.va.y, global_batch, num_classes=k),
        monitor=cfg.monitor, keep=cfg.keep, patience=cfg.patience, lr_patience=cfg.lr_patience,
        lr_factor=cfg.lr_factor, min_lr=cfg.min_lr,
        precise_bn=(fitting.PreciseBatchNorm(bn_images, global_batch, "test")
                    if cfg.precise_bn else None),
        callbacks=callbacks, verbose=cfg.verbose, tensorboard=cfg.tensorboard)


def _contrastive_phase(encoder, cfg: TrainConfig, inputs: _Inputs, run: Path, global_batch: int,
                       steps: int, bn_images: np.ndarray, log, callbacks,
                       new_lr: Optional[float] = None) -> List[dict]:
    """Phase 1: encoder + projection head trained with a contrastive loss on two views per image."""
    projector = models.add_projection_head(encoder, cfg.projection_dim,
                                           activation="relu" if cfg.variant == "thesis" else None)
    projector.compile(optimizer=_adam(cfg.contrastive_lr), loss=_contrastive_loss(cfg))

    def views(start: int, stop: int):
        if cfg.contrastive_views == 1:      # the study: one pass through its augmentation block
            return make_train_dataset(inputs.tr.x, inputs.tr.y, global_batch, cfg.seed,
                                      (start, stop), num_classes=None, augment="study")
        return make_train_dataset(inputs.tr.x, inputs.tr.y, global_batch, cfg.seed, (start, stop),
                                  num_classes=None, views=2)

    phase = fitting.Phase(
        name="contrastive", run=run, dataset_fn=views, steps=steps,
        epochs=cfg.contrastive_epochs, columns=CONTRASTIVE_COLUMNS,
        history_path=run / "contrastive_history.csv",
        precise_bn=(fitting.PreciseBatchNorm(bn_images, global_batch, "epoch")
                    if cfg.precise_bn else None),
        callbacks=callbacks, verbose=cfg.verbose, tensorboard=cfg.tensorboard,
        learning_rate=new_lr)
    return fitting.run_phase(projector, phase, log).rows


def _contrastive_loss(cfg: TrainConfig):
    """The phase-1 loss by name (cervical.losses), with this run's temperature/margin/mining."""
    if cfg.loss == "triplet":
        return losses.make_loss("triplet", margin=cfg.margin, mining=cfg.mining)
    if cfg.loss == "npairs":
        return losses.make_loss("npairs", temperature=cfg.temperature)
    return losses.make_loss("supcon", temperature=cfg.temperature,
                            base_temperature=cfg.temperature)


def _count(variables) -> int:
    return int(sum(int(np.prod(v.shape)) for v in variables))


def _plot_history(cfg: TrainConfig, run: Path, result: fitting.PhaseResult,
                  contrastive_rows: Optional[List[dict]]) -> None:
    """loss.png, accuracy.png (and contrastive_loss.png): the curves with the kept epoch marked."""
    kept = result.kept_epoch
    _plot(run / "loss.png", result.rows, [("loss", "train"), ("val_loss", "validation")], "loss",
          f"{cfg.model} {cfg.regime}: loss", kept, cfg.keep)
    _plot(run / "accuracy.png", result.rows, [("accuracy", "train"),
                                              ("val_accuracy", "validation")],
          "accuracy", f"{cfg.model} {cfg.regime}: accuracy", kept, cfg.keep)
    if contrastive_rows:
        _plot(run / "contrastive_loss.png", contrastive_rows, [("loss", f"{cfg.loss} loss")],
              "contrastive loss", f"{cfg.model} phase 1 ({cfg.loss}, tau {cfg.temperature:g})")


def _plot(path: Path, rows: Sequence[dict], series: Sequence[Tuple[str, str]], ylabel: str,
          title: str, kept_epoch: Optional[int] = None, keep: str = "best") -> None:
    """One line plot per (column, label) over epochs, saved atomically as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.add_subplot(111)
    epochs = [r["epoch"] for r in rows]
    for col, label in series:
        values = [r.get(col, float("nan")) for r in rows]
        if any(math.isfinite(v) for v in values):
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
    if kept_epoch is not None:
        ax.axvline(kept_epoch, color="grey", linestyle="--", linewidth=1,
                   label=f"{'best' if keep == 'best' else 'last'} epoch {kept_epoch} (kept)")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    files.save_figure(fig, path, dpi=120, tight=False)


def _summary(cfg: TrainConfig, inputs: _Inputs, run: Path, result: fitting.PhaseResult,
             contrastive_rows: Optional[List[dict]], seconds: float) -> dict:
    """summary.json: the kept epoch and its validation scores, epochs run, time."""
    rows = result.rows
    kept_row = next((r for r in rows if r["epoch"] == result.kept_epoch), rows[-1] if rows else {})
    return {"run": str(run), "model": cfg.model, "regime": cfg.regime, "variant": cfg.variant,
            "loss": cfg.loss, "best_epoch": result.best_epoch, "kept_epoch": result.kept_epoch,
            "keep": cfg.keep, "epochs_run": result.epochs_run, "max_epochs": cfg.epochs,
            "val_loss": kept_row.get("val_loss"), "val_accuracy": kept_row.get("val_accuracy"),
            "train_images": len(inputs.tr), "val_images": len(inputs.va),
            "seconds": seconds, "seconds_per_epoch": result.epoch_seconds,
            "contrastive_epochs_run": len(contrastive_rows) if contrastive_rows else None,
            "selected_on": cfg.monitor}


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
    """model.keras, atomically (Keras needs the .keras suffix on the temporary name too)."""
    with files.atomic_path(path, keep_suffix=True) as tmp:
        model.save(tmp)


def format_summary(summary: dict) -> str:
    """One line: what was trained, the selected epoch and its validation scores, time, folder."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    phase1 = (f", {summary['contrastive_epochs_run']} contrastive epochs ({summary['loss']})"
              if summary.get("contrastive_epochs_run") else "")
    per_epoch = summary.get("seconds_per_epoch")
    timing = f"{summary['seconds']:.1f} s" + (f" ({per_epoch:.1f} s/epoch)" if per_epoch else "")
    return (f"trained {summary['model']} ({summary['regime']}, {summary['variant']}){phase1}: "
            + (f"kept the last epoch ({summary['kept_epoch']}/{summary['epochs_run']})"
               if summary.get("keep") == "last" else
               f"best epoch {summary['best_epoch']}/{summary['epochs_run']} on "
               f"{summary['selected_on']}")
            + f", val_loss {fmt(summary['val_loss'])}, val_accuracy {fmt(summary['val_accuracy'])}; "
            f"{timing}; " + (f"run folder {summary['run']}" if summary.get("worker") is None else
                             f"worker {summary['worker']}: the chief writes the run folder"))
