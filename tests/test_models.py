"""cervical.models: backbones, study variants (taps, freeze points, heads), preprocessing, weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras  # noqa: E402 - a dependency: its absence must fail, not skip

from cervical import models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# From docs/study.md §3 (the study's Keras 2.12 layer lists and printed summaries):
# (layers in base_model.layers, freeze N, name of layers[N] = first trainable, thesis tap).
STUDY = {
    "vgg16": (19, 13, "block4_conv3", "block4_conv3"),
    "vgg19": (22, 17, "block5_conv1", "block5_conv2"),
    "resnet50": (175, 86, "conv4_block1_2_relu", "conv4_block1_0_conv"),
    "mobilenetv2": (154, 100, "block_11_expand_relu", "out_relu"),
    "densenet169": (595, 249, "conv4_block16_1_bn", "relu"),
}
# The study's printed parameter counts (5 classes): (total, trainable).
STUDY_PARAMS = {"vgg16": (8_171_845, 2_893_317), "vgg19": (15_841_349, 5_253_125),
                "resnet50": (3_048_325, 1_584_133)}


def _n_params(variables):
    return int(sum(np.prod(v.shape) for v in variables))


# ------------------------------------------------------------------------------------------------
# Preprocessing inside the model
# ------------------------------------------------------------------------------------------------

def test_preprocess_modes_by_hand():
    """One pixel (R, G, B) = (10, 20, 30) through every mode, computed by hand."""
    x = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    expect = {
        "none": [10, 20, 30],
        "scale": [10 / 255, 20 / 255, 30 / 255],
        "caffe": [30 - 103.939, 20 - 116.779, 10 - 123.68],            # BGR, minus BGR means
        "tf": [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1],
        "torch": [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                  (30 / 255 - 0.406) / 0.225],
    }
    for mode, want in expect.items():
        got = np.asarray(models.Preprocess(mode)(x))[0, 0, 0]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5, err_msg=mode)
    got = np.asarray(models.Preprocess("standardize", mean=[5, 10, 20], std=[5, 2, 0])(x))[0, 0, 0]
    np.testing.assert_allclose(got, [1.0, 5.0, 10 / 1e-7], rtol=1e-6)   # std floored at 1e-7


@pytest.mark.parametrize("mode,module", [("caffe", "vgg16"), ("caffe", "resnet50"),
                                         ("tf", "mobilenet_v2"), ("torch", "densenet")])
def test_preprocess_matches_keras_preprocess_input(mode, module):
    x = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    reference = getattr(keras.applications, module).preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(models.Preprocess(mode)(x)), reference, atol=1e-4)


def test_preprocess_modes_per_model():
    assert models.preprocess_mode("vgg16") == "caffe"
    assert models.preprocess_mode("vgg19") == "caffe"
    assert models.preprocess_mode("resnet50") == "caffe"
    assert models.preprocess_mode("mobilenetv2") == "tf"
    assert models.preprocess_mode("densenet169") == "torch"
    assert models.preprocess_mode("tiny") == "scale"
    assert all(models.preprocess_mode(n, "thesis") == "none" for n in models.MODEL_NAMES)


def _copy_weights(src, dst):
    for a, b in zip(src.weights, dst.weights):
        b.assign(a)


def test_preprocessing_is_inside_the_model_tiny():
    """standard(x) == thesis(x / 255) with the same weights: 'standard' divides by 255 inside."""
    std = models.build_model("tiny", 3, (32, 32, 3), weights=None)
    raw = models.build_model("tiny", 3, (32, 32, 3), weights=None, variant="thesis")
    _copy_weights(std, raw)
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(std(x)), np.asarray(raw(x / 255.0)), rtol=1e-5,
                               atol=1e-6)
    assert models.preprocessing_of(std) == "scale"
    assert models.preprocessing_of(raw) == "none"


@pytest.mark.slow
def test_preprocessing_is_inside_the_model_mobilenetv2():
    """MobileNetV2: both variants use the full backbone, so standard(x) == thesis(x/127.5 - 1)."""
    std = models.build_model("mobilenetv2", 2, (32, 32, 3), weights=None)
    raw = models.build_model("mobilenetv2", 2, (32, 32, 3), weights=None, variant="thesis")
    _copy_weights(std, raw)
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    a = np.asarray(std(x))
    np.testing.assert_allclose(a, np.asarray(raw(x / 127.5 - 1.0)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.sum(1), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# The study's backbones: layer lists, freeze points, taps, heads
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDY))
def test_backbone_variants_taps_and_freeze_points(name):
    n_layers, n_freeze, first_trainable, tap = STUDY[name]
    spec = models.BACKBONES[name]
    assert (spec.n_layers, spec.freeze, spec.thesis_tap) == (n_layers, n_freeze, tap)

    std = models.build_model(name, 5, (32, 32, 3), weights=None, freeze=True)
    # Flat: image, preprocess, then the backbone's layers in keras.applications order.
    names = [layer.name for layer in std.layers]
    assert names[:2] == ["image", "preprocess"]
    study = ["input"] + names[2:2 + n_layers - 1]     # study index i <-> names[i + 1]
    assert study[n_freeze] == first_trainable
    for i, lname in enumerate(study[1:], start=1):
        assert std.get_layer(lname).trainable == (i >= n_freeze), (name, i, lname)
    assert models.preprocessing_of(std) == spec.preprocess
    feature = models.feature_layer_name(std)
    assert feature == spec.feature_layer == models.feature_layer_name(name)
    assert len(std.get_layer(feature).output.shape) == 4

    thesis = models.build_model(name, 5, (32, 32, 3), weights=None, variant="thesis", freeze=True)
    assert models.preprocessing_of(thesis) == "none"
    assert models.feature_layer_name(thesis) == tap == models.feature_layer_name(name, "thesis")
    # The head's pooling reads the tapped layer's output.
    pool = thesis.get_layer("head_pool")
    assert pool.input is thesis.get_layer(tap).output
    for layer in thesis.layers:
        if layer.name in study:
            assert layer.trainable == (study.index(layer.name) >= n_freeze), layer.name
    head = [layer.name for layer in thesis.layers[-7:]]
    if spec.head == "maxpool_bn":
        assert head == ["head_pool", "head_bn1", "head_dropout1", "dense_1024", "head_bn2",
                        "head_dropout2", "predictions"]
        assert isinstance(pool, keras.layers.GlobalMaxPooling2D)
        total, trainable = STUDY_PARAMS[name]
        assert thesis.count_params() == total
        assert _n_params(thesis.trainable_weights) == trainable
    else:
        assert head[-3:] == ["head_pool", "dense_1024", "predictions"]
        assert isinstance(pool, keras.layers.GlobalAveragePooling2D)
    assert thesis.get_layer("dense_1024").units == 1024
    assert thesis.get_layer("predictions").activation.__name__ == "softmax"


def test_freeze_auto_only_with_pretrained_weights():
    m = models.build_model("vgg16", 3, (32, 32, 3), weights=None, variant="thesis")
    assert all(layer.trainable for layer in m.layers)


def test_tiny_model_shapes_and_feature_layer():
    m = models.build_model("tiny", 4, (32, 32, 3), weights=None)
    assert m.name == "tiny_standard"
    assert models.feature_layer_name(m) == "features"
    assert tuple(m.get_layer("features").output.shape[1:]) == (4, 4, 128)
    big = models.build_model("tiny", 5, (110, 110, 3), weights=None)
    assert tuple(big.get_layer("features").output.shape[1:]) == (13, 13, 128)
    p = np.asarray(m(np.zeros((2, 32, 32, 3), np.float32)))
    assert p.shape == (2, 4) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_tiny_receptive_field_is_local():
    """The corner feature of tiny sees at most its documented 65 px receptive field.

    Derivation (models._tiny_features): r grows by (k - 1) * j per layer: conv1 3 (j 2), pool 5
    (j 4), conv2 13, pool 17 (j 8), conv3 33, conv4 49, conv5 65. Centre of the feature at (0, 0):
    conv1 (stride 2, "same" on an even side pads only after) is centred on pixel 1, pool1 on
    1 + 2 * 0.5 = 2, pool2 on 2 + 4 * 0.5 = 4, and the stride-1 convs keep it. So its input
    gradient reaches exactly row/column 4 + (65 - 1) / 2 = 36 and nothing beyond.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    m = models.build_model("tiny", 3, (110, 110, 3), weights=None)
    feats = keras.Model(m.inputs, m.get_layer("features").output)
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (1, 110, 110, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        corner = tf.reduce_sum(feats(x, training=False)[0, 0, 0, :])
    g = np.abs(tape.gradient(corner, x).numpy()[0]).sum(-1)
    rows, cols = np.nonzero(g)
    assert rows.max() == 36 and cols.max() == 36
    assert g[37:, :].sum() == 0 and g[:, 37:].sum() == 0


def test_feature_layer_names_documented():
    want = {"vgg16": ("block5_conv3", "block4_conv3"), "vgg19": ("block5_conv4", "block5_conv2"),
            "resnet50": ("conv5_block3_out", "conv4_block1_0_conv"),
            "mobilenetv2": ("out_relu", "out_relu"), "densenet169": ("relu", "relu"),
            "tiny": ("features", "features")}
    for name, (standard, thesis) in want.items():
        assert models.feature_layer_name(name) == standard
        assert models.feature_layer_name(name, "thesis") == thesis
    with pytest.raises(models.ModelError):
        models.feature_layer_name(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]))


