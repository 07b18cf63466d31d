"""The study's five ImageNet backbones and ``tiny``, as flat Keras models that take raw RGB pixels.

Thesis section 3.1 and Table 6.1; what the study's code really built is in docs/study.md §3
(fine-tuning) and §4 (contrastive). Every model here:

* takes raw RGB pixels, float 0..255, shape (H, W, 3): the preprocessing is a layer inside the model
  (``Preprocess``), so a saved model, the evaluation, the CAMs and LIME all feed the same input;
* is FLAT: the backbone's layers sit directly in the functional graph (the keras.applications model
  is built on the preprocessed tensor with ``input_tensor=``), so ``model.get_layer(name)`` reaches
  any backbone layer, in particular the last feature map that the CAM code needs
  (``feature_layer_name``);
* is made of stock Keras layers only (the preprocessing too, see ``preprocess_layer``), so a saved
  ``model.keras`` loads with plain ``keras.models.load_model(path)`` in safe mode, in a Python
  that has TensorFlow but not this package. (``Preprocess``, registered as
  "cervical>Preprocess", only serves run folders written by earlier versions.)

Two variants (``variant=``):

``"thesis"``  the study's models exactly: raw 0..255 input with no normalisation at all, the feature
              map tapped at the study's layer, the study's freeze point and the study's head:

              ===========  ===================  ===========  =====================================
              backbone     tapped layer         frozen       head
              ===========  ===================  ===========  =====================================
              vgg16        block4_conv3         layers[:13]  GlobalMaxPool-BN-Drop.5-Dense1024relu-
              vgg19        block5_conv2         layers[:17]  BN-Drop.5-Dense K softmax
              resnet50     conv4_block1_0_conv  layers[:86]  (same)
              mobilenetv2  out_relu (full)      layers[:100] GAP-Dense1024relu-Dense K softmax
              densenet169  relu (full)          layers[:249] (same)
              ===========  ===================  ===========  =====================================

              "layers[:N]" indexes the keras.applications model's own layer list (include_top=False,
              InputLayer at index 0), as the study indexed ``base_model.layers``.
``"standard"``  (default) the corrected models: the full backbone output and the backbone's own
              ``preprocess_input`` (caffe BGR mean subtraction for VGG/ResNet, [-1, 1] for
              MobileNetV2, torch-style mean/std for DenseNet), the same freeze points and heads.

Last feature map for CAMs (``feature_layer_name``): the last convolutional activation map before the
head's pooling,

    vgg16 "block5_conv3", vgg19 "block5_conv4", resnet50 "conv5_block3_out",
    mobilenetv2 "out_relu", densenet169 "relu", tiny "features";
    thesis variant: its tapped layer (vgg16 "block4_conv3", vgg19 "block5_conv2",
    resnet50 "conv4_block1_0_conv"; mobilenetv2/densenet169 as above).

``tiny`` is a small CNN (not from the study) for the demo, tests and CPU experiments: /255 scaling,
five 3x3 conv-BN-ReLU blocks (32 stride 2, 64, 128, 128, 128; 2x2 max-pooling after the first two),
global average pooling and a softmax Dense layer: 0.39 M parameters, about 80 M multiply-adds per
110 px image, a 13x13 feature map whose receptive field (65 px) stays local, so its CAMs can point
at the nucleus. Its "thesis" variant only drops the /255 scaling.

The contrastive regime (docs/study.md §4) uses ``build_encoder`` (backbone + global
average pooling; ``"thesis"``: full backbone with the study's per-channel standardisation adapted on
the training images), ``add_projection_head`` and ``build_contrastive_classifier``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import keras
from keras import layers, ops

__all__ = ["ModelError", "WeightsError", "BackboneSpec", "BACKBONES", "MODEL_NAMES", "VARIANTS",
           "Preprocess", "build_model", "build_encoder", "add_projection_head",
           "build_contrastive_classifier", "feature_layer_name", "check_input_size",
           "input_size_mismatch",
           "keras_cache_dir", "imagenet_weights_file", "resolve_weights", "study_layer_names",
           "preprocess_mode", "preprocess_layer", "preprocessing_of", "predict_proba",
           "as_probabilities", "load_model_file"]

VARIANTS = ("standard", "thesis")
TINY_MIN_SIZE = 8            # a stride-2 conv and two 2x2 poolings leave at least a 1x1 map
BACKBONE_MIN_SIZE = 32       # keras.applications' own minimum (five stride-2 stages)
_KERAS_APPS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
_MOBILENET_ROWS = (96, 128, 160, 192, 224)


class ModelError(ValueError):
    """Bad model argument; the message is one line naming the argument and the fix."""


class WeightsError(ModelError):
    """Pretrained weights could not be found or downloaded (one line: where to put the file)."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How the study used one keras.applications backbone (docs/study.md §3).

    Attributes:
        constructor: name of the keras.applications function.
        preprocess: ``Preprocess`` mode of the backbone's own preprocess_input ("caffe"|"tf"|"torch").
        feature_layer: last feature map of the full backbone (CAM target, variant "standard").
        thesis_tap: layer whose output the study fed to its head (variant "thesis").
        head: "maxpool_bn" (VGG/ResNet head) or "gap" (MobileNetV2/DenseNet169 head).
        freeze: the study froze ``base_model.layers[:freeze]``.
        n_layers: len(base_model.layers) with include_top=False (a consistency check).
        weights_dir: sub-folder of the keras-applications weight store.
    """

    constructor: str
    preprocess: str
    feature_layer: str
    thesis_tap: str
    head: str
    freeze: int
    n_layers: int
    weights_dir: str


BACKBONES: Dict[str, BackboneSpec] = {
    "vgg16": BackboneSpec("VGG16", "caffe", "block5_conv3", "block4_conv3", "maxpool_bn", 13, 19,
                          "vgg16/"),
    "vgg19": BackboneSpec("VGG19", "caffe", "block5_conv4", "block5_conv2", "maxpool_bn", 17, 22,
                          "vgg19/"),
    "resnet50": BackboneSpec("ResNet50", "caffe", "conv5_block3_out", "conv4_block1_0_conv",
                             "maxpool_bn", 86, 175, "resnet/"),
    "mobilenetv2": BackboneSpec("MobileNetV2", "tf", "out_relu", "out_relu", "gap", 100, 154,
                                "mobilenet_v2/"),
    "densenet169": BackboneSpec("DenseNet169", "torch", "relu", "relu", "gap", 249, 595,
                                "densenet/"),
}
MODEL_NAMES = ("tiny",) + tuple(BACKBONES)

# Candidate CAM layers, most specific first (a VGG19 model also holds block5_conv3, a VGG19 thesis
# model also holds block4_conv3, so the order matters).
_FEATURE_CANDIDATES = ("features", "block5_conv4", "block5_conv3", "block5_conv2", "block4_conv3",
                       "conv5_block3_out", "conv4_block1_0_conv", "out_relu", "relu")

# ImageNet statistics used by keras.applications' preprocess_input.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# Preprocessing inside the model
# ------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="cervical")
class Preprocess(layers.Layer):
    r"""Raw RGB 0..255 -> what the backbone expects: the definition of every preprocessing mode.

    New models are built with ``preprocess_layer`` (stock Keras layers, so their files load
    without this package); this class stays registered so that run folders written by earlier
    versions of this package still load, and as the reference the tests compare against.

    Modes (x is the raw RGB pixel value, per channel c):

        "none"         x                                    (the study's fine-tuning input)
        "scale"        x / 255                              (tiny)
        "caffe"        x_bgr - mean_bgr, mean_bgr = (103.939, 116.779, 123.68)
                                                            (VGG16/19, ResNet50 preprocess_input)
        "tf"           x / 127.5 - 1                        (MobileNetV2)
        "torch"        (x / 255 - mean_c) / std_c, mean = (0.485, 0.456, 0.406),
                       std = (0.229, 0.224, 0.225)           (DenseNet169)
        "standardize"  (x - mean_c) / max(std_c, 1e-7) with the given per-channel mean and std
                       (the study's contrastive encoders: a Normalization layer adapted on x_train)

    "caffe" also reverses the channel order (RGB -> BGR), exactly as keras.applications does.

    Args:
        mode: one of the modes above.
        mean, std: per-channel statistics (3 floats each), only for "standardize".
        **kwargs: keras Layer arguments (name, dtype; the layer computes in float32 by default).
    """

    MODES = ("none", "scale", "caffe", "tf", "torch", "standardize")

    def __init__(self, mode: str = "none", mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, **kwargs) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ModelError(f"Preprocess mode={mode!r}: choose one of {', '.join(self.MODES)}")
        if mode == "standardize":
            if mean is None or std is None or len(mean) != 3 or len(std) != 3:
                raise ModelError("Preprocess mode='standardize': pass mean and std, 3 floats each")
        self.mode = mode
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.mode == "none":
            return x
        if self.mode == "scale":
            return x / 255.0
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_MEAN_BGR, x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, x.dtype)
            return (x / 255.0 - mean) / std
        mean = ops.convert_to_tensor(self.mean, x.dtype)
        std = ops.maximum(ops.convert_to_tensor(self.std, x.dtype), 1e-7)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "mean": self.mean, "std": self.std}


def preprocess_mode(name: str, variant: str = "standard") -> str:
    """The ``Preprocess`` mode a model uses: the backbone's own, "none" for the thesis variant.

    Args:
        name: one of MODEL_NAMES.
        variant: "standard" or "thesis".
    Returns:
        "scale" (tiny), "caffe", "tf", "torch", or "none" (thesis).
    """
    _check_name_variant(name, variant)
    if variant == "thesis":
        return "none"
    return "scale" if name == "tiny" else BACKBONES[name].preprocess


# ------------------------------------------------------------------------------------------------
# Argument checks and pretrained weights
# ------------------------------------------------------------------------------------------------

def _check_name_variant(name: str, variant: str) -> None:
    if name not in MODEL_NAMES:
        raise ModelError(f"--model {name!r}: unknown; choose one of {', '.join(MODEL_NAMES)}")
    if variant not in VARIANTS:
        raise ModelError(f"--variant {variant!r}: unknown; choose one of {', '.join(VARIANTS)}")


def check_input_size(name: str, input_shape: Sequence[int]) -> Tuple[int, int, int]:
    """Check that images of ``input_shape`` fit the model; return it as a tuple.

    Args:
        name: one of MODEL_NAMES.
        input_shape: (H, W, 3).
    Returns:
        (H, W, 3) as ints.
    Raises:
        ModelError: not (H, W, 3), or a side below the model's minimum (32 px for the five
            backbones, keras.applications' own limit; 8 px for tiny).
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ModelError(f"input_shape={shape}: must be (height, width, 3) RGB")
    minimum = TINY_MIN_SIZE if name == "tiny" else BACKBONE_MIN_SIZE
    if min(shape[:2]) < minimum:
        raise ModelError(f"input {shape[0]}x{shape[1]}: {name} needs images of at least "
                         f"{minimum}x{minimum} pixels; prepare the data with --size {minimum} or "
                         f"more{'' if name == 'tiny' else ', or use --model tiny'}")
    return shape


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded application weights: $KERAS_HOME/models or ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def imagenet_weights_file(name: str, input_size: int = 224) -> str:
    """File name of the backbone's ImageNet no-top weights, as keras.applications caches it.

    MobileNetV2 has one file per input size 96/128/160/192/224; other sizes use the 224 file (the
    study's 110 px warned "weights for 224 loaded").

    Args:
        name: a key of BACKBONES.
        input_size: image side in pixels (matters for MobileNetV2 only).
    """
    if name not in BACKBONES:
        raise ModelError(f"--weights imagenet: {name} has no ImageNet weights; use --weights none")
    if name == "mobilenetv2":
        rows = input_size if input_size in _MOBILENET_ROWS else 224
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
    return f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def resolve_weights(name: str, weights: Optional[str], input_size: int = 224) -> Optional[str]:
    """Turn a ``weights`` argument into a local file path (or None for random initialisation).

    Args:
        name: one of MODEL_NAMES.
        weights: "imagenet", "none"/None, or a path to the backbone's no-top weights file (.h5).
        input_size: image side (chooses MobileNetV2's file).
    Returns:
        Path of an existing weights file, or None.
    Raises:
        WeightsError: ImageNet file neither cached nor downloadable (offline): the message names
            the file and the Keras cache folder where it can be put, and ``--weights none``.
        ModelError: a given path does not exist, or tiny with ImageNet weights.
    """
    if weights is None or str(weights).lower() == "none":
        return None
    if weights == "imagenet":
        if name == "tiny":
            raise ModelError("--weights imagenet: tiny has no pretrained weights; use --weights none")
        fname = imagenet_weights_file(name, input_size)
        cache = keras_cache_dir()
        if (cache / fname).is_file():
            return str(cache / fname)
        origin = _KERAS_APPS_URL + BACKBONES[name].weights_dir + fname
        try:
            return keras.utils.get_file(fname, origin=origin, cache_subdir="models")
        except Exception as exc:   # urllib / HTTP / socket errors all mean "not available"
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise WeightsError(
                f"--weights imagenet: cannot download {fname} ({reason}); copy that file into "
                f"{cache}/ (Keras cache; $KERAS_HOME/models if KERAS_HOME is set) or train offline "
                f"with --weights none") from None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"--weights {weights}: no such file; pass 'imagenet', 'none' or the path of "
                         f"the backbone's no-top weights file (.h5)")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Backbones on a preprocessed tensor (flat)
# ------------------------------------------------------------------------------------------------

def study_layer_names(name: str) -> list:
    """Layer names of the keras.applications backbone (include_top=False) in list order.

    Index i of this list is the study's ``base_model.layers[i]`` (index 0 is the InputLayer), which
    is how its freeze points were written. Builds the backbone once with random weights.
    """
    spec = BACKBONES[name]
    app = getattr(keras.applications, spec.constructor)(include_top=False, weights=None,
                                                        input_shape=(BACKBONE_MIN_SIZE,) * 2 + (3,))
    return [layer.name for layer in app.layers]


def _backbone(name: str, x, weights_path: Optional[str], variant: str, tap: bool,
              freeze: bool, prefix: Sequence[layers.Layer]):
    """Build the keras.applications backbone on tensor ``x`` (flat) and return its feature tensor.

    Args:
        name: key of BACKBONES.
        x: the preprocessed KerasTensor.
        weights_path: local weights file or None.
        variant: "thesis" taps the study's layer when ``tap`` is True.
        tap: use the study's tap layer in the thesis variant (False: full output).
        freeze: freeze the study's first ``spec.freeze`` layers.
        prefix: the layers of our own graph before the backbone (input, preprocessing); they are
            in the application model's layer list but not in the study's.
    Returns:
        (feature tensor, application model).
    """
    spec = BACKBONES[name]
    ctor = getattr(keras.applications, spec.constructor)
    try:
        app = ctor(include_top=False, weights=weights_path, input_tensor=x)
    except (ValueError, OSError) as exc:
        if weights_path is None:
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"--weights {weights_path}: cannot load into {name} ({first}); pass "
                         f"{name}'s no-top weights file or --weights none") from None
    own = [layer for layer in app.layers if not any(layer is p for p in prefix)]
    if len(own) + 1 != spec.n_layers:
        raise ModelError(f"{name}: keras.applications built {len(own) + 1} layers, expected "
                         f"{spec.n_layers}; the study's freeze points assume Keras' layer list")
    if freeze:
        # The study's base_model.layers[:N] = InputLayer + our backbone layers[:N - 1].
        for layer in own[:spec.freeze - 1]:
            layer.trainable = False
    if variant == "thesis" and tap:
        return app.get_layer(spec.thesis_tap).output, app
    return app.output, app


