"""Explain a trained run: CAM and LIME figures of chosen cells, raw maps, and XAI metrics.

What ``explain_run`` does (thesis section 6.4, Figs 6.5-6.8, made reproducible and measurable):

1. Load ``RUN/model.keras`` and ``RUN/config.json`` (data folder, class names, CAM target layer).
2. Predict the split and choose, per class, the most confident correct prediction(s) and the most
   confident wrong one(s) of cells of that class; ties go to the lower row index, so the choice is
   deterministic. A class without a wrong (or correct) prediction gets a row saying so.
3. Explain the predicted class of every chosen cell with each method (Grad-CAM, Grad-CAM++,
   LayerCAM, Score-CAM, Faster-Score-CAM from :mod:`cervical.cams`; LIME from
   :mod:`cervical.lime_lite`) and write

   - ``cams_correct.png`` / ``cams_wrong.png``: rows = cells (true -> predicted, confidence), columns =
     image + one overlay per CAM method (Figs 6.5, 6.6);
   - ``lime_correct.png`` / ``lime_wrong.png``: image, top superpixels for the class (positive only),
     pros (green) and cons (red) (Figs 6.7, 6.8);
   - ``overlays/<cell>_<method>.png``: every single panel as its own PNG;
   - ``maps.npz``: the raw maps (``map_<method>``, float32 (N, H, W); LIME as the per-pixel
     surrogate weight, signed), the images, the cells' indices, classes and confidences, the LIME
     superpixels and weights, and the masks when the data has them;
   - ``cells.json``: the chosen cells and the files written for each.

4. With ``evaluate=True``: on ``n_eval`` cells of the split (a class-balanced, seeded choice) compute,
   per method, the mean and standard deviation of the deletion and insertion AUCs, the share of map
   energy inside the nucleus and inside the whole cell (with the mask area fraction, the chance
   level, beside it), the pointing-game hit rates, the time per cell, and the cascading randomisation
   sanity check (:mod:`cervical.xai_eval`). Two reference maps frame the numbers: a random map and a
   centred Gaussian (what knowing only that cells are cropped around their nucleus gives). Written to
   ``xai_metrics.json``, ``xai_metrics.md`` and ``xai_curves.png``.

``images=[...]`` explains arbitrary image files instead of a split, with the same preprocessing as the
prepared dataset (decode to RGB, pad to square, resize to the model's input size).

All outputs go to ``RUN/explain/<split>/`` (``RUN/explain/images/`` for files) unless ``out_dir`` is given;
every file is written atomically. Errors are :class:`ExplainError` (a ``ValueError``) with a one-line
message naming the argument and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from cervical import xai_eval

__all__ = [
    "ExplainError",
    "METHODS",
    "CAM_METHODS",
    "Cell",
    "parse_methods",
    "load_run",
    "candidate_layers",
    "resolve_layer",
    "predict_probs",
    "select_cells",
    "choose_eval_cells",
    "load_images",
    "compute_maps",
    "reference_maps",
    "evaluate_cells",
    "format_metrics_md",
    "explain_run",
]

#: Every method, in the order of the figures' columns.
METHODS: Tuple[str, ...] = ("gradcam", "gradcam++", "layercam", "scorecam", "faster-scorecam", "lime")
CAM_METHODS: Tuple[str, ...] = METHODS[:5]
_ALIASES = {
    "grad-cam": "gradcam", "gradcam-plus-plus": "gradcam++", "grad-cam++": "gradcam++",
    "gradcampp": "gradcam++", "gradcam-pp": "gradcam++", "layer-cam": "layercam",
    "score-cam": "scorecam", "faster-score-cam": "faster-scorecam", "fasterscorecam": "faster-scorecam",
}
_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "layercam": "LayerCAM",
           "scorecam": "Score-CAM", "faster-scorecam": "Faster-Score-CAM", "lime": "LIME",
           "random": "random map (reference)", "centre": "centred Gaussian (reference)"}

Progress = Optional[Callable[..., None]]


class ExplainError(ValueError):
    """Bad input to ``explain`` (one-line message naming the argument or file and the fix)."""


@dataclasses.dataclass
class Cell:
    """One row of the figures.

    Attributes:
        kind: "correct", "wrong" or "image" (a file passed with ``images``).
        class_index: the class whose row this is (the true class), None for files.
        index: row of the split (file number for images); -1 for a "none found" placeholder.
        true: true label (None for files).
        pred: predicted label.
        confidence: predicted-class probability.
        name: path of the image (relative to the dataset) or the file name.
    """

    kind: str
    class_index: Optional[int]
    index: int
    true: Optional[int]
    pred: Optional[int]
    confidence: Optional[float]
    name: str = ""

    @property
    def placeholder(self) -> bool:
        """True for a row that only says that no such cell exists."""
        return self.index < 0


# --------------------------------------------------------------------------------------------
# Arguments, run folder, layers
# --------------------------------------------------------------------------------------------
def parse_methods(methods: Union[None, str, Sequence[str]]) -> List[str]:
    """Normalise a method list: names or comma-separated names, "all", case and "_"/"-" insensitive.

    Args:
        methods: None or "all" (every method), a string, or a sequence of strings.

    Returns:
        the canonical names, without duplicates, in the given order.

    Raises:
        ExplainError: on an unknown name (the message lists the valid ones) or an empty list.
    """
    if methods is None:
        return list(METHODS)
    items = [methods] if isinstance(methods, str) else list(methods)
    out: List[str] = []
    for item in items:
        for raw in str(item).split(","):
            key = raw.strip().lower().replace("_", "-")
            if not key:
                continue
            if key == "all":
                names = list(METHODS)
            else:
                key = _ALIASES.get(key, key)
                if key not in METHODS:
                    raise ExplainError(f"--methods {raw.strip()!r}: unknown method; choose from {', '.join(METHODS)} (or all)")
                names = [key]
            out.extend(n for n in names if n not in out)
    if not out:
        raise ExplainError(f"--methods: empty; choose from {', '.join(METHODS)} (or all)")
    return out


def _register_custom_objects() -> None:
    """Import cervical.models (and cervical.train) if present, so their registered layers load."""
    for name in ("cervical.models", "cervical.train"):
        try:
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
        except ImportError:
            pass


def load_run(run_dir: Union[str, os.PathLike]) -> Tuple[Any, Dict[str, Any]]:
    """Load a run folder's model and configuration.

    Args:
        run_dir: folder with ``model.keras`` (and normally ``config.json``).

    Returns:
        (model, config) where config is {} when ``config.json`` is absent.

    Raises:
        ExplainError: no such folder, no model, an unreadable config or a model that does not load.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ExplainError(f"--run {run}: no such folder; pass a run folder written by 'python cli.py train'")
    model_file = run / "model.keras"
    if not model_file.is_file():
        raise ExplainError(f"--run {run}: no model.keras in it; train a model there first ('python cli.py train --out {run}')")
    config: Dict[str, Any] = {}
    config_file = run / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ExplainError(f"{config_file}: unreadable ({type(exc).__name__}); restore or delete it") from None
        if not isinstance(config, dict):
            raise ExplainError(f"{config_file}: expected a JSON object (a run's config.json); restore or delete it")
    import keras

    _register_custom_objects()
    try:
        model = keras.models.load_model(model_file)
    except Exception as exc:  # Keras raises many types for a broken or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExplainError(f"{model_file}: cannot load the model ({type(exc).__name__}: {first[:200]}); retrain or check the file") from None
    return model, config


