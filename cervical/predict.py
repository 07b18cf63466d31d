"""``predict``: a trained run applied to new image files: the class and every class probability.

    predict(run_dir, ["cells/", "one.png"], out="predictions.csv")

Images are read and resized exactly as the run's prepared dataset was (its dataset.json: size,
resize mode, interpolation), so a cell cropped like the training cells is seen as they were. A
folder stands for every image under it (bmp, png, jpg, tif), sorted. Nothing is written but the
CSV (atomically); ``explain --images`` draws the maps of the same files.

This is a research tool: its predictions carry the uncertainty of the run's own evaluation
(``eval``'s intervals), and are not a diagnosis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from cervical import files

__all__ = ["PredictError", "image_files", "predict", "format_predictions"]


class PredictError(ValueError):
    """Bad input to ``predict``; the message is one line naming the input and the fix."""


def image_files(inputs: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """Files and folders -> the image files, each folder's images sorted by path.

    Raises:
        PredictError: nothing given, a path that does not exist, or a folder without images.
    """
    from cervical.readers import IMAGE_EXTS

    if not inputs:
        raise PredictError("IMAGES: no files or folders given; pass image files or a folder")
    out: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise PredictError(f"{path}: a folder without images ({', '.join(IMAGE_EXTS)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise PredictError(f"{path}: no such file or folder")
    return out


def predict(run_dir: Union[str, os.PathLike], inputs: Sequence[Union[str, os.PathLike]],
            out: Optional[Union[str, os.PathLike]] = None, batch_size: int = 64) -> dict:
    """Classify image files with a run's model.

    Args:
        run_dir: a run folder (``cli.py train``).
        inputs: image files and folders.
        out: CSV to write (path, predicted, confidence, prob_<class> ...); None writes nothing.
        batch_size: images per forward pass.
    Returns:
        {"run", "class_names", "rows": [{"path", "predicted", "confidence", "probabilities"}],
        "out"}.
    Raises:
        PredictError: bad inputs, or a run whose model or preprocessing cannot be read.
    """
    from cervical import explain, models

    paths = image_files(inputs)
    try:
        model, config = explain.load_run(run_dir)
        info = _dataset_json(config.get("data_dir"))
        size = int(config.get("image_size") or info.get("image_size") or model.input_shape[1])
        x, _ = explain.load_images(paths, size, info.get("resize", "pad"),
                                   info.get("interpolation", "area"))
    except explain.ExplainError as exc:
        raise PredictError(str(exc).replace("--images ", "")) from None
    probs = models.predict_proba(model, x, batch_size=batch_size)
    names = list(config.get("class_names") or info.get("class_names") or [])
    if len(names) != probs.shape[1]:
        names = [f"class {i}" for i in range(probs.shape[1])]
    rows = [{"path": str(p), "predicted": names[int(k)], "confidence": float(probs[i, k]),
             "probabilities": dict(zip(names, map(float, probs[i])))}
            for i, (p, k) in enumerate(zip(paths, probs.argmax(axis=1)))]
    if out is not None:
        files.write_csv(out, ["path", "predicted", "confidence"] + [f"prob_{n}" for n in names],
                        [[r["path"], r["predicted"], r["confidence"]]
                         + [r["probabilities"][n] for n in names] for r in rows])
    return {"run": str(run_dir), "class_names": names, "rows": rows,
            "out": None if out is None else str(out)}


def _dataset_json(data_dir: Optional[str]) -> dict:
    """The run's dataset.json (its image size and resizing), or {} when it is not here."""
    from cervical import data

    try:
        return data.read_info(data_dir) if data_dir else {}
    except data.DataError:
        return {}


def format_predictions(result: Dict) -> str:
    """One line per image: file, predicted class, its probability."""
    width = max((len(Path(r["path"]).name) for r in result["rows"]), default=4)
    lines = [f"{'image':<{width}}  predicted (probability)"]
    for r in result["rows"]:
        lines.append(f"{Path(r['path']).name:<{width}}  {r['predicted']} ({r['confidence']:.3f})")
    if result["out"]:
        lines.append(f"{len(result['rows'])} predictions written to {result['out']}")
    return "\n".join(lines)