def _tiny_features(x):
    """tiny's trunk: five 3x3 conv-BN-ReLU blocks, 110 px -> a 13x13x128 map named "features".

    Filters 32 (stride 2), 64, 128, 128, 128, 2x2 max-pooling after the first two blocks. Receptive
    field r and jump j per layer: conv1 (3, 2), pool (5, 4), conv2 (13, 4), pool (17, 8),
    conv3 (33, 8), conv4 (49, 8), conv5 (65, 8). An earlier version used dilations 2 and 4 in the
    last two blocks (receptive field 129 px): similar accuracy on the synthetic set, but every
    feature position then saw the whole cell, so its CAMs lit up the image corners (the class
    evidence from the centre reached the corner positions through the dilated taps) and the nucleus
    got 1.5 % of the map energy against 4 % by chance; without dilations it gets 7-8 % (demo, 64 px,
    20 cells; dilation 2 in the last block only: 5 %). Validation accuracy on the synthetic default
    at 110 px: 0.948 at epoch 12 (0.938 with that last-block dilation, at epoch 7).

    BatchNormalization momentum 0.9 (Keras default 0.99) so the moving statistics used at
    validation time settle within a few dozen steps on small datasets; ``synchronized=True`` so
    that under tf.distribute every replica normalises with the global batch statistics (training
    on N devices then matches one device with the same global batch).
    """
    blocks = ((32, 2), (64, 1), (128, 1), (128, 1), (128, 1))
    for i, (filters, stride) in enumerate(blocks):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                          name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=0.9, synchronized=True, name=f"bn{i + 1}")(x)
        last = i == len(blocks) - 1
        x = layers.Activation("relu", name="features" if last else f"relu{i + 1}")(x)
        if i < 2:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    return x