def _layer_paths(model: Any, suggest_only: bool = False) -> List[Tuple[str, str]]:
    """(path, name) of every layer with a 4-D output of spatial size > 1, forward order, nested expanded.

    ``suggest_only`` leaves out pooling, dropout-like and preprocessing layers (valid targets, but not
    ones to recommend), as :func:`cervical.cams.find_target_layer` does.
    """
    import keras

    skip = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Dropout,
            keras.layers.SpatialDropout2D, keras.layers.GaussianNoise, keras.layers.GaussianDropout)
    found: List[Tuple[str, str]] = []

    def walk(m: Any, prefix: str) -> None:
        for layer in m.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, keras.Model):
                walk(layer, f"{prefix}{layer.name}/")
            elif suggest_only and (isinstance(layer, skip) or "preprocessing" in type(layer).__module__):
                continue
            try:
                shape = tuple(layer.output.shape)
            except (AttributeError, ValueError, RuntimeError):
                continue
            if len(shape) == 4 and shape[1] is not None and shape[2] is not None and shape[1] * shape[2] > 1:
                found.append((f"{prefix}{layer.name}", layer.name))

    walk(model, "")
    return found


def candidate_layers(model: Any, suggest_only: bool = True) -> List[str]:
    """Layers to use as CAM targets: 4-D outputs (B, h, w, K) with h*w > 1, in forward order.

    Nested models are expanded in place; a name that occurs more than once is given as its
    "/"-path from the outer model (the form :mod:`cervical.cams` accepts).

    Args:
        model: a Keras model.
        suggest_only: leave out pooling, dropout-like and preprocessing layers.

    Returns:
        list of layer names (or paths).
    """
    everything = _layer_paths(model)
    counts: Dict[str, int] = {}
    for _, name in everything:
        counts[name] = counts.get(name, 0) + 1
    found = _layer_paths(model, suggest_only) if suggest_only else everything
    return [name if counts[name] == 1 else path for path, name in found]


def resolve_layer(model: Any, layer: Optional[str] = None, config: Optional[Dict[str, Any]] = None) -> str:
    """The CAM target layer: ``layer``, else config["feature_layer"], else the model's feature layer.

    The default comes from ``cervical.models.feature_layer_name`` when that module exists, else
    :func:`cervical.cams.find_target_layer` (the last 4-D feature map after its activation).

    Raises:
        ExplainError: if the layer (given or from the config) is not a 4-D feature-map layer of the
            model; the message lists the candidates nearest the output.
    """
    from cervical import cams

    source = "--layer"
    if layer is None and config and config.get("feature_layer"):
        layer, source = str(config["feature_layer"]), "config.json feature_layer"
    if layer is None:
        try:
            models = importlib.import_module("cervical.models")
            name = getattr(models, "feature_layer_name", None)
            layer = name(model) if name is not None else None
        except Exception:  # no models module yet, or a model it does not know
            layer = None
        if layer is None:
            try:
                return cams.find_target_layer(model)
            except cams.CamError as exc:
                raise ExplainError(f"--layer: {exc}") from None
        source = "the model's feature layer"
    if layer in candidate_layers(model, suggest_only=False) or layer in {p for p, _ in _layer_paths(model)}:
        return layer
    candidates = candidate_layers(model)
    shown = candidates[-12:]
    more = f" (and {len(candidates) - len(shown)} earlier)" if len(candidates) > len(shown) else ""
    raise ExplainError(f"{source} {layer!r}: not a 4-D feature-map layer of the model; choose one of "
                       f"{', '.join(shown) or 'none'}{more}")


def predict_probs(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) of raw images, predicted in batches (float32 input)."""
    out = []
    for start in range(0, len(x), batch_size):
        p = model.predict_on_batch(np.asarray(x[start:start + batch_size], dtype=np.float32))
        out.append(np.asarray(p.numpy() if hasattr(p, "numpy") else p, dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


# --------------------------------------------------------------------------------------------
# Choosing cells
# --------------------------------------------------------------------------------------------
def select_cells(y_true: np.ndarray, probs: np.ndarray, per_class: int = 1,
                 num_classes: Optional[int] = None, names: Optional[Sequence[str]] = None,
                 eligible: Optional[np.ndarray] = None) -> List[Cell]:
    """Deterministic choice of the cells to show, per true class.

    For every class c: the ``per_class`` correct predictions of class-c cells with the highest
    confidence p(pred), then the ``per_class`` wrong predictions of class-c cells with the highest
    confidence in the (wrong) predicted class; ties go to the lower index. Correct rows of all
    classes come first, then wrong rows. A class with none gets one placeholder row (index -1).

    Args:
        y_true: (N,) labels.
        probs: (N, K) predicted probabilities.
        per_class: cells per class and kind (>= 1).
        num_classes: K (default probs.shape[1]).
        names: optional (N,) names (paths) stored in the cells.
        eligible: optional (N,) bool; False rows are never chosen (e.g. augmented copies).

    Returns:
        list of :class:`Cell`.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k = p.shape[1] if num_classes is None else int(num_classes)
    pred = p.argmax(axis=1)
    conf = p[np.arange(len(p)), pred]
    ok = np.ones(len(y), bool) if eligible is None else np.asarray(eligible, bool)
    cells: List[Cell] = []
    for kind in ("correct", "wrong"):
        for c in range(k):
            hit = (pred == c) if kind == "correct" else (pred != c)
            rows = np.flatnonzero((y == c) & hit & ok)
            rows = rows[np.lexsort((rows, -conf[rows]))][: int(per_class)]
            if rows.size == 0:
                cells.append(Cell(kind, c, -1, c, None, None, ""))
            for i in rows:
                cells.append(Cell(kind, c, int(i), int(y[i]), int(pred[i]), float(conf[i]),
                                  str(names[i]) if names is not None else ""))
    return cells