def test_encoder_projection_and_contrastive_classifier():
    enc = models.build_encoder("tiny", (32, 32, 3), weights=None, variant="thesis",
                               normalization=([100.0, 110.0, 120.0], [50.0, 40.0, 30.0]))
    assert enc.output.shape[-1] == 128
    pre = enc.get_layer("preprocess")
    assert models.preprocessing_of(enc) == "standardize"
    x = np.full((1, 32, 32, 3), 150.0, np.float32)
    np.testing.assert_allclose(np.asarray(pre(x))[0, 0, 0], [1.0, 1.0, 1.0], rtol=1e-6)
    proj = models.add_projection_head(enc, 16, activation="relu")
    assert proj.output.shape[-1] == 16
    clf = models.build_contrastive_classifier(enc, 3, train_encoder=False)
    assert not any(layer.trainable for layer in enc.layers)
    assert clf.get_layer("features") is enc.get_layer("features")          # flat, shared
    assert models.feature_layer_name(clf) == "features"
    assert [layer.name for layer in clf.layers[-4:]] == ["head_dropout1", "dense_512",
                                                         "head_dropout2", "predictions"]
    trainable = {w.path.split("/")[0] for w in clf.trainable_weights}
    assert trainable == {"dense_512", "predictions"}


def test_output_float32_under_mixed_precision():
    old = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        m = models.build_model("tiny", 3, (16, 16, 3), weights=None)
    finally:
        keras.mixed_precision.set_global_policy(old)
    assert m.get_layer("conv1").compute_dtype == "bfloat16"
    assert m.output.dtype == "float32"


