"""cervical: reproduce, fix and extend explainable deep learning for Pap-smear cell classification.

Modules (flat on purpose, each readable on its own):
    data       raw datasets -> prepared folders (readers, size analysis, resize, splits, cache)
    synthetic  the embedded SIPaKMeD-like generator (offline default)
    augment    the study's offline augmentation groups, seeded, on RGB, masks kept aligned
    models     the five ImageNet backbones + ``tiny``, study ("thesis") and corrected variants
    losses     supervised contrastive and cost-sensitive losses
    train      fine-tune / cost-sensitive / contrastive training into a run folder
    metrics    accuracy, precision, recall, F1, kappa, calibration, bootstrap intervals
    report     ``eval`` and ``report``: tables and figures of the study
    cams       GradCAM, GradCAM++, LayerCAM, ScoreCAM, Faster-ScoreCAM (NumPy on tf.GradientTape)
    lime_lite  LIME on SLIC superpixels (NumPy)
"""

__version__ = "0.1.0"


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with file descriptor 2 muted (the command line's start-up).

    TensorFlow's C++ start-up lines (oneDNN notice, "could not find cuda drivers", cuInit errors on
    CPU machines) are written before its log level applies, so TF_CPP_MIN_LOG_LEVEL cannot hide
    them. Import errors are not hidden: they are raised again by the real import that follows.
    CERVICAL_DEBUG=1 leaves everything visible.
    """
    import os
    import sys

    if "tensorflow" in sys.modules or os.environ.get("CERVICAL_DEBUG"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # stderr replaced (e.g. captured by pytest)
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        import tensorflow as tf
        tf.constant(0)   # device discovery happens here on first use
        tf.get_logger().setLevel("ERROR")   # e.g. retracing notices from varying batch shapes
    except Exception:   # noqa: BLE001 - reported by the real import
        pass
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
