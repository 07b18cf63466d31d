"""One home for every option: a dataclass per command whose fields carry their flag, help, choices
and range, and the command line built from those fields.

Adding an option is adding one field: its default, type, choices and range are declared once
(``option(...)``), ``add_arguments`` turns it into a flag, ``check`` validates it with the same
metadata (a one-line error naming the flag), and ``config.json`` is ``dataclasses.asdict`` of the
object. The literal choice lists live here, not in the TensorFlow modules, so ``--help`` starts
without TensorFlow; tests check them against the library.

This module imports nothing from the package that imports TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

__all__ = ["option", "add_arguments", "check", "int_in", "float_in", "TrainConfig",
           "MODEL_CHOICES", "REGIME_CHOICES", "VARIANT_CHOICES"]

#: The models and regimes (cervical.models.MODEL_NAMES, cervical.train.REGIMES; a test checks).
MODEL_CHOICES = ("tiny", "vgg16", "vgg19", "resnet50", "mobilenetv2", "densenet169")
REGIME_CHOICES = ("finetune", "cost-sensitive", "contrastive", "baseline")
VARIANT_CHOICES = ("standard", "thesis")


def option(default: Any = dataclasses.MISSING, help: str = "", *, kind: type = str,
           choices: Optional[Sequence] = None, low: Optional[float] = None,
           limit: Optional[str] = None, high: Optional[float] = None, low_open: bool = False,
           flag: Optional[str] = None, metavar: Optional[str] = None, const: Any = None,
           group: str = "", cli: bool = True, show_default: bool = True,
           accept: Sequence = ()) -> Any:
    """A dataclass field that also describes its command-line flag.

    Args:
        default: the default (omitted: a required option).
        help: the flag's help (the default is appended unless ``show_default`` is False).
        kind: int, float, str or bool (bool: a switch; default True gives ``--no-NAME``).
        choices: allowed values (None is always allowed when it is the default).
        low, limit, high, low_open: numeric range: >= low (> low with low_open) and <= high or
            <= cervical.LIMITS[limit].
        flag: the flag when not ``--field-name``.
        metavar, const: as argparse (const with nargs "?": the flag alone means const).
        group: the help section the flag is listed in.
        cli: False for fields the command line does not set.
        accept: further values the library takes but the flag does not offer.
    """
    meta = {"help": help, "kind": kind, "choices": None if choices is None else tuple(choices),
            "low": low, "limit": limit, "high": high, "low_open": low_open, "flag": flag,
            "metavar": metavar, "const": const, "group": group, "cli": cli,
            "show_default": show_default, "accept": tuple(accept)}
    return dataclasses.field(default=default, metadata=meta)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _bounds(meta: dict) -> Tuple[Optional[float], Optional[float]]:
    from cervical import LIMITS

    high = LIMITS.get(meta["limit"]) if meta.get("limit") else meta.get("high")
    return meta.get("low"), high


def int_in(low: int, limit: str = "") -> Callable[[str], int]:
    """argparse type: an integer >= low (and <= cervical.LIMITS[limit]), checked before any work."""
    return _number_type(int, {"low": low, "limit": limit or None, "high": None, "low_open": False})


def float_in(low: float, limit: str = "", low_open: bool = False,
             high: Optional[float] = None) -> Callable[[str], float]:
    """argparse type: a finite number above low (strictly with low_open) and below its limit."""
    return _number_type(float, {"low": low, "limit": limit or None, "high": high,
                                "low_open": low_open})


def _range_problem(value: float, meta: dict) -> Optional[str]:
    """Why ``value`` is outside the range of ``meta``, or None."""
    low, high = _bounds(meta)
    bad_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    if not math.isfinite(value) or bad_low or (high is not None and value > high):
        parts = [] if low is None else [f"{'>' if meta.get('low_open') else '>='} {_num(low)}"]
        parts += [] if high is None else [f"<= {_num(high)}"]
        return "must be " + ("a finite number " if isinstance(value, float) else "") + \
            " and ".join(parts)
    return None


def _num(x: float) -> str:
    """A bound as written: 1, 4294967295, 0.999, 1e-05."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _number_type(kind: type, meta: dict) -> Callable[[str], Union[int, float]]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        problem = _range_problem(value, meta)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    parse.__name__ = "integer" if kind is int else "number"
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per command-line field of the dataclass ``cls``, grouped by ``group``."""
    groups = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        group = meta["group"]
        if group and group not in groups:
            groups[group] = parser.add_argument_group(group)
        _add_one(groups.get(group, parser), f)


def _add_one(target, f: dataclasses.Field) -> None:
    meta, kwargs = f.metadata, {"dest": f.name}
    required = f.default is dataclasses.MISSING
    if meta["kind"] is bool:
        kwargs["action"] = "store_false" if f.default else "store_true"
        target.add_argument(_flag(f), help=meta["help"], **kwargs)
        return
    if meta["kind"] in (int, float) and (meta["low"] is not None or meta["limit"]):
        kwargs["type"] = _number_type(meta["kind"], meta)
    elif meta["kind"] is int:
        kwargs["type"] = int
    if meta["choices"] is not None:
        kwargs["choices"] = list(meta["choices"])
    if meta["const"] is not None:
        kwargs.update(nargs="?", const=meta["const"])
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    text = meta["help"]
    if not required and meta["show_default"]:
        text += " (default: %(default)s)"
    target.add_argument(_flag(f), required=required,
                        default=None if required else f.default, help=text, **kwargs)


def check(obj: Any, error: Callable[[str], Exception]) -> None:
    """Validate every declared choice and range of a dataclass object; raise ``error(one line)``
    naming the flag. None passes when it is the field's default."""
    for f in dataclasses.fields(obj):
        meta, value = f.metadata, getattr(obj, f.name)
        if not meta or (value is None and f.default is None):
            continue
        allowed = tuple(meta.get("choices") or ()) + tuple(meta.get("accept") or ())
        if meta.get("choices") is not None and value not in allowed:
            raise error(f"{_flag(f)} {value!r}: unknown; choose one of "
                        f"{', '.join(map(str, meta['choices']))}")
        if meta.get("kind") in (int, float) and (meta.get("low") is not None or meta.get("limit")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(f"{_flag(f)} {value!r}: must be a number")
            if meta["kind"] is int and float(value) != int(value):
                raise error(f"{_flag(f)} {value!r}: must be an integer")
            problem = _range_problem(value, meta)
            if problem:
                raise error(f"{_flag(f)} {value}: {problem}")


# ------------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------------

_RUN, _MODEL, _SCHEDULE, _COST, _CONTRASTIVE, _PROCEDURE, _SYSTEM = (
    "run", "model", "schedule", "cost-sensitive", "contrastive",
    "procedure (--variant decides the defaults)", "execution")


@dataclasses.dataclass
class TrainConfig:
    """Every argument of a training run (saved to RUN/config.json); each field is also the flag
    of ``cli.py train`` (its help below is the flag's).

    Defaults that depend on the model, regime or variant are None here and settled by
    cervical.protocol: weights, lr, patience, monitor, keep, loss, online_augment,
    contrastive_views, precise_bn, class_weights (see cervical.train).
    """

    data: str = option(help="prepared dataset folder (cli.py prepare)", group=_RUN)
    out: str = option(help="run folder to write", group=_RUN)
    model: Optional[str] = option(
        None, "backbone, or tiny (a small CPU CNN); required unless --init names a run",
        choices=MODEL_CHOICES, group=_MODEL, show_default=False)
    regime: str = option(
        "finetune", "finetune | cost-sensitive (class weights / cost matrix) | contrastive (two "
        "phases) | baseline (the contrastive classifier end to end)", choices=REGIME_CHOICES,
        group=_RUN)
    variant: str = option(
        "standard", "thesis: the study's protocol (its tap layers, raw 0-255 input, last epoch, "
        "moving BatchNorm averages, ...; cervical.protocol); standard: ours",
        choices=VARIANT_CHOICES, group=_PROCEDURE)
    weights: Optional[str] = option(
        None, "imagenet | none | PATH to the backbone's no-top .h5 (default: imagenet; none for "
        "tiny and the thesis contrastive/baseline encoders)", group=_MODEL, show_default=False)
    freeze: str = option(
        "auto", "freeze the study's first 13/17/86/100/249 backbone layers; auto: only with "
        "pretrained weights", choices=("auto", "study", "none"), group=_MODEL)
    epochs: int = option(50, "maximum classifier epochs", kind=int, low=1, limit="epochs",
                         group=_SCHEDULE)
    batch_size: int = option(32, "images per device per step", kind=int, low=1,
                             limit="batch_size", group=_SCHEDULE)
    lr: Optional[float] = option(
        None, "Adam learning rate (default: 1e-3 finetune/cost-sensitive, 1e-4 "
        "contrastive/baseline)", kind=float, low=0.0, low_open=True, limit="lr", group=_SCHEDULE,
        show_default=False)
    patience: Optional[int] = option(
        None, "early-stopping patience on --monitor, 0 = off (default: 3; 0 for the two study "
        "runs without early stopping under --variant thesis)", kind=int, low=0,
        limit="patience", group=_PROCEDURE, show_default=False)
    lr_patience: int = option(2, "epochs without improvement before the LR is reduced, 0 = off",
                              kind=int, low=0, limit="patience", group=_SCHEDULE)
    lr_factor: float = option(0.2, "LR reduction factor", kind=float, low=0.0, low_open=True,
                              high=0.999, group=_SCHEDULE)
    min_lr: float = option(1e-5, "LR floor", kind=float, low=0.0, limit="lr", group=_SCHEDULE)
    monitor: Optional[str] = option(
        None, "quantity for early stopping, LR schedule and best-epoch selection (default: "
        "val_loss; the training loss under --variant thesis for the contrastive and baseline "
        "regimes, as the study)", choices=("val_loss", "val_accuracy", "loss"), group=_PROCEDURE,
        show_default=False)
    keep: Optional[str] = option(
        None, "weights saved at the end: the best epoch on --monitor or the last one (default: "
        "best; last under --variant thesis, as the study)", choices=("best", "last"),
        group=_PROCEDURE, show_default=False)
    class_weights: Optional[str] = option(
        None, "cost-sensitive: train-label balanced weights, the study's constants, none, or a "
        "JSON {class: weight} (default: train; thesis under --variant thesis on SIPaKMeD's "
        "classes)", metavar="train|thesis|none|FILE.json", group=_COST, show_default=False)
    cost_matrix: Optional[str] = option(
        None, "cost-sensitive: KxK costs (JSON or CSV; rows true, columns predicted): train on "
        "the expected cost", metavar="FILE", group=_COST, show_default=False)
    init: Optional[str] = option(
        None, "start from RUN/model.keras (e.g. cost-sensitive after finetune, as the study did)",
        metavar="RUN", group=_RUN, show_default=False)
    loss: Optional[str] = option(
        None, "contrastive loss (default: supcon; npairs, the study's, under --variant thesis)",
        choices=("npairs", "supcon", "triplet"), group=_CONTRASTIVE, show_default=False)
    temperature: float = option(0.05, "contrastive temperature", kind=float, low=0.0,
                                low_open=True, limit="temperature", group=_CONTRASTIVE)
    margin: float = option(0.2, "triplet margin", kind=float, low=0.0, limit="margin",
                           group=_CONTRASTIVE)
    mining: str = option("semi_hard", "triplet mining",
                         choices=("semi_hard", "batch_hard", "batch_all"), group=_CONTRASTIVE)
    contrastive_epochs: int = option(50, "phase-1 epochs", kind=int, low=1, limit="epochs",
                                     group=_CONTRASTIVE)
    contrastive_lr: float = option(1e-4, "phase-1 learning rate", kind=float, low=0.0,
                                   low_open=True, limit="lr", group=_CONTRASTIVE)
    projection_dim: int = option(128, "projection head width", kind=int, low=1,
                                 limit="projection_dim", group=_CONTRASTIVE)
    online_augment: Union[bool, str, None] = option(
        None, "augmentation of every training batch: light (flips, transposes, crops, "
        "brightness/contrast; the flag alone), study (the study's in-model flip, rotation 0.02, "
        "width/height 0.2) or none (default: none; study for the thesis variant of the "
        "contrastive and baseline regimes)", choices=("none", "light", "study"), const="light",
        group=_PROCEDURE, show_default=False, accept=(True, False))
    contrastive_views: Optional[int] = option(
        None, "augmented views per image in contrastive phase 1 (default: 2; 1 under --variant "
        "thesis, as the study)", kind=int, choices=(1, 2), group=_PROCEDURE, show_default=False)
    precise_bn: Optional[int] = option(
        None, "re-estimate BatchNorm statistics on N training images before every validation, "
        "0 = Keras' moving averages (default: 1024; 0 with --variant thesis, as the study)",
        kind=int, low=0, limit="precise_bn", metavar="N", group=_PROCEDURE, show_default=False)
    seed: int = option(42, "run seed", kind=int, low=0, limit="seed", group=_RUN)
    deterministic: bool = option(True, "allow non-deterministic TensorFlow ops (faster on some "
                                 "GPUs)", kind=bool, flag="--no-deterministic", group=_SYSTEM)
    strategy: str = option(
        "auto", "tf.distribute: mirrored = all local GPUs, multiworker = the workers in TF_CONFIG "
        "(run the same command on each; only the chief writes --out); auto = mirrored with 2+ "
        "GPUs", choices=("auto", "default", "mirrored", "multiworker"), group=_SYSTEM)
    mixed_precision: bool = option(False, "float16 compute on GPUs (bfloat16 on CPU), float32 "
                                   "variables", kind=bool, group=_SYSTEM)
    resume: bool = option(False, "continue the interrupted run in --out from its last completed "
                          "epoch", kind=bool, group=_RUN)
    overwrite: bool = option(False, "replace an existing run in --out", kind=bool, group=_RUN)
    tensorboard: bool = option(False, "write TensorBoard logs to OUT/tensorboard", kind=bool,
                               group=_SYSTEM)
    verbose: int = option(0, "0 silent, 1 Keras progress bar, 2 one line per epoch", kind=int,
                          cli=False)


# ------------------------------------------------------------------------------------------------
# audit
# ------------------------------------------------------------------------------------------------

_DATA, _ARMS, _LEAK, _TRAINING = ("data", "arms and controls", "the leak design", "training")

#: The synthetic generator's settings (cervical.synthetic.DIFFICULTIES; a test checks the match).
SYNTHETIC_CHOICES = ("default", "hard", "hard-uniform")


@dataclasses.dataclass
class AuditConfig:
    """The arguments of one audit (cervical.audit); each field is also the flag of
    ``cli.py audit`` and is recorded in audit.json."""

    data_dir: Optional[str] = option(
        None, "raw SIPaKMeD folder (default with --dataset synthetic: generate the full-size "
        "synthetic set with the study's file names)", group=_DATA, show_default=False)
    dataset: str = option("synthetic", "raw data layout", choices=("synthetic", "sipakmed"),
                          group=_DATA)
    model: str = option("tiny", "the model every arm trains", choices=MODEL_CHOICES,
                        group=_TRAINING)
    regime: str = option("finetune", "training regime; cost-sensitive continues each arm's "
                         "fine-tuned run", choices=REGIME_CHOICES, group=_TRAINING)
    seeds: int = option(3, "runs per protocol arm (each its own seed: 0, 1, ...)", kind=int,
                        low=1, limit="seeds", flag="--runs-per-arm", group=_ARMS)
    folds: int = option(5, "grouped folds of the randomised-leak design; every cluster image is "
                        "tested once, then once more crossed", kind=int, low=2, limit="folds",
                        group=_LEAK)
    leak_cells: int = option(2, "cells per leaked test cluster moved to training, and per "
                             "held-out cluster set aside", kind=int, low=1, limit="augment",
                             group=_LEAK)
    epochs: int = option(50, "maximum epochs (the study's)", kind=int, low=1, limit="epochs",
                         group=_TRAINING)
    size: int = option(110, "image side", kind=int, low=8, limit="size", group=_TRAINING)
    augment: int = option(6, "augmented copies per training image", kind=int, low=0,
                          limit="augment", group=_TRAINING)
    batch_size: int = option(32, "images per step", kind=int, low=1, limit="batch_size",
                             group=_TRAINING)
    out: str = option("outputs/audit", "audit folder", group=_DATA)
    synthetic: str = option(
        "hard", "generated data: hard (cluster images differ strongly and share a phenotype, "
        "classes overlap), default (the easy set) or hard-uniform (nothing shared within a "
        "cluster image)", choices=SYNTHETIC_CHOICES, group=_DATA)
    per_class: int = option(0, "generated data: cells per class; 0 = SIPaKMeD's 4049 with the "
                            "study's file names", kind=int, low=0, limit="per_class", group=_DATA)
    weights: Optional[str] = option(None, "backbone weights: imagenet | none | FILE (default: "
                                    "train's)", group=_TRAINING, show_default=False)
    n_boot: int = option(2000, "bootstrap resamples of every interval", kind=int, low=0,
                         limit="n_boot", group=_ARMS)
    factorial: bool = option(False, "train all 8 (split, preparation, procedure) arms instead "
                             "of moving one factor at a time", kind=bool, group=_ARMS)
    controls: bool = option(True, "skip the negative control (the leak design on data where a "
                            "leak cannot help); the report then says nothing was checked",
                            kind=bool, flag="--no-controls", group=_ARMS)
    leak_procedure: str = option(
        "study", "training procedure of the leak design's runs: the study's (a cell-level "
        "validation split, the last epoch, no PreciseBN) or ours (grouped validation, best "
        "epoch)", choices=("study", "ours"), group=_LEAK)
    decompose: bool = option(True, "run only the leak design (and its negative control), not "
                             "the protocol arms", kind=bool, flag="--leak-only", group=_ARMS)
    seed: int = option(0, "seed of the generated cells and of the leak design's folds and coins",
                       kind=int, low=0, limit="seed", group=_DATA)