def preprocess_layer(mode: str, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, name: str = "preprocess"
                     ) -> layers.Layer:
    """The input preprocessing of ``mode`` as one stock Keras layer (portable model files).

    Every mode is built from layers Keras itself knows, so a saved ``model.keras`` loads with plain
    ``keras.models.load_model(path)`` (safe mode) where this package is not installed:

        "none"         Identity
        "scale"        Rescaling(1 / 255):                               x * (1 / 255)
        "tf"           Normalization(mean 127.5, variance 127.5^2):      x / 127.5 - 1
        "torch"        Normalization(mean 255 m_c, variance (255 s_c)^2): (x / 255 - m_c) / s_c
        "standardize"  Normalization(mean, variance std^2)
        "caffe"        a frozen 1x1 Conv2D whose kernel reverses the channels (RGB -> BGR) and
                       whose bias subtracts the BGR ImageNet mean: x_bgr - mean_bgr, exactly
                       (each output is one input times 1 plus zeros, then the bias)

    The preprocessing layers and this frozen convolution are recognised as input preprocessing by
    the XAI code (never a CAM suggestion, never randomised by the sanity check). The layer
    computes in float32 whatever the mixed-precision policy.

    Args:
        mode: one of Preprocess.MODES.
        mean, std: per-channel statistics, only for "standardize".
        name: the layer's name.
    """
    import numpy as np

    if mode not in Preprocess.MODES:
        raise ModelError(f"preprocessing mode={mode!r}: choose one of {', '.join(Preprocess.MODES)}")
    if mode == "none":
        return layers.Identity(name=name, dtype="float32")
    if mode == "scale":
        return layers.Rescaling(1.0 / 255.0, name=name, dtype="float32")
    if mode == "caffe":
        reverse = np.eye(3, dtype=np.float32)[::-1].reshape(1, 1, 3, 3)
        return layers.Conv2D(3, 1, use_bias=True, trainable=False, name=name, dtype="float32",
                             kernel_initializer=keras.initializers.Constant(reverse.tolist()),
                             bias_initializer=keras.initializers.Constant(
                                 [-v for v in _CAFFE_MEAN_BGR]))
    if mode == "standardize":
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise ModelError("preprocessing mode='standardize': pass mean and std, 3 floats each")
        centre, spread = [float(v) for v in mean], [float(v) for v in std]
    else:
        centre, spread = {"tf": ([127.5] * 3, [127.5] * 3),
                          "torch": ([255.0 * m for m in _TORCH_MEAN],
                                    [255.0 * s for s in _TORCH_STD])}[mode]
    return layers.Normalization(mean=centre, variance=[s * s for s in spread], name=name,
                                dtype="float32")