# ------------------------------------------------------------------------------------------------
# Bad input and weights
# ------------------------------------------------------------------------------------------------

def test_bad_arguments_one_line_errors():
    cases = [(dict(name="alexnet", num_classes=3), "--model"),
             (dict(name="tiny", num_classes=3, variant="paper"), "--variant"),
             (dict(name="tiny", num_classes=1), "num_classes"),
             (dict(name="densenet169", num_classes=3, input_shape=(16, 16, 3)), "32x32"),
             (dict(name="tiny", num_classes=3, input_shape=(4, 4, 3)), "8x8"),
             (dict(name="tiny", num_classes=3, input_shape=(32, 32, 1)), "RGB")]
    for kwargs, needle in cases:
        kwargs.setdefault("weights", None)
        with pytest.raises(models.ModelError) as err:
            models.build_model(**kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value)


def test_imagenet_weights_offline_names_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://x: None -- [Errno -3] Temporary failure")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    for name, fname in [("vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                        ("mobilenetv2",
                         "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
                        ("densenet169", "densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5")]:
        with pytest.raises(models.WeightsError) as err:
            models.build_model(name, 3, (110, 110, 3), weights="imagenet")
        msg = str(err.value)
        assert fname in msg and str(tmp_path / "kh" / "models") in msg
        assert "--weights none" in msg and "\n" not in msg
    assert (models.imagenet_weights_file("mobilenetv2", 128)
            == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_128_no_top.h5")
    # A file already in the cache is used without any download.
    cached = tmp_path / "kh" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"")
    assert models.resolve_weights("resnet50", "imagenet") == str(cached)