def choose_eval_cells(y: np.ndarray, n: int, seed: int = 0, eligible: Optional[np.ndarray] = None) -> np.ndarray:
    """A class-balanced, seeded choice of n cells for the quantitative evaluation.

    Each class's rows are shuffled with ``numpy.random.default_rng(seed)``; rows are then taken
    round-robin over the classes (one of each class in turn) until n are chosen.

    Returns:
        sorted (min(n, N),) int64 row indices.
    """
    y = np.asarray(y, dtype=np.int64)
    ok = np.ones(len(y), bool) if eligible is None else np.asarray(eligible, bool)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero((y == c) & ok)) for c in np.unique(y[ok])]
    order: List[int] = []
    for j in range(max((len(pl) for pl in pools), default=0)):
        order.extend(int(pl[j]) for pl in pools if j < len(pl))
    return np.sort(np.array(order[: int(n)], dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Images from files
# --------------------------------------------------------------------------------------------
def load_images(paths: Sequence[Union[str, os.PathLike]], size: int, resize: str = "pad",
                interpolation: str = "area") -> Tuple[np.ndarray, List[str]]:
    """Read image files with the prepared dataset's preprocessing (RGB, pad to square, resize).

    Args:
        paths: image files (any format Pillow reads).
        size: side of the model's input.
        resize: "pad" or "stretch" (as the dataset was prepared).
        interpolation: "area", "bilinear" or "nearest".

    Returns:
        (x uint8 (N, size, size, 3), file names).

    Raises:
        ExplainError: a missing or unreadable file (named in the message).
    """
    from cervical import data

    if not paths:
        raise ExplainError("--images: no files given; pass one or more image paths")
    out, names = [], []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ExplainError(f"--images {path}: no such file")
        try:
            img = data.decode_rgb(path)
            img, _ = data.resize_cell(img, int(size), resize, interpolation)
        except data.DataError as exc:
            raise ExplainError(f"--images {str(exc).splitlines()[0]}") from None
        out.append(img)
        names.append(path.name)
    return np.stack(out), names


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------
def _lime_predict(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a Keras model so LIME can pass uint8 images (the model takes float raw pixels)."""
    def predict(batch: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(np.asarray(batch, dtype=np.float32))
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out)
    return predict


def _cam(model: Any, method: str, x: np.ndarray, classes: np.ndarray, layer: Optional[str], max_n: int) -> np.ndarray:
    from cervical import cams

    kwargs: Dict[str, Any] = {"class_index": np.asarray(classes, dtype=np.int64), "layer": layer}
    if method == "faster-scorecam":
        kwargs["max_n"] = max_n
    try:
        return np.asarray(cams.compute(method, model, x, **kwargs), dtype=np.float32)
    except cams.CamError as exc:
        raise ExplainError(f"{method}: {str(exc).splitlines()[0]}") from None


def _faster_max_n(model: Any, layer: Optional[str], max_n: int) -> int:
    """Faster-Score-CAM's max_n, capped at the target layer's number of channels."""
    import keras

    from cervical import cams

    if layer is None:
        try:
            layer = cams.find_target_layer(model)
        except cams.CamError:
            return max_n

    node: Any = model
    try:
        for part in layer.split("/"):
            node = node.get_layer(part)
    except ValueError:
        stack = [model]
        node = None
        while stack and node is None:
            m = stack.pop()
            for sub in m.layers:
                if sub.name == layer:
                    node = sub
                    break
                if isinstance(sub, keras.Model):
                    stack.append(sub)
    try:
        return max(1, min(int(max_n), int(node.output.shape[-1])))
    except (AttributeError, TypeError, ValueError):
        return max_n


def compute_maps(model: Any, images: np.ndarray, classes: np.ndarray, methods: Sequence[str],
                 layer: Optional[str] = None, lime_samples: int = 1000, lime_segments: int = 50,
                 max_n: int = 10, seed: int = 0, warmup: bool = False, progress: Progress = None,
                 segments: Optional[np.ndarray] = None) -> Tuple[Dict[str, np.ndarray], Dict[str, Any], Dict[str, float]]:
    """Explain the given class of every image with every method.

    Args:
        model: Keras model taking raw RGB pixels (float) and returning probabilities.
        images: (B, H, W, 3) uint8 (or float) raw images.
        classes: (B,) classes to explain (normally the predictions).
        methods: canonical method names (:func:`parse_methods`).
        layer: CAM target layer (None = :func:`cervical.cams.find_target_layer`).
        lime_samples, lime_segments: LIME's number of perturbed images and of SLIC superpixels.
        max_n: channels kept by Faster-Score-CAM (capped at the layer's channel count).
        seed: LIME's seed.
        warmup: run each method once on the first image before timing it (compilation excluded).
        progress: optional callable(done, total, note), one call per method.
        segments: optional (B, H, W) superpixels for LIME (computed with SLIC if None).

    Returns:
        (maps, lime, seconds): maps {method: float32 (B, H, W)} (CAMs in [0, 1]; LIME = the
        signed surrogate weight of each pixel's superpixel); lime {"explanations": [...],
        "segments": int32 (B, H, W)} or {} without LIME; seconds {method: wall seconds per image}.
    """
    from cervical import lime_lite

    x8 = np.asarray(images)
    x = x8.astype(np.float32)
    classes = np.asarray(classes, dtype=np.int64)
    n_cam = _faster_max_n(model, layer, max_n) if "faster-scorecam" in methods else max_n
    maps: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    lime: Dict[str, Any] = {}
    for j, method in enumerate(methods):
        if method == "lime":
            predict = _lime_predict(model)
            lime_img = x8 if x8.dtype == np.uint8 else x

            def run_lime(idx: Sequence[int], report: bool = False) -> List[Any]:
                out = []
                for i in idx:
                    if report and progress is not None:  # same step count, refreshed note
                        progress(j, len(methods), f"lime {i + 1}/{len(x)}")
                    try:
                        out.append(lime_lite.explain(predict, lime_img[i], class_index=int(classes[i]),
                                                     num_samples=lime_samples, n_segments=lime_segments,
                                                     seed=seed, segments=None if segments is None else segments[i]))
                    except lime_lite.LimeError as exc:
                        raise ExplainError(f"lime: {str(exc).splitlines()[0]}") from None
                return out

            if warmup:
                run_lime([0])
            exps, secs = xai_eval.timed(run_lime, range(len(x)), report=True)
            maps[method] = np.stack([e.weights[e.segments] for e in exps]).astype(np.float32)
            lime = {"explanations": exps, "segments": np.stack([e.segments for e in exps]).astype(np.int32)}
        else:
            if warmup:
                _cam(model, method, x[:1], classes[:1], layer, n_cam)
            maps[method], secs = xai_eval.timed(_cam, model, method, x, classes, layer, n_cam)
        seconds[method] = secs / max(len(x), 1)
        if progress is not None:
            progress(j + 1, len(methods), method)
    return maps, lime, seconds


def reference_maps(shape: Tuple[int, int, int], seed: int = 0) -> Dict[str, np.ndarray]:
    """Two model-free maps that frame the metrics.

    "random": i.i.d. uniform values (seeded), the chance level of every metric;
    "centre": exp(-r^2 / (2 s^2)), r the distance to the image centre, s = min(H, W) / 6 - cells are
    cropped around their nucleus, so this is what knowing only the crop scores.

    Args:
        shape: (B, H, W).
        seed: seed of the random map.

    Returns:
        {"random": float32 (B, H, W), "centre": float32 (B, H, W)}.
    """
    b, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    s = min(h, w) / 6.0
    centre = np.exp(-((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) / (2 * s * s))
    return {"random": rng.uniform(size=(b, h, w)).astype(np.float32),
            "centre": np.broadcast_to(centre, (b, h, w)).astype(np.float32)}


# --------------------------------------------------------------------------------------------
# Quantitative evaluation
# --------------------------------------------------------------------------------------------
def _sanity_fn(method: str, layer: Optional[str], max_n: int, lime_samples: int, seed: int,
               segments: Optional[np.ndarray]) -> Callable[[Any, np.ndarray, np.ndarray], np.ndarray]:
    """explain_fn(model, images, classes) for the randomisation check (LIME keeps its superpixels)."""
    def fn(model: Any, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        maps, _, _ = compute_maps(model, images, classes, [method], layer=layer, lime_samples=lime_samples,
                                  max_n=max_n, seed=seed, segments=segments)
        return maps[method]
    return fn


def evaluate_cells(model: Any, images: np.ndarray, labels: np.ndarray, masks: Optional[np.ndarray],
                   methods: Sequence[str], layer: Optional[str] = None, *, lime_samples: int = 1000,
                   lime_segments: int = 50, max_n: int = 10, seed: int = 0, steps: int = xai_eval.STEPS,
                   baseline: str = "blur", tolerance: float = 0.0, n_sanity: int = 5,
                   sanity_blocks: Optional[int] = 5, sanity_mode: str = "permute",
                   sanity_threshold: float = 0.9, batch_size: int = 126,
                   progress: Progress = None) -> Dict[str, Any]:
    """Quantitative XAI metrics of every method on a set of cells (the predicted class is explained).

    Per cell and method: deletion and insertion AUC (:func:`cervical.xai_eval.perturbation_curves`,
    5 % steps, blurred baseline); with masks (0 background, 1 cytoplasm, 2 nucleus) the energy share
    and pointing hit for the nucleus (mask == 2) and the whole cell (mask >= 1), and their chance
    levels (area fractions); time per cell. Then mean +/- std over cells, the mean curves, and the
    cascading randomisation check on ``n_sanity`` of them, one class after another.

    Args:
        model: Keras model (raw pixels in, probabilities out).
        images: (N, H, W, 3) uint8 raw images.
        labels: (N,) true labels (used for the accuracy of the evaluated cells only).
        masks: (N, H, W) label masks or None (localisation then reported as unavailable).
        methods: method names.
        layer: CAM target layer.
        lime_samples, lime_segments, max_n, seed: as :func:`compute_maps`.
        steps, baseline: deletion/insertion settings.
        tolerance: pointing-game tolerance in pixels.
        n_sanity: cells used by the sanity check (0 = skip it).
        sanity_blocks, sanity_mode, sanity_threshold: see :func:`cervical.xai_eval.randomisation_check`.
        batch_size: model batch for the perturbation curves.
        progress: optional callable(done, total, note).

    Returns:
        JSON-ready dict (see ``xai_metrics.json``).
    """
    x8 = np.asarray(images)
    x = x8.astype(np.float32)
    probs = predict_probs(model, x)
    pred = probs.argmax(axis=1)
    n = len(x)
    stages = len(methods) + 2 + (len(methods) if n_sanity > 0 else 0)
    done = [0]

    def tick(note: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], stages, note)

    segments = None
    slic_seconds = 0.0
    if "lime" in methods:
        from cervical import lime_lite
        t0 = time.perf_counter()
        segments = np.stack([lime_lite.segment(x8[i], n_segments=lime_segments) for i in range(n)])
        slic_seconds = (time.perf_counter() - t0) / max(n, 1)
    maps: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    for method in methods:
        m, _, s = compute_maps(model, x8, pred, [method], layer=layer, lime_samples=lime_samples,
                               lime_segments=lime_segments, max_n=max_n, seed=seed, warmup=True,
                               segments=segments)
        maps.update(m)
        seconds.update(s)
        tick(f"maps {method}")
    if "lime" in seconds and seconds["lime"] is not None:
        seconds["lime"] += slic_seconds   # its superpixels were computed once, above
    refs = reference_maps(x.shape[:3], seed=seed)
    every = {**maps, **refs}

    curves: Dict[str, Dict[str, np.ndarray]] = {}
    fractions = None
    for name, a in every.items():
        curves[name] = {}
        for mode in ("deletion", "insertion"):
            fractions, p = xai_eval.perturbation_curves(model, x, a, pred, mode=mode, baseline=baseline,
                                                        steps=steps, batch_size=batch_size)
            curves[name][mode] = p
    tick("deletion/insertion")

    have_masks = masks is not None
    per_cell: Dict[str, Dict[str, List[Optional[float]]]] = {}
    chance: Dict[str, Any] = {}
    if have_masks:
        nucleus = np.asarray(masks) == 2
        cell = np.asarray(masks) >= 1
        chance = {
            "nucleus_area": xai_eval.summarize([xai_eval.area_fraction(m) for m in nucleus]),
            "cell_area": xai_eval.summarize([xai_eval.area_fraction(m) for m in cell]),
            "nucleus_pointing": xai_eval.summarize([xai_eval.area_fraction(m, tolerance) for m in nucleus]),
            "cell_pointing": xai_eval.summarize([xai_eval.area_fraction(m, tolerance) for m in cell]),
        }
    results: Dict[str, Dict[str, Any]] = {}
    for name, a in every.items():
        values: Dict[str, np.ndarray] = {
            "deletion_auc": xai_eval.curve_auc(fractions, curves[name]["deletion"]),
            "insertion_auc": xai_eval.curve_auc(fractions, curves[name]["insertion"]),
        }
        if have_masks:
            values["nucleus_energy"] = np.array([xai_eval.energy_share(a[i], nucleus[i]) for i in range(n)])
            values["cell_energy"] = np.array([xai_eval.energy_share(a[i], cell[i]) for i in range(n)])
            values["nucleus_pointing"] = np.array([xai_eval.pointing_hit(a[i], nucleus[i], tolerance) for i in range(n)])
            values["cell_pointing"] = np.array([xai_eval.pointing_hit(a[i], cell[i], tolerance) for i in range(n)])
        results[name] = {k: xai_eval.summarize(v) for k, v in values.items()}
        results[name]["seconds_per_cell"] = seconds.get(name)
        results[name]["mean_deletion_curve"] = curves[name]["deletion"].mean(axis=0).tolist()
        results[name]["mean_insertion_curve"] = curves[name]["insertion"].mean(axis=0).tolist()
        per_cell[name] = {k: [None if np.isnan(v) else float(v) for v in np.asarray(vals, dtype=np.float64)]
                          for k, vals in values.items()}
    tick("localisation")

    sanity: Dict[str, Any] = {}
    k = min(int(n_sanity), n)
    if k > 0:
        # class-balanced among the evaluated cells (their rows are ordered by class: the first k
        # would all be one cell type)
        sel = choose_eval_cells(np.asarray(labels), k, seed=seed)
        for method in methods:
            fn = _sanity_fn(method, layer, max_n, lime_samples, seed, None if segments is None else segments[sel])
            def block_note(j: int, blocks: int, _note: str = "", method: str = method) -> None:
                if progress is not None:  # refresh the current step's note
                    progress(done[0], stages, f"sanity {method} block {j}/{blocks}")

            res = xai_eval.randomisation_check(model, fn, x8[sel], class_index=pred[sel], blocks=sanity_blocks,
                                               mode=sanity_mode, threshold=sanity_threshold, seed=seed,
                                               progress=block_note)
            sanity[method] = res
            tick(f"sanity {method}")

    return {
        "n_cells": n,
        "accuracy_on_cells": float(np.mean(pred == np.asarray(labels))) if n else None,
        "explained_class": "predicted",
        "layer": layer,
        "settings": {"steps": int(steps), "baseline": baseline,
                     "blur_sigma": "max(H, W) / 10" if baseline == "blur" else None,
                     "pointing_tolerance_px": float(tolerance), "lime_samples": int(lime_samples),
                     "lime_segments": int(lime_segments), "faster_scorecam_max_n": int(max_n),
                     "seed": int(seed), "sanity_cells": k, "sanity_blocks": sanity_blocks,
                     "sanity_mode": sanity_mode, "sanity_threshold": float(sanity_threshold)},
        "fractions": None if fractions is None else fractions.tolist(),
        "localisation_available": have_masks,
        "chance": chance,
        "methods": {m: results[m] for m in methods},
        "reference": {r: results[r] for r in refs},
        "sanity": sanity,
        "per_cell": per_cell,
    }


def _fmt(stat: Optional[Dict[str, Any]], digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_metrics_md(metrics: Dict[str, Any], title: str = "XAI evaluation") -> str:
    """The Markdown report of :func:`evaluate_cells`: one metrics table and one sanity table."""
    s = metrics["settings"]
    loc = metrics["localisation_available"]
    blur = " (Gaussian, sigma = max(H, W) / 10)" if s["baseline"] == "blur" else ""
    tol = s["pointing_tolerance_px"]
    tol_text = f" (tolerance {tol:g} px)" if tol else ""
    lines = [f"# {title}", "",
             f"{metrics['n_cells']} cells; the predicted class is explained (accuracy on these cells "
             f"{metrics['accuracy_on_cells']:.3f}); CAM layer `{metrics['layer']}`.", "",
             f"- Deletion / insertion (Petsiuk et al. 2018): pixels removed / revealed in decreasing map "
             f"order in {100 / s['steps']:g} % steps, baseline = {s['baseline']} image{blur}; area under the "
             f"predicted-class probability. Deletion: lower is better; insertion: higher is better.",
             f"- Energy share (energy-based pointing game): share of the positive map energy inside the "
             f"mask (a map with no positive energy counts as uniform); pointing: share of the map's "
             f"maximal pixels inside the mask{tol_text} (1 or 0 for a single peak; a LIME superpixel "
             f"plateau counts pro rata). Chance = mask area fraction (what a uniform map or a random "
             f"point scores).",
             "- Time: wall seconds per cell after one warm-up call.", ""]
    head = "| method | deletion AUC ↓ | insertion AUC ↑ |"
    rule = "|---|---|---|"
    if loc:
        head += " nucleus energy ↑ | cell energy ↑ | nucleus pointing ↑ | cell pointing ↑ |"
        rule += "---|---|---|---|"
    else:
        head += " localisation |"
        rule += "---|"
    lines += [head + " s / cell | sanity |", rule + "---|---|"]
    ch = metrics.get("chance", {})
    rows = [(m, r, False) for m, r in metrics["methods"].items()]
    rows += [(m, r, True) for m, r in metrics["reference"].items()]
    for name, r, is_ref in rows:
        cells = [_TITLES.get(name, name), _fmt(r["deletion_auc"]), _fmt(r["insertion_auc"])]
        if loc:
            cells += [f"{_fmt(r['nucleus_energy'])} (chance {_fmt(ch['nucleus_area'])})",
                      f"{_fmt(r['cell_energy'])} (chance {_fmt(ch['cell_area'])})",
                      f"{_rate(r['nucleus_pointing'])} (chance {_num(ch['nucleus_pointing']['mean'])})",
                      f"{_rate(r['cell_pointing'])} (chance {_num(ch['cell_pointing']['mean'])})"]
        else:
            cells.append("unavailable (no masks)")
        sec = r.get("seconds_per_cell")
        cells.append("-" if sec is None else f"{sec:.3g}")
        san = None if is_ref else metrics["sanity"].get(name)
        cells.append("-" if san is None else f"{_verdict(san)} (ρ {_num(san['final_similarity'])})")
        lines.append("| " + " | ".join(cells) + " |")
    if metrics["sanity"]:
        lines += ["", f"## Sanity check (Adebayo et al. 2018, cascading randomisation, mode {s['sanity_mode']})", "",
                  f"Spearman ρ between the maps of the trained model and those after randomising the layers "
                  f"with weights from the output back, cumulatively ({s['sanity_cells']} cells; in brackets "
                  f"the number of layers randomised so far). A method whose ρ stays above "
                  f"{s['sanity_threshold']:g} with the whole model random does not depend on what the model "
                  f"learned and FAILS.", "",
                  "| method | ρ after each block | final ρ | verdict |", "|---|---|---|---|"]
        for name, san in metrics["sanity"].items():
            seq = " → ".join(f"{_num(st['similarity'])} ({st['n_randomised']})" for st in san["steps"])
            verdict = _verdict(san) + (": maps do not depend on the weights" if san["passed"] is False else "")
            lines.append(f"| {_TITLES.get(name, name)} | {seq} | {_num(san['final_similarity'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def _rate(stat: Dict[str, Any]) -> str:
    """A mean hit rate with its number of cells, e.g. "0.80 (n 30)" (ties make hits fractional)."""
    if stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.2f} (n {stat['n']})"


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _verdict(sanity: Dict[str, Any]) -> str:
    if sanity["passed"] is None:
        return "n/a (constant maps)"
    return "pass" if sanity["passed"] else "**FAIL**"


# --------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _method_slug(method: str) -> str:
    return method.replace("++", "_pp").replace("-", "_")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    tmp = _tmp(path)
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _save_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_json(path: Path, obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return None if np.isnan(o) else float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)
    _save_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def _save_npz(path: Path, arrays: Dict[str, np.ndarray]) -> None:
    tmp = _tmp(path)
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)


def _save_figure(fig: Any, path: Path) -> None:
    tmp = _tmp(path)
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype == np.uint8:
        return a
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _row_label(cell: Cell, class_names: Sequence[str]) -> str:
    def cname(i: Optional[int]) -> str:
        name = class_names[i] if i is not None and 0 <= i < len(class_names) else str(i)
        return name if len(name) <= 24 else name[:23] + "…"
    if cell.kind == "image":
        stem = cell.name if len(cell.name) <= 24 else cell.name[:23] + "…"
        return f"{stem}\npred {cname(cell.pred)} ({cell.confidence:.2f})"
    return f"true {cname(cell.true)}\npred {cname(cell.pred)} ({cell.confidence:.2f})"


def _grid(rows: List[Dict[str, Any]], columns: List[str], title: str, path: Path) -> None:
    """Write a grid figure: one row per cell (panels or a note), one column per panel type.

    The layout is fixed (no tight_layout), so every panel has the same size whatever the labels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = max(len(rows), 1), len(columns)
    panel, label_h, title_h = 1.7, 0.42, 0.5 + 0.42   # the title sits above the first row's labels
    width = max(n_cols * panel + 0.3, 5.0)
    height = n_rows * (panel + label_h) + title_h
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.15 / width, right=1 - 0.15 / width, bottom=0.1 / height,
                        top=1 - title_h / height, wspace=0.06, hspace=label_h / panel)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for r, row in enumerate(rows):
        if row.get("note"):
            axes[r, 0].text(0.0, 0.5, row["note"], transform=axes[r, 0].transAxes, fontsize=8,
                            ha="left", va="center")
            continue
        for c, image in enumerate(row["panels"]):
            axes[r, c].imshow(image, interpolation="nearest")
            axes[r, c].set_title(row["label"] if c == 0 else columns[c], fontsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 0.1 / height, va="top")
    _save_figure(fig, path)


def _write_outputs(out: Path, cells: List[Cell], x8: np.ndarray, maps: Dict[str, np.ndarray],
                   lime: Dict[str, Any], methods: Sequence[str], class_names: Sequence[str],
                   masks: Optional[np.ndarray], layer: Optional[str], context: str,
                   lime_features: int) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Figures, per-panel PNGs, maps.npz and cells.json for the chosen cells (x8 = real cells only)."""
    from cervical import cams

    out.mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    files: List[str] = []
    real = [c for c in cells if not c.placeholder]
    cam_methods = [m for m in methods if m != "lime"]
    exps = lime.get("explanations", [])
    cell_records: List[Dict[str, Any]] = []
    panels_cam: List[List[np.ndarray]] = []
    panels_lime: List[List[np.ndarray]] = []
    for j, cell in enumerate(real):
        rowid = (f"img{j:02d}-{_slug(Path(cell.name).stem)}" if cell.kind == "image"
                 else f"{cell.kind}-{_slug(class_names[cell.class_index])}-idx{cell.index}")
        written = {}
        image_file = f"overlays/{rowid}_image.png"
        _save_png(out / image_file, x8[j])
        written["image"] = image_file
        row_cam = [x8[j]]
        for m in cam_methods:
            ov = cams.overlay(x8[j], maps[m][j])
            name = f"overlays/{rowid}_{_method_slug(m)}.png"
            _save_png(out / name, ov)
            written[m] = name
            row_cam.append(ov)
        row_lime = [x8[j]]
        if exps:
            for mode in ("positive", "pros_cons"):
                rgb = _to_uint8(exps[j].render(lime_features, mode=mode))
                name = f"overlays/{rowid}_lime_{mode}.png"
                _save_png(out / name, rgb)
                written[f"lime_{mode}"] = name
                row_lime.append(rgb)
        panels_cam.append(row_cam)
        panels_lime.append(row_lime)
        files.extend(written.values())
        cell_records.append({**dataclasses.asdict(cell), "row": j, "files": written,
                             "true_name": None if cell.true is None else class_names[cell.true],
                             "pred_name": class_names[cell.pred]})
    for cell in cells:
        if cell.placeholder:
            cell_records.append({**dataclasses.asdict(cell), "row": None, "files": {},
                                 "note": _placeholder_note(cell, class_names, context)})

    kinds = ["image"] if cells and cells[0].kind == "image" else ["correct", "wrong"]
    for kind in kinds:
        rows_cam, rows_lime = [], []
        j = 0
        for cell in cells:
            if cell.kind != kind:
                if not cell.placeholder:
                    j += 1
                continue
            if cell.placeholder:
                note = {"note": _placeholder_note(cell, class_names, context)}
                rows_cam.append(note)
                rows_lime.append(note)
                continue
            label = _row_label(cell, class_names)
            rows_cam.append({"label": label, "panels": panels_cam[j]})
            rows_lime.append({"label": label, "panels": panels_lime[j]})
            j += 1
        what = {"correct": "correctly classified", "wrong": "misclassified", "image": "image files"}[kind]
        if cam_methods:
            name = f"cams_{kind if kind != 'image' else 'images'}.png"
            _grid(rows_cam, ["image"] + [_TITLES[m] for m in cam_methods],
                  f"CAMs of the predicted class: {what} ({context}; layer {layer})", out / name)
            files.append(name)
        if exps:
            name = f"lime_{kind if kind != 'image' else 'images'}.png"
            _grid(rows_lime, ["image", f"LIME top {lime_features} (for)", "pros green / cons red"],
                  f"LIME, predicted class: {what} ({context})", out / name)
            files.append(name)

    arrays: Dict[str, np.ndarray] = {
        "image": x8.astype(np.uint8),
        "index": np.array([c.index for c in real], dtype=np.int64),
        "kind": np.array([c.kind for c in real], dtype=str),
        "true": np.array([-1 if c.true is None else c.true for c in real], dtype=np.int64),
        "pred": np.array([c.pred for c in real], dtype=np.int64),
        "confidence": np.array([c.confidence for c in real], dtype=np.float32),
        "name": np.array([c.name for c in real], dtype=str),
        "class_names": np.array(list(class_names), dtype=str),
        "layer": np.array("" if layer is None else layer),
    }
    for m in methods:
        arrays[f"map_{_method_slug(m)}"] = maps[m].astype(np.float32)
    if exps:
        width = max(e.num_features for e in exps)
        weights = np.full((len(exps), width), np.nan, dtype=np.float32)
        for i, e in enumerate(exps):
            weights[i, : e.num_features] = e.weights
        arrays["lime_segments"] = lime["segments"]
        arrays["lime_weights"] = weights
        arrays["lime_score"] = np.array([e.score for e in exps], dtype=np.float32)
    if masks is not None:
        arrays["mask"] = np.asarray(masks, dtype=np.uint8)
    _save_npz(out / "maps.npz", arrays)
    files.append("maps.npz")
    _save_json(out / "cells.json", {"context": context, "layer": layer, "methods": list(methods),
                                    "class_names": list(class_names), "cells": cell_records})
    files.append("cells.json")
    return files, cell_records


def _placeholder_note(cell: Cell, class_names: Sequence[str], context: str) -> str:
    what = "correctly classified" if cell.kind == "correct" else "misclassified"
    return f"no {what} {class_names[cell.class_index]} cell in {context}"


def _curves_figure(metrics: Dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    f = metrics["fractions"]
    for group, style in (("methods", "-"), ("reference", ":")):
        for name, r in metrics[group].items():
            for ax, key in zip(axes, ("mean_deletion_curve", "mean_insertion_curve")):
                ax.plot(f, r[key], style, label=_TITLES.get(name, name))
    for ax, t in zip(axes, ("Deletion (lower area is better)", "Insertion (higher area is better)")):
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("fraction of pixels removed / revealed")
        ax.set_ylabel("predicted-class probability")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ExplainError(f"{name} {value!r}: must be an integer >= {minimum}")
    return int(value)


def explain_run(run_dir: Union[str, os.PathLike], split: str = "test",
                methods: Union[None, str, Sequence[str]] = METHODS, per_class: int = 1,
                out_dir: Optional[Union[str, os.PathLike]] = None, evaluate: bool = False,
                n_eval: int = 50, images: Optional[Sequence[Union[str, os.PathLike]]] = None,
                layer: Optional[str] = None, seed: int = 0, progress: Progress = None, *,
                data_dir: Optional[Union[str, os.PathLike]] = None, lime_samples: int = 1000,
                lime_segments: int = 50, lime_features: int = 5, max_n: int = 10,
                n_sanity: int = 5, sanity_blocks: Optional[int] = 5, sanity_mode: str = "permute",
                tolerance: float = 0.0) -> Dict[str, Any]:
    """Explain a run's predictions (figures, overlays, raw maps) and optionally evaluate the methods.

    Args:
        run_dir: run folder with ``model.keras`` and ``config.json``.
        split: dataset split to explain ("train", "val", "test"; augmented copies are never chosen).
        methods: method names, "all" or None (every method); see :data:`METHODS`.
        per_class: correct and wrong cells shown per class.
        out_dir: output folder (default ``RUN/explain/<split>`` or ``RUN/explain/images``).
        evaluate: also compute the quantitative metrics on ``n_eval`` cells of the split.
        n_eval: cells in the evaluation.
        images: image files to explain instead of a split (no evaluation).
        layer: CAM target layer (default: config's feature_layer, else the model's last feature map).
        seed: seed of LIME, of the evaluation's cell choice and of the randomisation.
        progress: optional callable(done, total, note) called after each step.
        data_dir: prepared dataset folder (default: config.json's data_dir).
        lime_samples, lime_segments, lime_features: LIME's samples, superpixels and shown superpixels.
        max_n: Faster-Score-CAM's channels.
        n_sanity, sanity_blocks, sanity_mode: randomisation check cells, blocks and mode.
        tolerance: pointing-game tolerance in pixels.

    Returns:
        {"out_dir": str, "files": [paths relative to out_dir], "cells": [...], "layer": str | None,
        "metrics": dict | None}.

    Raises:
        ExplainError: missing run or model, unknown method or layer, unreadable image, bad numbers.
        cervical.data.DataError: the dataset named by the run (or ``data_dir``) cannot be read.
    """
    from cervical import data

    methods = parse_methods(methods)
    per_class = _check_positive("--per-class", per_class)
    n_eval = _check_positive("--n-eval", n_eval)
    lime_samples = _check_positive("--lime-samples", lime_samples, 2)
    lime_features = _check_positive("lime_features", lime_features)
    max_n = _check_positive("max_n", max_n)
    n_sanity = _check_positive("--n-sanity", n_sanity, 0)
    if images and evaluate:
        raise ExplainError("--evaluate: needs a labelled split, not --images; run them separately")
    for p in images or []:
        if not Path(p).is_file():  # fail before the (slow) model load
            raise ExplainError(f"--images {p}: no such file")
    model, config = load_run(run_dir)
    cam_layer = resolve_layer(model, layer, config) if any(m != "lime" for m in methods) else None
    run = Path(run_dir)
    ddir = data_dir if data_dir is not None else config.get("data_dir")
    info: Dict[str, Any] = {}
    if ddir is not None:
        try:
            info = data.read_info(ddir)
        except data.DataError:
            if not images:
                raise
    class_names = list(config.get("class_names") or info.get("class_names") or [])
    # one progress counter over every step: predictions, maps per method, figures, evaluation steps
    eval_steps = (2 * len(methods) + 2 if n_sanity > 0 else len(methods) + 2) if evaluate else 0
    total = 2 + len(methods) + eval_steps

    def sub(offset: int, prefix: str) -> Progress:
        if progress is None:
            return None
        return lambda done, _total, note="": progress(offset + done, total, f"{prefix}{note}")

    def tick(done: int, note: str) -> None:
        if progress is not None:
            progress(done, total, note)

    masks_all = None
    if images:
        size = config.get("image_size") or info.get("image_size") or model.input_shape[1]
        if not size:
            raise ExplainError(f"--run {run}: cannot tell the model's input size; add image_size to config.json")
        x8, names = load_images(images, int(size), info.get("resize", config.get("resize", "pad")),
                                info.get("interpolation", config.get("interpolation", "area")))
        probs = predict_probs(model, x8)
        if len(class_names) != probs.shape[1]:
            class_names = [f"class {i}" for i in range(probs.shape[1])]
        pred = probs.argmax(axis=1)
        cells = [Cell("image", None, j, None, int(pred[j]), float(probs[j, pred[j]]), names[j])
                 for j in range(len(x8))]
        out = Path(out_dir) if out_dir is not None else run / "explain" / "images"
        context = "image files"
        rows = np.arange(len(x8))
        split_data = None
    else:
        if ddir is None:
            raise ExplainError(f"--run {run}: config.json names no data_dir; pass --data DIR (the prepared dataset)")
        split_data = data.load_split(ddir, split)
        class_names = class_names or list(split_data.class_names)
        probs = predict_probs(model, split_data.x)
        if probs.shape[1] != len(class_names):
            raise ExplainError(f"--run {run}: the model has {probs.shape[1]} outputs but the data has "
                               f"{len(class_names)} classes; pass the dataset the run was trained on with --data")
        cells = select_cells(split_data.y, probs, per_class, len(class_names), split_data.paths,
                             eligible=~split_data.augmented)
        rows = np.array([c.index for c in cells if not c.placeholder], dtype=np.int64)
        x8 = split_data.x[rows]
        masks_all = split_data.masks
        out = Path(out_dir) if out_dir is not None else run / "explain" / split
        context = f"{split} split"
    tick(1, "predictions")

    classes = np.array([c.pred for c in cells if not c.placeholder], dtype=np.int64)
    if len(x8):
        maps, lime, _ = compute_maps(model, x8, classes, methods, layer=cam_layer, lime_samples=lime_samples,
                                     lime_segments=lime_segments, max_n=max_n, seed=seed,
                                     progress=sub(1, "maps "))
    else:
        maps, lime = {m: np.zeros((0,) + split_data.x.shape[1:3], np.float32) for m in methods}, {}
    files, records = _write_outputs(out, cells, x8, maps, lime, methods, class_names,
                                    None if masks_all is None else masks_all[rows], cam_layer, context,
                                    lime_features)
    tick(2 + len(methods), "figures")

    metrics = None
    if evaluate:
        eligible = ~split_data.augmented
        idx = choose_eval_cells(split_data.y, n_eval, seed, eligible)
        metrics = evaluate_cells(model, split_data.x[idx], split_data.y[idx],
                                 None if split_data.masks is None else split_data.masks[idx], methods,
                                 cam_layer, lime_samples=lime_samples, lime_segments=lime_segments,
                                 max_n=max_n, seed=seed, tolerance=tolerance, n_sanity=n_sanity,
                                 sanity_blocks=sanity_blocks, sanity_mode=sanity_mode, progress=sub(2 + len(methods), "evaluate "))
        metrics = {"run": str(run), "split": split, "cell_indices": idx.tolist(),
                   "cell_paths": [split_data.paths[i] for i in idx], **metrics}
        _save_json(out / "xai_metrics.json", metrics)
        _save_text(out / "xai_metrics.md", format_metrics_md(metrics, f"XAI evaluation: {run.name}, {split} split"))
        _curves_figure(metrics, out / "xai_curves.png")
        files += ["xai_metrics.json", "xai_metrics.md", "xai_curves.png"]
    return {"out_dir": str(out), "files": files, "cells": records, "layer": cam_layer, "metrics": metrics}