def preprocessing_of(model: keras.Model) -> str:
    """The preprocessing mode of a model built here (read from its layer "preprocess").

    Returns:
        one of Preprocess.MODES.
    Raises:
        ModelError: the model has no layer "preprocess" of a known kind.
    """
    import numpy as np

    try:
        layer = model.get_layer("preprocess")
    except ValueError:
        raise ModelError(f"model {model.name!r}: no layer 'preprocess'; it was not built by "
                         f"cervical.models") from None
    if isinstance(layer, Preprocess):                      # run folders of earlier versions
        return layer.mode
    if isinstance(layer, layers.Identity):
        return "none"
    if isinstance(layer, layers.Rescaling):
        return "scale"
    if isinstance(layer, layers.Conv2D):
        return "caffe"
    if isinstance(layer, layers.Normalization):
        def stats(norm: layers.Layer):
            config = norm.get_config()
            return np.concatenate([np.ravel(config["mean"]), np.ravel(config["variance"])])

        for mode in ("tf", "torch"):
            if np.allclose(stats(layer), stats(preprocess_layer(mode)), rtol=1e-6):
                return mode
        return "standardize"
    raise ModelError(f"model {model.name!r}: layer 'preprocess' is a {type(layer).__name__}, "
                     f"not one this package builds")