def test_weights_path_and_tiny_errors(tmp_path):
    with pytest.raises(models.ModelError, match="no such file"):
        models.resolve_weights("vgg16", str(tmp_path / "missing.h5"))
    with pytest.raises(models.ModelError, match="tiny has no pretrained"):
        models.resolve_weights("tiny", "imagenet")
    assert models.resolve_weights("vgg16", "none") is None
    assert models.resolve_weights("vgg16", None) is None


def test_weights_file_round_trip(tmp_path):
    """A backbone weights file (here saved from a random VGG16) loads into the flat model."""
    src = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    src.save_weights(path)
    m = models.build_model("vgg16", 3, (32, 32, 3), weights=str(path), variant="thesis")
    np.testing.assert_array_equal(m.get_layer("block4_conv3").kernel.numpy(),
                                  src.get_layer("block4_conv3").kernel.numpy())
    # Pretrained weights -> the study's freeze point applies by default.
    assert not m.get_layer("block4_conv2").trainable and m.get_layer("block4_conv3").trainable


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------

PORTABLE_LOAD = """
import sys, numpy as np, keras
sys.modules["cervical"] = None            # this Python has TensorFlow but not the package
m = keras.models.load_model(sys.argv[1], safe_mode=True)
p = m.predict(np.load(sys.argv[2]), verbose=0)
np.testing.assert_allclose(p, np.load(sys.argv[3]), rtol=1e-5, atol=1e-6)
print("loaded", type(m.get_layer("preprocess")).__name__)
"""


def assert_portable(path, x, expected, tmp_path):
    """``path`` loads with plain keras.models.load_model(safe_mode=True) in a fresh Python that
    cannot import cervical, and predicts ``expected`` on ``x``; its config names only Keras
    objects. Returns the preprocessing layer's class name."""
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "p.npy", expected)
    (tmp_path / "load.py").write_text(PORTABLE_LOAD)
    env = {"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "load.py", str(path), "x.npy", "p.npy"], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = json.dumps(json.loads(__import__("zipfile").ZipFile(path).read("config.json")))
    assert "cervical" not in cfg
    return out.stdout.split()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name,variant,layer", [("tiny", "standard", "Rescaling"),
                                                ("tiny", "thesis", "Identity"),
                                                ("vgg16", "standard", "Conv2D")])
def test_saved_model_loads_without_the_package(name, variant, layer, tmp_path):
    m = models.build_model(name, 3, (32, 32, 3), weights=None, variant=variant)
    x = np.random.default_rng(3).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    m.save(tmp_path / "model.keras")
    assert assert_portable(tmp_path / "model.keras", x, m.predict(x, verbose=0), tmp_path) == layer


def test_preprocess_layers_compute_each_mode():
    """The stock-layer preprocessing equals the reference definitions (class Preprocess): exactly
    for none, caffe and standardize; to float32 rounding for scale (x * (1/255), what TensorFlow's
    graph optimiser made of the old x / 255 too), tf and torch."""
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for mode in ("none", "scale", "caffe", "tf", "torch"):
        got = np.asarray(models.preprocess_layer(mode)(x))
        ref = np.asarray(models.Preprocess(mode)(x))
        np.testing.assert_allclose(got, ref, rtol=0, atol=0 if mode in ("none", "caffe")
                                   else 5e-7 * 255)
    got = np.asarray(models.preprocess_layer("standardize", [5, 10, 20], [5, 2, 3])(x))
    np.testing.assert_allclose(got, (x - [5, 10, 20]) / np.float32([5, 2, 3]), rtol=1e-6)
    with pytest.raises(models.ModelError, match="standardize"):
        models.preprocess_layer("standardize")
