"""The study's protocol and ours, as two named objects: every choice in one place.

A protocol is data, not branches. ``STUDY`` holds what the study's code did (docs/study.md, the
section cited beside each field), ``OURS`` what this package does by default to fix it. The rest
of the package reads a field (``protocol.keep``) instead of testing ``variant == "thesis"``:

    prepare --variant thesis   ->  PROTOCOLS["thesis"].prepare_options()
    train --variant thesis     ->  PROTOCOLS["thesis"].train_options(model, regime), and its
                                   default_weights and class_weights_default
    audit                      ->  arms that take the study's split, preparation or procedure

The variant names ("standard" for ours, "thesis" for the study's) are the values of the
``--variant`` flags and of ``config.json``; ``name`` is the word the reports use.

This module imports nothing from the package and no third-party library.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import FrozenSet, Mapping, Tuple

__all__ = ["Protocol", "OURS", "STUDY", "PROTOCOLS", "ENCODER_REGIMES"]

#: Regimes whose encoder the study trained from scratch with its in-model augmentation, selected
#: on the training loss (docs/study.md §4).
ENCODER_REGIMES = ("contrastive", "baseline")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every choice that differs between the study's protocol and ours.

    Preparation (``prepare``; docs/study.md §1-§2):
        split: "manifest:thesis" (the study's exact cell-level membership) or "grouped".
        resize, interpolation: "stretch" + "nearest" (Keras ``load_img``) or "pad" + "area".
        augment_at: "raw" (the raw crop, before resizing) or "target" (the resized cell).
        fill: gaps of rotations and shifts: "black" (imgaug's default) or "border".
        jpeg_quality: 95 (every image re-encoded as .jpg) or 0 (lossless).
        augment_order: "bgr" (OpenCV arrays fed to RGB augmenters) or "rgb".

    Training (``train``; docs/study.md §3-§4):
        variant: the model variant and the value of ``--variant``: "thesis" (the study's taps,
            freeze points, heads and raw 0-255 input) or "standard" (full backbone, its own
            ``preprocess_input``).
        keep: weights kept at the end: "last" epoch or "best" on the monitor.
        precise_bn: training images behind re-estimated BatchNorm statistics before every
            validation; 0 keeps Keras' moving averages.
        patience: early-stopping patience on the monitor.
        no_early_stopping: (model, regime) runs that had none (patience 0).
        encoder_monitor: the monitor of the contrastive and baseline regimes ("loss": the
            training loss, as the study; "val_loss").
        encoder_online_augment: their augmentation of every batch ("study": its in-model block).
        encoder_weights: their encoder's starting weights when none are given ("none": from
            scratch, as the study; None: the regular default).
        contrastive_views: augmented views per image in contrastive phase 1.
        contrastive_loss: "npairs" (the study's) or "supcon".
        class_weights: cost-sensitive weights when none are given on the study's five classes:
            "thesis" (its constants, from test labels) or "train".
    """

    name: str
    variant: str
    split: str
    resize: str
    interpolation: str
    augment_at: str
    fill: str
    jpeg_quality: int
    augment_order: str
    keep: str
    precise_bn: int
    patience: int
    no_early_stopping: FrozenSet[Tuple[str, str]]
    encoder_monitor: str
    encoder_online_augment: str
    encoder_weights: object
    contrastive_views: int
    contrastive_loss: str
    class_weights: str

    def prepare_options(self) -> dict:
        """The ``prepare`` options this protocol decides."""
        return {"resize": self.resize, "interpolation": self.interpolation, "split": self.split,
                "augment_at": self.augment_at, "fill": self.fill,
                "jpeg_quality": self.jpeg_quality, "augment_order": self.augment_order}

    def train_options(self, model: str, regime: str) -> dict:
        """The training procedure for ``model`` and ``regime``, as TrainConfig fields."""
        encoder = regime in ENCODER_REGIMES
        options = {"monitor": self.encoder_monitor if encoder else "val_loss",
                   "keep": self.keep,
                   "patience": 0 if (model, regime) in self.no_early_stopping else self.patience,
                   "online_augment": self.encoder_online_augment if encoder else "none",
                   "contrastive_views": self.contrastive_views,
                   "precise_bn": self.precise_bn}
        if regime == "contrastive":
            options["loss"] = self.contrastive_loss
        return options

    def default_weights(self, model: str, regime: str) -> str:
        """Backbone weights when none are given: "none" for tiny (it has no pretrained ones) and
        for encoders this protocol trains from scratch; "imagenet" otherwise."""
        if model == "tiny":
            return "none"
        if regime in ENCODER_REGIMES and self.encoder_weights is not None:
            return str(self.encoder_weights)
        return "imagenet"

    def class_weights_default(self, study_classes: bool) -> str:
        """Cost-sensitive weights when none are given: the protocol's on the study's five classes
        (``study_classes``), the training labels' otherwise (no other class set has constants)."""
        return self.class_weights if study_classes else "train"


#: The study's code (docs/study.md §1-§4).
STUDY = Protocol(
    name="study", variant="thesis",
    split="manifest:thesis", resize="stretch", interpolation="nearest", augment_at="raw",
    fill="black", jpeg_quality=95, augment_order="bgr",
    keep="last", precise_bn=0, patience=3,
    no_early_stopping=frozenset({("vgg19", "finetune"), ("resnet50", "cost-sensitive")}),
    encoder_monitor="loss", encoder_online_augment="study", encoder_weights="none",
    contrastive_views=1, contrastive_loss="npairs", class_weights="thesis")

#: This package's defaults (each fixing one of the study's flaws; docs/study.md "What we do").
OURS = Protocol(
    name="ours", variant="standard",
    split="grouped", resize="pad", interpolation="area", augment_at="target",
    fill="border", jpeg_quality=0, augment_order="rgb",
    keep="best", precise_bn=1024, patience=3, no_early_stopping=frozenset(),
    encoder_monitor="val_loss", encoder_online_augment="none", encoder_weights=None,
    contrastive_views=2, contrastive_loss="supcon", class_weights="train")

#: By variant name (the ``--variant`` flag's values).
PROTOCOLS: Mapping[str, Protocol] = MappingProxyType({"standard": OURS, "thesis": STUDY})