def _inputs_and_preprocessing(name: str, input_shape, variant: str,
                              normalization: Optional[Tuple[Sequence[float], Sequence[float]]]):
    inputs = keras.Input(shape=input_shape, name="image")
    if normalization is not None:
        pre = preprocess_layer("standardize", mean=normalization[0], std=normalization[1])
    else:
        pre = preprocess_layer(preprocess_mode(name, variant))
    return inputs, pre, pre(inputs)


def _resolve_freeze(freeze: Optional[bool], weights_path: Optional[str]) -> bool:
    return bool(weights_path) if freeze is None else bool(freeze)


def _features(name: str, input_shape, weights, variant: str, freeze: Optional[bool], tap: bool,
              normalization=None):
    """(inputs, feature tensor) of a flat model: Input -> Preprocess -> trunk."""
    _check_name_variant(name, variant)
    shape = check_input_size(name, input_shape)
    weights_path = resolve_weights(name, weights, shape[0])
    inputs, pre, x = _inputs_and_preprocessing(name, shape, variant, normalization)
    if name == "tiny":
        return inputs, _tiny_features(x)
    feats, _ = _backbone(name, x, weights_path, variant, tap, _resolve_freeze(freeze, weights_path),
                         prefix=(inputs._keras_history.operation, pre))
    return inputs, feats


