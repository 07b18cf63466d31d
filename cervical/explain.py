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

4. With ``evaluate=True``: on ``n_eval`` class-balanced, seeded cells of the split, every metric of
   :func:`cervical.xai_eval.evaluate_methods` (deletion/insertion AUC, ROAD MoRF/LeRF, nucleus and
   cell energy share and pointing game against the masks with their chance levels, time per cell,
   the cascading randomisation sanity check, four model-free reference maps and the paired
   comparison of every method with each of them, intervals over the cells' cluster images),
   written to ``xai_metrics.json``, ``xai_metrics.md`` and ``xai_curves.png``.

``images=[...]`` explains arbitrary image files instead of a split, with the same preprocessing as the
prepared dataset (decode to RGB, pad to square, resize to the model's input size).

Class probabilities follow the one rule of :func:`cervical.models.as_probabilities` (a model that
outputs logits is softmaxed), so eval and explain agree on any model. All outputs go to
``RUN/explain/<split>/`` (``RUN/explain/images/`` for files) unless ``out_dir`` is given; every file
is written atomically. Errors are :class:`ExplainError` (a ``ValueError``) with a one-line message
naming the argument and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from cervical import cams, files, gallery, xai_eval

__all__ = ["ExplainError", "METHODS", "CAM_METHODS", "TITLES", "Cell", "parse_methods",
           "load_run", "choose_cam_layer", "select_cells", "load_images", "compute_maps",
           "explainers", "explain_run"]

#: Every method, in the order of the figures' columns: the CAM registry of cervical.cams, then LIME.
METHODS: Tuple[str, ...] = tuple(cams.METHODS) + ("lime",)
CAM_METHODS: Tuple[str, ...] = tuple(cams.METHODS)
TITLES = {**cams.TITLES, "lime": "LIME"}

Progress = Optional[files.Progress]


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
    """Normalise a method list: names or comma-separated names, "all", any spelling
    :func:`cervical.cams.canonical_method` accepts, and "lime".

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
            key = raw.strip()
            if not key:
                continue
            if key.lower() in ("all", "lime"):
                names = list(METHODS) if key.lower() == "all" else ["lime"]
            else:
                name = cams.canonical_method(key)
                if name is None:
                    raise ExplainError(f"--methods {key!r}: unknown method; choose from "
                                       f"{', '.join(METHODS)} (or all)")
                names = [name]
            out.extend(n for n in names if n not in out)
    if not out:
        raise ExplainError(f"--methods: empty; choose from {', '.join(METHODS)} (or all)")
    return out


def load_run(run_dir: Union[str, os.PathLike]) -> Tuple[Any, Dict[str, Any]]:
    """Load a run folder's model (safe mode) and configuration.

    Returns:
        (model, config) where config is {} when ``config.json`` is absent.

    Raises:
        ExplainError: no such folder, no model, an unreadable config or a model that does not load.
    """
    from cervical import models

    run = Path(run_dir)
    if not run.is_dir():
        raise ExplainError(f"--run {run}: no such folder; pass a run folder written by 'python cli.py train'")
    model_file = run / "model.keras"
    if not model_file.is_file():
        raise ExplainError(f"--run {run}: no model.keras in it; train a model there first ('python cli.py train --out {run}')")
    try:
        config = files.read_run_config(run)
        model = models.load_model_file(model_file)
    except (files.OutputError, models.ModelError) as exc:
        raise ExplainError(str(exc)) from None
    return model, config


def choose_cam_layer(model: Any, layer: Optional[str] = None,
                     config: Optional[Dict[str, Any]] = None) -> str:
    """The CAM target layer: ``layer``, else config["feature_layer"], else the model's feature layer.

    The default is :func:`cervical.models.feature_layer_name` for models built here, else
    :func:`cervical.cams.find_target_layer` (the last 4-D feature map after its activation).

    Raises:
        ExplainError: if the layer (given or from the config) is not a 4-D feature-map layer of the
            model; the message lists the candidates nearest the output.
    """
    from cervical import models

    source = "--layer"
    if layer is None and config and config.get("feature_layer"):
        layer, source = str(config["feature_layer"]), "config.json feature_layer"
    if layer is None:
        try:
            return models.feature_layer_name(model)
        except models.ModelError:
            try:
                return cams.find_target_layer(model)
            except cams.CamError as exc:
                raise ExplainError(f"--layer: {exc}") from None
    try:
        _, target = cams.resolve_layer(model, layer)
        shape = tuple(target.output.shape)
    except (cams.CamError, AttributeError, ValueError, RuntimeError):
        shape = ()
    if len(shape) == 4 and shape[1] and shape[2] and shape[1] * shape[2] > 1:
        return layer
    candidates = cams.feature_map_layers(model)
    shown = candidates[-12:]
    more = f" (and {len(candidates) - len(shown)} earlier)" if len(candidates) > len(shown) else ""
    raise ExplainError(f"{source} {layer!r}: not a 4-D feature-map layer of the model; choose one of "
                       f"{', '.join(shown) or 'none'}{more}")


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


def load_images(paths: Sequence[Union[str, os.PathLike]], size: int, resize: str = "pad",
                interpolation: str = "area") -> Tuple[np.ndarray, List[str]]:
    """Read image files with the prepared dataset's preprocessing (RGB, pad to square, resize).

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
# Maps: one small explainer per method
# --------------------------------------------------------------------------------------------
def _probabilities(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """images -> probabilities by the one rule of cervical.models (for LIME and the curves)."""
    from cervical import models

    def predict(batch: np.ndarray) -> np.ndarray:
        out = model.predict_on_batch(np.asarray(batch, dtype=np.float32))
        return models.as_probabilities(out.numpy() if hasattr(out, "numpy") else out)
    return predict


def _layer_channels(model: Any, layer: Optional[str]) -> Optional[int]:
    """Channels of the CAM target layer's output (None if unknown)."""
    try:
        _, target = cams.resolve_layer(model, layer)
        return int(target.output.shape[-1])
    except (cams.CamError, AttributeError, TypeError, ValueError):
        return None


class _Superpixels:
    """LIME's SLIC superpixels, computed once per distinct image and remembered (with their time),
    so timing, the figures and the sanity check all explain the same segments."""

    def __init__(self, n_segments: int) -> None:
        self.n_segments = int(n_segments)
        self._cache: Dict[bytes, np.ndarray] = {}
        self.seconds: List[float] = []

    def __call__(self, image: np.ndarray) -> np.ndarray:
        from cervical import lime_lite

        key = np.asarray(image, dtype=np.float32).tobytes()   # uint8 and float copies share it
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = lime_lite.segment(image, n_segments=self.n_segments)
            self.seconds.append(time.perf_counter() - t0)
        return self._cache[key]

    @property
    def seconds_per_image(self) -> float:
        return float(np.mean(self.seconds)) if self.seconds else 0.0


def explainers(methods: Sequence[str], layer: Optional[str] = None, *, lime_samples: int = 1000,
               lime_segments: int = 50, max_n: int = 10, seed: int = 0,
               superpixels: Optional[_Superpixels] = None, keep: Optional[dict] = None
               ) -> Dict[str, xai_eval.ExplainFn]:
    """One ``explain(model, images, classes) -> (B, H, W) maps`` per method.

    CAMs are in [0, 1] (:func:`cervical.cams.compute`); the LIME map is the signed surrogate weight
    of each pixel's superpixel. ``keep`` (a dict) receives LIME's explanation objects of the last
    call under "lime".

    Raises (when called):
        ExplainError: a method fails on these inputs (one line).
    """
    superpixels = superpixels or _Superpixels(lime_segments)
    out: Dict[str, xai_eval.ExplainFn] = {}
    for method in methods:
        if method == "lime":
            out[method] = _lime_explainer(lime_samples, lime_segments, seed, superpixels, keep)
        else:
            out[method] = _cam_explainer(method, layer, max_n)
    return out


def _cam_explainer(method: str, layer: Optional[str], max_n: int) -> xai_eval.ExplainFn:
    def explain(model: Any, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        kwargs: Dict[str, Any] = {"class_index": np.asarray(classes, dtype=np.int64),
                                  "layer": layer}
        if method == "faster-scorecam":        # max_n capped at the layer's channel count
            kwargs["max_n"] = max(1, min(int(max_n), _layer_channels(model, layer) or int(max_n)))
        try:
            return np.asarray(cams.compute(method, model, np.asarray(images, np.float32), **kwargs),
                              dtype=np.float32)
        except cams.CamError as exc:
            raise ExplainError(f"{method}: {str(exc).splitlines()[0]}") from None
    return explain


def _lime_explainer(samples: int, n_segments: int, seed: int, superpixels: _Superpixels,
                    keep: Optional[dict]) -> xai_eval.ExplainFn:
    from cervical import lime_lite

    def explain(model: Any, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        predict = _probabilities(model)
        exps = []
        for image, c in zip(np.asarray(images), np.asarray(classes)):
            try:
                exps.append(lime_lite.explain(predict, image, class_index=int(c),
                                              num_samples=samples, n_segments=n_segments,
                                              seed=seed, segments=superpixels(image)))
            except lime_lite.LimeError as exc:
                raise ExplainError(f"lime: {str(exc).splitlines()[0]}") from None
        if keep is not None:
            keep["lime"] = exps
        return np.stack([e.weights[e.segments] for e in exps]).astype(np.float32)
    return explain


def compute_maps(model: Any, images: np.ndarray, classes: np.ndarray, methods: Sequence[str],
                 layer: Optional[str] = None, lime_samples: int = 1000, lime_segments: int = 50,
                 max_n: int = 10, seed: int = 0, progress: Progress = None
                 ) -> Tuple[Dict[str, np.ndarray], List[Any]]:
    """Explain the given class of every image with every method.

    Args:
        model: Keras model taking raw RGB pixels (float) and returning probabilities.
        images: (B, H, W, 3) uint8 raw images.
        classes: (B,) classes to explain (normally the predictions).
        methods: canonical method names (:func:`parse_methods`).
        layer: CAM target layer (None = :func:`cervical.cams.find_target_layer`).
        lime_samples, lime_segments: LIME's number of perturbed images and of SLIC superpixels.
        max_n: channels kept by Faster-Score-CAM (capped at the layer's channel count).
        seed: LIME's seed.
        progress: None, or ``progress(step, done, total)``, one call per method.

    Returns:
        (maps {method: float32 (B, H, W)}, LIME's explanations ([] without LIME)).
    """
    if len(images) == 0:
        return {m: np.zeros((0,) + np.shape(images)[1:3], np.float32) for m in methods}, []
    keep: Dict[str, Any] = {}
    fns = explainers(methods, layer, lime_samples=lime_samples, lime_segments=lime_segments,
                     max_n=max_n, seed=seed, keep=keep)
    maps = {}
    for j, (method, explain) in enumerate(fns.items()):
        maps[method] = explain(model, np.asarray(images), np.asarray(classes, dtype=np.int64))
        files.report_progress(progress, "maps", j + 1, len(fns))
    return maps, keep.get("lime", [])


# --------------------------------------------------------------------------------------------
# The command, step by step
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Target:
    """What is explained: the chosen cells, their pixels and where the outputs go."""

    cells: List[Cell]
    x8: np.ndarray                      # uint8 pixels of the real (non-placeholder) cells
    masks: Optional[np.ndarray]         # their masks, when the data has them
    class_names: List[str]
    out: Path
    context: str                        # "test split", "image files", ...
    split: Any = None                   # the loaded cervical.data.Split (None for files)


def explain_run(run_dir: Union[str, os.PathLike], split: str = "test",
                methods: Union[None, str, Sequence[str]] = METHODS, per_class: int = 1,
                out_dir: Optional[Union[str, os.PathLike]] = None, evaluate: bool = False,
                n_eval: int = 50, images: Optional[Sequence[Union[str, os.PathLike]]] = None,
                layer: Optional[str] = None, seed: int = 0, progress: Progress = None, *,
                data_dir: Optional[Union[str, os.PathLike]] = None, lime_samples: int = 1000,
                lime_segments: int = 50, lime_features: int = 5, max_n: int = 10,
                n_sanity: int = 5, sanity_blocks: Optional[int] = 5, sanity_mode: str = "permute",
                tolerance: float = 0.0,
                explain_class: Optional[Union[str, int]] = None,
                overwrite: bool = True) -> Dict[str, Any]:
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
        progress: None, or ``progress(step, done, total)`` (cervical.files.Progress).
        data_dir: prepared dataset folder (default: config.json's data_dir).
        lime_samples, lime_segments, lime_features: LIME's samples, superpixels and shown superpixels.
        max_n: Faster-Score-CAM's channels.
        n_sanity, sanity_blocks, sanity_mode: randomisation check cells, blocks and mode.
        tolerance: pointing-game tolerance in pixels.
        explain_class: the class every map explains, by name or index (default: each cell's
            predicted class), e.g. to ask why a cell was not called abnormal.
        overwrite: replace an earlier explanation in the output folder (the command line asks
            for --overwrite; refused otherwise, before any work).

    Returns:
        {"out_dir": str, "files": [paths relative to out_dir], "cells": [...], "layer": str | None,
        "metrics": dict | None, "explained_class": name or "predicted"}.

    Raises:
        ExplainError: missing run or model, unknown method or layer, unreadable image, bad numbers.
        cervical.data.DataError: the dataset named by the run (or ``data_dir``) cannot be read.
    """
    methods = parse_methods(methods)
    _check_args(images, evaluate, tolerance,
                {"--per-class": (per_class, 1, "per_class_shown"), "--n-eval": (n_eval, 1, "n_eval"),
                 "--lime-samples": (lime_samples, 2, "lime_samples"),
                 "--lime-segments": (lime_segments, 1, "lime_segments"),
                 "lime_features": (lime_features, 1, "lime_segments"),
                 "--max-n": (max_n, 1, "max_n"), "--n-sanity": (n_sanity, 0, "n_sanity")})
    if out_dir is not None:
        files.check_output_dir(out_dir, "cells.json")
    model, config = load_run(run_dir)
    cam_layer = choose_cam_layer(model, layer, config) if set(methods) - {"lime"} else None
    target = (_image_target(model, config, run_dir, images, out_dir, data_dir) if images else
              _split_target(model, config, run_dir, split, per_class, out_dir, data_dir))
    files.check_output_dir(target.out, "cells.json", replace=overwrite)
    files.report_progress(progress, "explain: predictions", 1, 1)
    shown = [c.pred for c in target.cells if not c.placeholder]
    fixed = _class_index(explain_class, target.class_names)
    maps, lime = compute_maps(model, target.x8,
                              np.array(shown if fixed is None else [fixed] * len(shown),
                                       dtype=np.int64), methods, layer=cam_layer, lime_samples=lime_samples,
                              lime_segments=lime_segments, max_n=max_n, seed=seed,
                              progress=_prefixed(progress, "explain: "))
    final, metrics = target.out, None
    # every file is written to a folder beside the output and swapped in whole at the end
    with files.output_lock(final), files.atomic_dir(final, "cells.json") as stage:
        target.out = stage
        written, records = _write_outputs(target, maps, lime, methods, cam_layer, lime_features)
        if evaluate:
            metrics = _evaluate(model, target, methods, cam_layer, Path(run_dir), split, n_eval,
                                xai_eval.EvalSettings(tolerance=tolerance, n_sanity=n_sanity,
                                                      sanity_blocks=sanity_blocks,
                                                      sanity_mode=sanity_mode, seed=seed),
                                dict(lime_samples=lime_samples, lime_segments=lime_segments,
                                     max_n=max_n), progress)
            written += ["xai_metrics.json", "xai_metrics.md", "xai_curves.png"]
        gallery.write_explain_gallery(stage, f"Explanations: {Path(run_dir).name}, "
                                             f"{target.context}")
        written.append("index.html")
    return {"out_dir": str(final), "files": written, "cells": records, "layer": cam_layer,
            "metrics": metrics,
            "explained_class": "predicted" if fixed is None else target.class_names[fixed]}


def _class_index(value: Optional[Union[str, int]], class_names: Sequence[str]) -> Optional[int]:
    """--class NAME|INDEX -> the class index, or None (each cell's predicted class)."""
    if value is None:
        return None
    if str(value) in class_names:
        return list(class_names).index(str(value))
    if str(value).isdigit() and int(value) < len(class_names):
        return int(value)
    raise ExplainError(f"--class {value}: not a class of this run; choose a name or index of "
                       f"{', '.join(class_names)}")


def _check_args(images, evaluate: bool, tolerance: float,
                numbers: Dict[str, Tuple[Any, int, str]]) -> None:
    """Every argument check that needs no model (so bad input fails before the slow load)."""
    from cervical import LIMITS, out_of_range

    for name, (value, minimum, limit) in numbers.items():
        problem = out_of_range(name, value, minimum, limit)
        if problem:
            raise ExplainError(problem)
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        tol = float("nan")
    if not math.isfinite(tol) or not 0 <= tol <= LIMITS["tolerance"]:
        raise ExplainError(f"--tolerance {tolerance!r}: must be a number 0 to {LIMITS['tolerance']}")
    if images and evaluate:
        raise ExplainError("--evaluate: needs a labelled split, not --images; run them separately")
    for p in images or []:
        if not Path(p).is_file():
            raise ExplainError(f"--images {p}: no such file")


def _prefixed(progress: Progress, prefix: str) -> Progress:
    if progress is None:
        return None
    return lambda step, done, total: progress(f"{prefix}{step}", done, total)


def _dataset_info(config: dict, data_dir, required: bool) -> Tuple[Optional[str], dict]:
    """(the prepared dataset folder, its dataset.json) of the run or of --data."""
    from cervical import data

    ddir = data_dir if data_dir is not None else config.get("data_dir")
    if ddir is None:
        return None, {}
    try:
        return str(ddir), data.read_info(ddir)
    except data.DataError:
        if required:
            raise
        return str(ddir), {}


def _split_target(model: Any, config: dict, run_dir, split: str, per_class: int, out_dir,
                  data_dir) -> _Target:
    """The most confident correct and wrong cells of every class of a split."""
    from cervical import data, models

    ddir, info = _dataset_info(config, data_dir, required=True)
    if ddir is None:
        raise ExplainError(f"--run {run_dir}: config.json names no data_dir; pass --data DIR "
                           f"(the prepared dataset)")
    part = data.load_split(ddir, split, mmap=True)       # read a batch at a time
    class_names = list(config.get("class_names") or info.get("class_names") or part.class_names)
    mismatch = models.input_size_mismatch(model, part.x, ddir)
    if mismatch:
        raise ExplainError(mismatch)
    probs = models.predict_proba(model, part.x)
    if probs.shape[1] != len(class_names):
        raise ExplainError(f"--run {run_dir}: the model has {probs.shape[1]} outputs but the data "
                           f"has {len(class_names)} classes; pass the dataset the run was trained "
                           f"on with --data")
    cells = select_cells(part.y, probs, per_class, len(class_names), part.paths,
                         eligible=~part.augmented)
    rows = np.array([c.index for c in cells if not c.placeholder], dtype=np.int64)
    return _Target(cells, part.x[rows], None if part.masks is None else part.masks[rows],
                   class_names, Path(out_dir) if out_dir is not None else
                   Path(run_dir) / "explain" / split, f"{split} split", part)


def _image_target(model: Any, config: dict, run_dir, images, out_dir, data_dir) -> _Target:
    """Image files, prepared like the run's dataset, with the model's predictions."""
    from cervical import models

    _, info = _dataset_info(config, data_dir, required=False)
    size = config.get("image_size") or info.get("image_size") or model.input_shape[1]
    if not size:
        raise ExplainError(f"--run {run_dir}: cannot tell the model's input size; add image_size "
                           f"to config.json")
    x8, names = load_images(images, int(size), info.get("resize", config.get("resize", "pad")),
                            info.get("interpolation", config.get("interpolation", "area")))
    probs = models.predict_proba(model, x8)
    class_names = list(config.get("class_names") or info.get("class_names") or [])
    if len(class_names) != probs.shape[1]:
        class_names = [f"class {i}" for i in range(probs.shape[1])]
    pred = probs.argmax(axis=1)
    cells = [Cell("image", None, j, None, int(pred[j]), float(probs[j, pred[j]]), names[j])
             for j in range(len(x8))]
    return _Target(cells, x8, None, class_names,
                   Path(out_dir) if out_dir is not None else Path(run_dir) / "explain" / "images",
                   "image files")


def _evaluate(model: Any, target: _Target, methods: Sequence[str], layer: Optional[str],
              run: Path, split: str, n_eval: int, settings: xai_eval.EvalSettings,
              lime_options: dict, progress: Progress) -> Dict[str, Any]:
    """xai_eval.evaluate_methods on n_eval class-balanced cells; xai_metrics.json/.md/curves."""
    part = target.split
    idx = xai_eval.choose_eval_cells(part.y, n_eval, settings.seed, ~part.augmented)
    superpixels = _Superpixels(lime_options["lime_segments"])
    fns = explainers(methods, layer, seed=settings.seed, superpixels=superpixels, **lime_options)
    if "lime" in methods:                        # SLIC once per cell, its time added to LIME's
        for image in part.x[idx]:
            superpixels(image)
    metrics = xai_eval.evaluate_methods(
        model, part.x[idx], part.y[idx], None if part.masks is None else part.masks[idx], fns,
        predict=_probabilities(model), settings=settings,
        extra_seconds={"lime": superpixels.seconds_per_image}, progress=_prefixed(progress, "explain: "),
        groups=[part.groups[i] for i in idx])
    metrics["settings"].update({"lime_samples": int(lime_options["lime_samples"]),
                                "lime_segments": int(lime_options["lime_segments"]),
                                "faster_scorecam_max_n": int(lime_options["max_n"])})
    metrics = {"run": str(run), "split": split, "cell_indices": idx.tolist(),
               "cell_paths": [part.paths[i] for i in idx], "layer": layer, **metrics}
    files.write_json(target.out / "xai_metrics.json", metrics)
    files.write_text(target.out / "xai_metrics.md", xai_eval.format_metrics_md(
        metrics, f"XAI evaluation: {run.name}, {split} split", TITLES))
    files.save_figure(xai_eval.plot_curves(metrics, TITLES), target.out / "xai_curves.png",
                      dpi=110, tight=False)
    return metrics


# --------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _method_slug(method: str) -> str:
    return method.replace("++", "_pp").replace("-", "_")


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    a = np.asarray(rgb)
    if a.dtype == np.uint8:
        return a
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def _write_outputs(target: _Target, maps: Dict[str, np.ndarray], lime: List[Any],
                   methods: Sequence[str], layer: Optional[str], lime_features: int
                   ) -> Tuple[List[str], List[Dict[str, Any]]]:
    """Per-panel PNGs, the grid figures, maps.npz and cells.json of the chosen cells."""
    (target.out / "overlays").mkdir(parents=True, exist_ok=True)
    panels, records = _write_panels(target, maps, lime, methods, lime_features)
    written = [f for r in records for f in r["files"].values()]
    written += _write_grids(target, panels, methods, layer, lime, lime_features)
    files.save_npz(target.out / "maps.npz", _maps_arrays(target, maps, lime, methods, layer))
    files.write_json(target.out / "cells.json", {
        "context": target.context, "layer": layer, "methods": list(methods),
        "class_names": target.class_names, "cells": records})
    return written + ["maps.npz", "cells.json"], records


def _write_panels(target: _Target, maps: Dict[str, np.ndarray], lime: List[Any],
                  methods: Sequence[str], lime_features: int):
    """Every panel as its own PNG: ({"cam": rows, "lime": rows}, cells.json records)."""
    names = target.class_names
    real = [c for c in target.cells if not c.placeholder]
    panels: Dict[str, List[List[np.ndarray]]] = {"cam": [], "lime": []}
    records: List[Dict[str, Any]] = []
    for j, cell in enumerate(real):
        rowid = (f"img{j:02d}-{_slug(Path(cell.name).stem)}" if cell.kind == "image"
                 else f"{cell.kind}-{_slug(names[cell.class_index])}-idx{cell.index}")
        image = target.x8[j]
        row = {"image": image}
        row.update({m: cams.overlay(image, maps[m][j]) for m in methods if m != "lime"})
        if lime:
            for mode in ("positive", "pros_cons"):
                row[f"lime_{mode}"] = _to_uint8(lime[j].render(lime_features, mode=mode))
        written = {}
        for key, rgb in row.items():
            name = f"overlays/{rowid}_{'image' if key == 'image' else _method_slug(key)}.png"
            files.save_png(target.out / name, rgb)
            written[key] = name
        panels["cam"].append([image] + [row[m] for m in methods if m != "lime"])
        panels["lime"].append([image] + [row[k] for k in ("lime_positive", "lime_pros_cons")
                                          if k in row])
        records.append({**dataclasses.asdict(cell), "row": j, "files": written,
                        "true_name": None if cell.true is None else names[cell.true],
                        "pred_name": names[cell.pred]})
    for cell in target.cells:
        if cell.placeholder:
            records.append({**dataclasses.asdict(cell), "row": None, "files": {},
                            "note": _placeholder_note(cell, names, target.context)})
    return panels, records


def _write_grids(target: _Target, panels: Dict[str, list], methods: Sequence[str],
                 layer: Optional[str], lime: List[Any], lime_features: int) -> List[str]:
    """cams_<kind>.png and lime_<kind>.png: one row per cell (or a note), one column per panel."""
    cam_methods = [m for m in methods if m != "lime"]
    kinds = ["image"] if target.cells and target.cells[0].kind == "image" else ["correct", "wrong"]
    written = []
    for kind in kinds:
        rows = _grid_rows(target, panels, kind)
        what = {"correct": "correctly classified", "wrong": "misclassified",
                "image": "image files"}[kind]
        suffix = kind if kind != "image" else "images"
        if cam_methods:
            _grid(rows["cam"], ["image"] + [TITLES[m] for m in cam_methods],
                  f"CAMs of the predicted class: {what} ({target.context}; layer {layer})",
                  target.out / f"cams_{suffix}.png")
            written.append(f"cams_{suffix}.png")
        if lime:
            _grid(rows["lime"], ["image", f"LIME top {lime_features} (for)",
                                 "pros green / cons red"],
                  f"LIME, predicted class: {what} ({target.context})",
                  target.out / f"lime_{suffix}.png")
            written.append(f"lime_{suffix}.png")
    return written


def _grid_rows(target: _Target, panels: Dict[str, list], kind: str) -> Dict[str, list]:
    """The rows of one kind's figures, placeholders as notes (panels are indexed by real cell)."""
    rows: Dict[str, list] = {"cam": [], "lime": []}
    j = 0
    for cell in target.cells:
        if cell.placeholder:
            if cell.kind == kind:
                note = {"note": _placeholder_note(cell, target.class_names, target.context)}
                rows["cam"].append(note)
                rows["lime"].append(note)
            continue
        if cell.kind == kind:
            label = _row_label(cell, target.class_names)
            rows["cam"].append({"label": label, "panels": panels["cam"][j]})
            rows["lime"].append({"label": label, "panels": panels["lime"][j]})
        j += 1
    return rows


def _maps_arrays(target: _Target, maps: Dict[str, np.ndarray], lime: List[Any],
                 methods: Sequence[str], layer: Optional[str]) -> Dict[str, np.ndarray]:
    """maps.npz: the raw maps with everything needed to redraw or re-score them."""
    real = [c for c in target.cells if not c.placeholder]
    arrays: Dict[str, np.ndarray] = {
        "image": target.x8.astype(np.uint8),
        "index": np.array([c.index for c in real], dtype=np.int64),
        "kind": np.array([c.kind for c in real], dtype=str),
        "true": np.array([-1 if c.true is None else c.true for c in real], dtype=np.int64),
        "pred": np.array([c.pred for c in real], dtype=np.int64),
        "confidence": np.array([c.confidence for c in real], dtype=np.float32),
        "name": np.array([c.name for c in real], dtype=str),
        "class_names": np.array(list(target.class_names), dtype=str),
        "layer": np.array("" if layer is None else layer),
    }
    for m in methods:
        arrays[f"map_{_method_slug(m)}"] = maps[m].astype(np.float32)
    if lime:
        width = max(e.num_features for e in lime)
        weights = np.full((len(lime), width), np.nan, dtype=np.float32)
        for i, e in enumerate(lime):
            weights[i, : e.num_features] = e.weights
        arrays["lime_segments"] = np.stack([e.segments for e in lime]).astype(np.int32)
        arrays["lime_weights"] = weights
        arrays["lime_score"] = np.array([e.score for e in lime], dtype=np.float32)
    if target.masks is not None:
        arrays["mask"] = np.asarray(target.masks, dtype=np.uint8)
    return arrays


def _placeholder_note(cell: Cell, class_names: Sequence[str], context: str) -> str:
    what = "correctly classified" if cell.kind == "correct" else "misclassified"
    return f"no {what} {class_names[cell.class_index]} cell in {context}"


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
    from matplotlib.figure import Figure

    n_rows, n_cols = max(len(rows), 1), len(columns)
    panel, label_h, title_h = 1.7, 0.42, 0.5 + 0.42   # the title sits above the first row's labels
    width = max(n_cols * panel + 0.3, 5.0)
    height = n_rows * (panel + label_h) + title_h
    fig = Figure(figsize=(width, height))
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
    files.save_figure(fig, path, dpi=110, tight=False)
