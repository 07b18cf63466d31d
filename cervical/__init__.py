"""cervical: reproduce, fix and extend explainable deep learning for Pap-smear cell classification.

Modules (flat on purpose, each readable on its own):
    protocol   the study's protocol and ours, every differing choice in one object each
    options    each command option declared once (flag, help, choices, range)
    readers    raw layouts -> records (decoding, expert masks, label tasks)
    splits     the study's split, grouped splits and folds, the randomised-leak design
    prepared   the prepared-folder format and its loaders
    data       raw datasets -> prepared folders (resize, size analysis, augmentation, ``prepare``)
    synthetic  the embedded SIPaKMeD-like generator (offline default)
    augment    the study's offline augmentation groups, seeded, on RGB, masks kept aligned
    models     the five ImageNet backbones + ``tiny``, study ("thesis") and corrected variants
    losses     supervised contrastive and cost-sensitive losses
    pipeline   the tf.data input pipeline and online augmentation
    train      fine-tune / cost-sensitive / contrastive training into a run folder
    metrics    accuracy, precision, recall, F1, kappa, calibration, bootstrap intervals
    evaluation ``eval``: one run on one split, metrics with intervals, tables and figures
    report     ``report``: the study's tables and figures over several runs
    cams       GradCAM, GradCAM++, LayerCAM, ScoreCAM, Faster-ScoreCAM (NumPy on tf.GradientTape)
    lime_lite  LIME on SLIC superpixels (NumPy)
    xai_eval   faithfulness, localisation, sanity, control maps and paired verdicts
    explain    the ``explain`` command
    audit      how much of an accuracy is the protocol, and how much the leak
    demo       the whole study offline
    files      atomic writes, locks, versions, progress
"""

__version__ = "0.1.0"

#: Upper limits of the numeric arguments, checked by the command line and by the library alike:
#: far above any sensible value, low enough that a typo (an extra zero) fails at once instead of
#: running for days or exhausting memory.
LIMITS = {
    "size": 4096, "augment": 100, "per_class": 100_000, "folds": 100, "workers": 256,
    "epochs": 100_000, "batch_size": 65_536, "patience": 10_000, "projection_dim": 65_536,
    "precise_bn": 1_000_000, "lr": 10.0, "temperature": 100.0, "margin": 100.0,
    "n_boot": 1_000_000, "per_class_shown": 1000, "n_eval": 100_000, "n_sanity": 10_000,
    "sanity_blocks": 1000, "lime_samples": 1_000_000, "lime_segments": 10_000, "max_n": 100_000,
    "tolerance": 10_000.0, "seeds": 100, "seed": 2 ** 32 - 1, "jpeg_quality": 100,
}


def out_of_range(flag: str, value, low: int, limit: str):
    """The one-line complaint about an integer argument outside ``low .. LIMITS[limit]`` (bools
    and non-integers included), or None when it is fine. Each module raises it as its own error."""
    import numbers

    high = LIMITS[limit]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        return f"{flag} {value!r}: must be an integer {low} to {high}"
    return None


def import_tensorflow_quietly(start_runtime: bool = True) -> None:
    """Import TensorFlow with file descriptor 2 muted (the command line's start-up).

    TensorFlow's C++ start-up lines (oneDNN notice, "could not find cuda drivers", cuInit errors on
    CPU machines) are written before its log level applies, so TF_CPP_MIN_LOG_LEVEL cannot hide
    them. Import errors are not hidden: they are raised again by the real import that follows.
    CERVICAL_DEBUG=1 leaves everything visible. ``start_runtime=False`` only imports: multi-worker
    training must configure the runtime itself before its first use.
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
        if start_runtime:
            tf.constant(0)   # device discovery happens here on first use
        tf.get_logger().setLevel("ERROR")   # e.g. retracing notices from varying batch shapes
    except Exception:   # noqa: BLE001 - reported by the real import
        pass
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