def _classifier_head(x, kind: str, num_classes: int):
    """The study's heads (docs/study.md §3)."""
    if kind == "maxpool_bn":
        x = layers.GlobalMaxPooling2D(name="head_pool")(x)
        x = layers.BatchNormalization(synchronized=True, name="head_bn1")(x)
        x = layers.Dropout(0.5, name="head_dropout1")(x)
        x = layers.Dense(1024, activation="relu", name="dense_1024")(x)
        x = layers.BatchNormalization(synchronized=True, name="head_bn2")(x)
        x = layers.Dropout(0.5, name="head_dropout2")(x)
    elif kind == "gap":
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
        x = layers.Dense(1024, activation="relu", name="dense_1024")(x)
    else:   # tiny
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)


def _check_classes(num_classes: int) -> int:
    k = int(num_classes)
    if k < 2:
        raise ModelError(f"num_classes={num_classes}: need at least 2 classes")
    return k


def build_model(name: str, num_classes: int, input_shape: Sequence[int] = (110, 110, 3),
                weights: Optional[str] = "imagenet", variant: str = "standard",
                freeze: Optional[bool] = None) -> keras.Model:
    """Build a fine-tuning classifier: raw RGB -> Preprocess -> backbone -> head -> softmax (K).

    Args:
        name: "tiny" or a backbone ("vgg16", "vgg19", "resnet50", "mobilenetv2", "densenet169").
        num_classes: K >= 2.
        input_shape: (H, W, 3); H, W >= 32 for the backbones (>= 8 for tiny).
        weights: "imagenet", "none"/None, or a path to the backbone's no-top weights file.
        variant: "standard" (full backbone, its own preprocess_input) or "thesis" (the study's tap
            layer, raw 0..255 input); both use the study's freeze point and head (module docstring).
        freeze: freeze the study's first N layers (13/17/86/100/249); None = only when the weights
            are pretrained (freezing random layers is pointless). tiny never freezes.
    Returns:
        An uncompiled flat keras.Model named "<name>_<variant>" whose output layer "predictions"
        gives softmax probabilities (B, K) in float32.
    Raises:
        ModelError: unknown name/variant, K < 2, input too small, bad weights path.
        WeightsError: ImageNet weights unavailable offline.
    """
    k = _check_classes(num_classes)
    inputs, feats = _features(name, input_shape, weights, variant, freeze, tap=True)
    head = "tiny" if name == "tiny" else BACKBONES[name].head
    outputs = _classifier_head(feats, head, k)
    return keras.Model(inputs, outputs, name=f"{name}_{variant}")


