"""cervical.protocol: the study's protocol and ours, each choice checked against docs/study.md."""

import dataclasses

import pytest

from cervical import protocol as P


def test_the_study_protocol_as_docs_study_md_describes_it():
    """§1: its exact split, stretch + nearest (Keras load_img), JPEG 95; §2: augmentation of the
    raw crops in OpenCV's BGR order with imgaug's black gaps; §3: the last epoch, no BatchNorm
    re-estimate, early stopping patience 3 except VGG19 fine-tuning and ResNet50 cost-sensitive,
    test-label class weights; §4: the encoders from scratch, selected on the training loss, with
    the in-model augmentation, one view, the N-pairs loss."""
    s = P.STUDY
    assert s.prepare_options() == {"resize": "stretch", "interpolation": "nearest",
                                   "split": "manifest:thesis", "augment_at": "raw",
                                   "fill": "black", "jpeg_quality": 95, "augment_order": "bgr"}
    assert s.train_options("vgg16", "finetune") == {
        "monitor": "val_loss", "keep": "last", "patience": 3, "online_augment": "none",
        "contrastive_views": 1, "precise_bn": 0}
    assert s.train_options("vgg19", "finetune")["patience"] == 0
    assert s.train_options("resnet50", "cost-sensitive")["patience"] == 0
    assert s.train_options("resnet50", "finetune")["patience"] == 3
    enc = s.train_options("densenet169", "contrastive")
    assert (enc["monitor"], enc["online_augment"], enc["loss"]) == ("loss", "study", "npairs")
    assert s.default_weights("vgg16", "contrastive") == "none"
    assert s.default_weights("vgg16", "finetune") == "imagenet"
    assert s.class_weights_default(study_classes=True) == "thesis"
    assert s.class_weights_default(study_classes=False) == "train"


def test_our_protocol_fixes_each_flaw():
    o = P.OURS
    assert o.prepare_options() == {"resize": "pad", "interpolation": "area", "split": "grouped",
                                   "augment_at": "target", "fill": "border", "jpeg_quality": 0,
                                   "augment_order": "rgb"}
    opts = o.train_options("vgg19", "contrastive")
    assert opts == {"monitor": "val_loss", "keep": "best", "patience": 3,
                    "online_augment": "none", "contrastive_views": 2, "precise_bn": 1024,
                    "loss": "supcon"}
    assert o.default_weights("tiny", "finetune") == "none"
    assert o.default_weights("mobilenetv2", "contrastive") == "imagenet"
    assert o.class_weights_default(study_classes=True) == "train"


def test_protocols_by_variant_name_and_immutable():
    assert P.PROTOCOLS["thesis"] is P.STUDY and P.PROTOCOLS["standard"] is P.OURS
    assert {p.variant for p in P.PROTOCOLS.values()} == set(P.PROTOCOLS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.STUDY.keep = "best"
    # the two differ in every field but the shared early-stopping patience
    same = [f.name for f in dataclasses.fields(P.Protocol)
            if getattr(P.STUDY, f.name) == getattr(P.OURS, f.name)]
    assert same == ["patience"]


def test_the_rest_of_the_package_reads_the_protocols():
    from cervical import data, train

    assert data.PREPARE_VARIANTS["thesis"] == P.STUDY.prepare_options()
    assert train.protocol_options("standard", "tiny", "finetune") == \
        P.OURS.train_options("tiny", "finetune")
    assert train.THESIS_NO_EARLY_STOPPING == P.STUDY.no_early_stopping
