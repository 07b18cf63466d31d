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