def build_encoder(name: str, input_shape: Sequence[int] = (110, 110, 3),
                  weights: Optional[str] = None, variant: str = "standard",
                  freeze: Optional[bool] = None,
                  normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None
                  ) -> keras.Model:
    """Contrastive encoder: raw RGB -> Preprocess -> full backbone -> global average pooling.

    This is the study's contrastive encoder (keras.applications ``pooling="avg"``, full backbone,
    docs/study.md §4), built flat. The study trained it from scratch
    (``weights=None``) behind a Normalization layer adapted on the training images: pass those
    statistics as ``normalization=(mean, std)`` to reproduce it (the "thesis" variant). Without
    ``normalization`` the preprocessing is the variant's (``preprocess_mode``).

    Args:
        name: one of MODEL_NAMES.
        input_shape: (H, W, 3).
        weights: "imagenet", "none"/None or a weights path.
        variant: "standard" or "thesis" (the thesis variant does NOT tap here: the study's
            contrastive encoders used the full backbone).
        freeze: as in ``build_model`` (None: freeze only pretrained weights).
        normalization: per-channel (mean, std) of the raw training pixels, for "standardize".
    Returns:
        keras.Model "encoder" with output (B, D): D = 512 (VGG), 2048 (ResNet50), 1280
        (MobileNetV2), 1664 (DenseNet169), 128 (tiny).
    """
    inputs, feats = _features(name, input_shape, weights, variant, freeze, tap=False,
                              normalization=normalization)
    pooled = layers.GlobalAveragePooling2D(name="encoder_pool")(feats)
    return keras.Model(inputs, pooled, name=f"{name}_encoder")


def add_projection_head(encoder: keras.Model, projection_dim: int = 128,
                        activation: Optional[str] = None) -> keras.Model:
    """Encoder + projection head Dense(projection_dim) for the contrastive phase (thesis Fig. 3.x).

    The study used Dense(128, relu) (keras-io example); Khosla et al. use a non-ReLU output before
    the L2 normalisation, which the losses apply. Pass ``activation="relu"`` for the study's head.

    Returns:
        keras.Model "<encoder>_projection" with output (B, projection_dim), float32.
    """
    z = layers.Dense(int(projection_dim), activation=activation, dtype="float32",
                     name="projection")(encoder.output)
    return keras.Model(encoder.input, z, name=f"{encoder.name}_projection")


def build_contrastive_classifier(encoder: keras.Model, num_classes: int,
                                 train_encoder: bool = False, hidden_units: int = 512,
                                 dropout: float = 0.5) -> keras.Model:
    """The study's classifier on an encoder: Dropout-Dense(512, relu)-Dropout-Dense(K, softmax).

    ``train_encoder=False`` is phase 2 of the contrastive regime (every encoder layer frozen, so its
    BatchNormalization layers run in inference mode, as in the study's ``create_classifier(encoder,
    trainable=False)``); ``True`` is the study's end-to-end "baseline".

    Returns:
        Flat keras.Model "<name>_classifier": raw RGB -> softmax probabilities (B, K).
    """
    k = _check_classes(num_classes)
    if not train_encoder:
        for layer in encoder.layers:
            layer.trainable = False
    x = layers.Dropout(dropout, name="head_dropout1")(encoder.output)
    x = layers.Dense(int(hidden_units), activation="relu", name="dense_512")(x)
    x = layers.Dropout(dropout, name="head_dropout2")(x)
    out = layers.Dense(k, activation="softmax", dtype="float32", name="predictions")(x)
    base = encoder.name[:-len("_encoder")] if encoder.name.endswith("_encoder") else encoder.name
    return keras.Model(encoder.input, out, name=f"{base}_classifier")


def feature_layer_name(model_or_name: Union[keras.Model, str], variant: str = "standard") -> str:
    """Name of the backbone's last feature map (the CAM target layer).

    Args:
        model_or_name: a model built here (or loaded from a run's model.keras), or a model name.
        variant: with a name: "standard" or "thesis".
    Returns:
        The layer name, reachable with ``model.get_layer(name)`` (see the module docstring table).
    Raises:
        ModelError: unknown name, or a model holding none of the known feature layers.
    """
    if isinstance(model_or_name, str):
        _check_name_variant(model_or_name, variant)
        if model_or_name == "tiny":
            return "features"
        spec = BACKBONES[model_or_name]
        return spec.thesis_tap if variant == "thesis" else spec.feature_layer
    names = {layer.name for layer in model_or_name.layers}
    for candidate in _FEATURE_CANDIDATES:
        if candidate in names:
            return candidate
    raise ModelError(f"model {model_or_name.name!r}: no known feature layer "
                     f"({', '.join(_FEATURE_CANDIDATES)}); pass the CAM layer name explicitly")


# ------------------------------------------------------------------------------------------------
# Prediction
# ------------------------------------------------------------------------------------------------

def input_size_mismatch(model: keras.Model, x, data: Union[str, os.PathLike]) -> Optional[str]:
    """The one-line complaint when the images ``x`` (read from ``data``) are not the size the model
    takes (eval and explain refuse them before predicting), or None."""
    want, have = tuple(model.input_shape[1:3]), tuple(x.shape[1:3])
    if None in want or want == have:
        return None
    return (f"--data {data}: holds {have[0]}x{have[1]} images, the model takes "
            f"{want[0]}x{want[1]}; prepare the data with --size {want[0]}")


def as_probabilities(outputs) -> "np.ndarray":
    """The one rule for model outputs: probabilities as they are, anything else is logits.

    Rows that are probability distributions (every value >= 0, each row summing to 1 within 1e-3)
    are returned unchanged (as float64); any other output is taken as logits z and turned into
    probabilities with the softmax p_k = exp(z_k - max z) / sum_j exp(z_j - max z). Every model this
    package builds ends in a softmax; the rule lets eval, explain and LIME agree on any other.
    """
    import numpy as np

    p = np.asarray(outputs, dtype=np.float64)
    if p.ndim != 2:
        raise ModelError(f"model output has shape {p.shape}; expected (N, classes)")
    if p.size and (p.min() < 0 or np.any(np.abs(p.sum(axis=1) - 1.0) > 1e-3)):
        z = np.exp(p - p.max(axis=1, keepdims=True))
        p = z / z.sum(axis=1, keepdims=True)
    return p


def predict_proba(model: keras.Model, x, batch_size: int = 64, progress=None) -> "np.ndarray":
    """Class probabilities (N, K), float64, of raw RGB images (uint8 or float), in batches.

    Args:
        model: a Keras model taking raw 0..255 RGB (preprocessing inside the model).
        x: (N, H, W, 3) images.
        batch_size: images per forward pass.
        progress: None, or ``progress(step, done, total)`` after every batch.
    Returns:
        ``as_probabilities`` of the stacked outputs (the one rule for logits vs probabilities).
    """
    import numpy as np

    from cervical.pipeline import read_rows

    n = int(len(x))
    out = []
    for start in range(0, n, int(batch_size)):      # a mapped x is read a batch at a time
        batch = read_rows(x, slice(start, start + batch_size)).astype(np.float32)
        y = model.predict_on_batch(batch)
        out.append(np.asarray(y.numpy() if hasattr(y, "numpy") else y, dtype=np.float64))
        if progress is not None:
            progress("predict", min(start + batch_size, n), n)
    return as_probabilities(np.concatenate(out) if out else np.zeros((0, 0)))


def load_model_file(path, flag: str = "--run") -> keras.Model:
    """Load a run's model.keras in safe mode (no code from the file is run), or fail in one line.

    A file holding a ``Lambda`` layer (Python code) is refused, so is a truncated or foreign
    archive. Models of earlier versions of this package load too (their ``Preprocess`` layer is
    registered by this module).

    Raises:
        ModelError: missing, unreadable, or refused file (the message names it and the fix).
    """
    from pathlib import Path as _Path

    path = _Path(path)
    if not path.is_file():
        raise ModelError(f"{flag} {path.parent}: no model.keras; train a model there first")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad archive
        text = str(exc).strip()
        if "Lambda" in text or "lambda" in text:
            raise ModelError(f"{path}: refused: it holds a Lambda layer (Python code), which safe "
                             f"mode does not run; rebuild the model from stock Keras layers") from None
        first = (text.splitlines() or [""])[0][:160]
        raise ModelError(f"{path}: cannot be loaded ({type(exc).__name__}: {first}); retrain the "
                         f"run or check the file") from None
