"""The prepared-dataset format: write it, read it back, and what training takes from it.

Layout (``cervical.data.prepare`` writes it; every later step reads it)::

    DIR/dataset.json          class names, task, counts per split, size analysis, seed, versions, fingerprint
    DIR/manifest.csv          path,class_name,label,group,split,source,augmented,source_class,stem,mask
    DIR/images/<split>/<class>/<stem>.png         lossless RGB at the target size
    DIR/masks/<split>/<class>/<stem>.png          label mask: 0 background, 1 cytoplasm, 2 nucleus
    DIR/cache/<split>_{x,y,masks}.npy             the same pixels as arrays, for fast loading
    DIR/analysis/*.png|json   size analysis, class distribution, montage
    DIR/skipped.txt           unreadable inputs that were skipped (one per line, with the reason)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from cervical import files
from cervical.readers import DataError
from cervical.splits import SPLITS

# The study's class-weight constants (balanced weights of its *test* labels 163/165/159/158/167,
# docs/study.md §7). Kept for parity runs only; ours come from train labels.
THESIS_CLASS_WEIGHTS = {0: 0.996319018404908, 1: 0.9842424242424243, 2: 1.0213836477987421,
                        3: 1.0278481012658227, 4: 0.9724550898203593}


# ------------------------------------------------------------------------------------------------
# Class weights (cost-sensitive learning, thesis Eq. 3.2)
# ------------------------------------------------------------------------------------------------

def class_weights(labels: Sequence[int], num_classes: Optional[int] = None) -> Dict[int, float]:
    """Balanced class weights w_c = n / (K * n_c) (the study's formula; scikit-learn's "balanced").

    The study computed these on its *test* labels (163/165/159/158/167), giving THESIS_CLASS_WEIGHTS;
    call this on TRAIN labels. A class absent from ``labels`` gets weight 0 (it never contributes).

    Args:
        labels: integer class ids.
        num_classes: K; default max(label) + 1.
    Returns:
        {class id: weight}.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size == 0:
        raise DataError("class_weights: no labels given; pass the training labels")
    k = int(num_classes if num_classes is not None else y.max() + 1)
    counts = np.bincount(y, minlength=k)
    present = counts > 0
    k_present = int(present.sum()) if num_classes is None else k
    return {c: (float(y.size / (k_present * counts[c])) if counts[c] else 0.0) for c in range(k)}


# ------------------------------------------------------------------------------------------------
# Prepared folders: write and load
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Split:
    """One split of a prepared dataset, as arrays."""

    x: np.ndarray                    # uint8 (N, H, W, 3) raw RGB
    y: np.ndarray                    # int64 (N,)
    paths: List[str]                 # relative to the prepared folder
    groups: List[str]
    augmented: np.ndarray            # bool (N,)
    masks: Optional[np.ndarray]      # uint8 (N, H, W): 0 background, 1 cytoplasm, 2 nucleus
    class_names: List[str]
    sources: List[str] = dataclasses.field(default_factory=list)  # original file of each row

    def __len__(self) -> int:
        return int(self.y.shape[0])


MANIFEST_COLUMNS = ("path", "class_name", "label", "group", "split", "source", "augmented",
                    "source_class", "stem", "mask")


def read_info(data_dir: os.PathLike) -> dict:
    """Read ``DIR/dataset.json`` of a prepared dataset.

    Raises:
        DataError: DIR is missing or is not a prepared dataset (run ``cli.py prepare`` first).
    """
    d = Path(data_dir)
    f = d / "dataset.json"
    if not f.is_file():
        if (d / "fold_0" / "dataset.json").is_file():
            raise DataError(f"--data {d}: holds K-fold datasets; pass one of {d}/fold_<k>")
        raise DataError(f"--data {d}: not a prepared dataset (no dataset.json); run "
                        f"'python cli.py prepare --out {d}' first")
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{f}: unreadable ({type(exc).__name__}); prepare the dataset again") from None


def read_manifest(data_dir: os.PathLike) -> List[dict]:
    """Rows of ``DIR/manifest.csv`` as dicts (strings), in file order."""
    f = Path(data_dir) / "manifest.csv"
    if not f.is_file():
        raise DataError(f"--data {data_dir}: manifest.csv missing; prepare the dataset again")
    with open(f, newline="") as fh:
        return list(csv.DictReader(fh))


def load_split(data_dir: os.PathLike, split: str = "train", mmap: bool = False,
               masks: bool = True) -> Split:
    """Load one split of a prepared dataset from its array cache.

    Args:
        data_dir: a folder written by ``prepare`` (or ``write_prepared``).
        split: "train" (augmented copies included), "val", "test", or "all" (every original image
            of the three splits, no augmented copies).
        mmap: map the images from disk instead of reading them (``np.load(mmap_mode="r")``):
            memory then holds only the pages in use, so a split larger than RAM can be streamed
            (the values are the same; the array is read-only).
        masks: also load the masks (training does not use them).
    Raises:
        DataError: not a prepared dataset, unknown split, or an empty split.
    """
    info = read_info(data_dir)
    d = Path(data_dir)
    if split == "all":
        parts = [load_split(d, s, masks=masks) for s in SPLITS if info.get("totals", {}).get(s)]
        keep = [~p.augmented for p in parts]
        return Split(
            x=np.concatenate([p.x[k] for p, k in zip(parts, keep)]),
            y=np.concatenate([p.y[k] for p, k in zip(parts, keep)]),
            paths=[q for p, k in zip(parts, keep) for q, kk in zip(p.paths, k) if kk],
            groups=[q for p, k in zip(parts, keep) for q, kk in zip(p.groups, k) if kk],
            augmented=np.zeros(sum(int(k.sum()) for k in keep), dtype=bool),
            masks=(np.concatenate([p.masks[k] for p, k in zip(parts, keep)])
                   if all(p.masks is not None for p in parts) else None),
            class_names=list(info["class_names"]),
            sources=[q for p, k in zip(parts, keep) for q, kk in zip(p.sources, k) if kk])
    if split not in SPLITS:
        raise DataError(f"--split {split}: unknown; choose train, val, test or all")
    xf = d / "cache" / f"{split}_x.npy"
    if not xf.is_file():
        raise DataError(f"--data {d}: split '{split}' is empty or its cache is missing; "
                        f"prepare the dataset again")
    x = np.load(xf, mmap_mode="r" if mmap else None)
    y = np.load(d / "cache" / f"{split}_y.npy").astype(np.int64)
    mf = d / "cache" / f"{split}_masks.npy"
    mask_array = np.load(mf, mmap_mode="r" if mmap else None) if masks and mf.is_file() else None
    rows = [r for r in read_manifest(d) if r["split"] == split]
    if len(rows) != len(y):
        raise DataError(f"{d}: manifest.csv and cache disagree for split '{split}' "
                        f"({len(rows)} vs {len(y)} rows); prepare the dataset again")
    if len(y) == 0:
        raise DataError(f"--split {split}: no images in {d}; choose another split")
    return Split(x=x, y=y, paths=[r["path"] for r in rows], groups=[r["group"] for r in rows],
                 augmented=np.array([r["augmented"] == "1" for r in rows], dtype=bool),
                 masks=mask_array, class_names=list(info["class_names"]),
                 sources=[r["source"] for r in rows])


def write_prepared(out_dir: os.PathLike, splits: Dict[str, dict], class_names: Sequence[str],
                   info: Optional[dict] = None, save_images: bool = True) -> None:
    """Write a prepared dataset folder from arrays (used by ``prepare`` and by test fixtures).

    Args:
        out_dir: destination; must not exist or be empty (``prepare`` handles --overwrite).
        splits: {"train"|"val"|"test": dict(x=uint8 (N,H,W,3), y=int (N,), and optionally
            paths/stems, groups, sources, source_classes, augmented (bool N), masks (uint8 N,H,W))}.
            ``x`` and ``masks`` may also be row sequences (``shape``, ``dtype``, integer
            indexing; e.g. ``files.RowFile``): they are written a chunk of rows at a time.
        class_names: names of label ids 0..K-1.
        info: extra keys for dataset.json (task, dataset, split protocol, seed, ...).
        save_images: also write every image (and mask) as PNG next to the cache.

    A row's PNG is ``images/<split>/<class>/<stem>.png``, or ``<source_class>__<stem>.png`` when
    its source class differs from its task class (merged classes: SIPaKMeD stems repeat across
    source classes). Two rows with the same path raise DataError before anything is written.
    """
    out = Path(out_dir)
    _check_unique_paths(splits, class_names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    rows = []
    counts: Dict[str, Dict[str, int]] = {}
    originals: Dict[str, int] = {s: 0 for s in SPLITS}
    has_masks = True
    for split in SPLITS:
        s = splits.get(split)
        if s is None or len(s["y"]) == 0:
            counts[split] = {c: 0 for c in class_names}
            continue
        x = _rows(s["x"])
        y = np.asarray(s["y"], dtype=np.int64)
        n = len(y)
        if len(x.shape) != 4 or x.shape[0] != n or x.shape[-1] != 3:
            raise DataError(f"write_prepared: split '{split}' x must be (N,H,W,3) with N={n}")
        masks = None if s.get("masks") is None else _rows(s["masks"])
        has_masks &= masks is not None
        stems = list(s.get("stems") or [f"{split}_{i:05d}" for i in range(n)])
        groups = list(s.get("groups") or stems)
        sources = list(s.get("sources") or [""] * n)
        src_cls = list(s.get("source_classes") or [class_names[int(c)] for c in y])
        aug = np.zeros(n, bool) if s.get("augmented") is None else np.asarray(s["augmented"], bool)
        files.save_npy_rows(out / "cache" / f"{split}_x.npy", x)
        np.save(out / "cache" / f"{split}_y.npy", y)
        if masks is not None:
            files.save_npy_rows(out / "cache" / f"{split}_masks.npy", masks)
        counts[split] = {c: int((y == i).sum()) for i, c in enumerate(class_names)}
        originals[split] = int((~aug).sum())
        for i in range(n):
            cname = class_names[int(y[i])]
            fname = _png_name(stems[i], src_cls[i], cname)
            rel = f"images/{split}/{cname}/{fname}"
            mrel = f"masks/{split}/{cname}/{fname}" if masks is not None else ""
            if save_images:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                files.save_png(out / rel, x[i], compress_level=1)
                if masks is not None:
                    (out / mrel).parent.mkdir(parents=True, exist_ok=True)
                    files.save_png(out / mrel, masks[i], compress_level=1)
            rows.append({"path": rel, "class_name": cname, "label": int(y[i]), "group": groups[i],
                         "split": split, "source": sources[i], "augmented": int(bool(aug[i])),
                         "source_class": src_cls[i], "stem": stems[i], "mask": mrel})
    files.write_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    meta = {"class_names": list(class_names), "num_classes": len(class_names),
            "counts": counts, "totals": {s: int(sum(counts[s].values())) for s in SPLITS},
            "originals": originals,
            "has_masks": bool(has_masks and rows)}
    any_x = next((splits[s]["x"] for s in SPLITS if s in splits and len(splits[s]["y"])), None)
    if any_x is not None:
        meta["image_size"] = int(_rows(any_x).shape[1])
    meta.update(info or {})
    meta.setdefault("versions", files.library_versions())
    files.write_json(out / "dataset.json", meta)


def _rows(x):
    """``x`` as rows ``write_prepared`` can index: arrays as uint8 arrays, row sequences as they are."""
    if hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, np.ndarray):
        if np.dtype(x.dtype) != np.uint8:
            raise DataError(f"write_prepared: rows of {x.dtype}, expected uint8")
        return x
    return np.asarray(x, dtype=np.uint8)


def _png_name(stem: str, source_class: str, class_name: str) -> str:
    """File name of a prepared row: the stem, prefixed by its source class when merged."""
    return f"{stem}.png" if source_class == class_name else f"{source_class}__{stem}.png"


def _check_unique_paths(splits: Dict[str, dict], class_names: Sequence[str]) -> None:
    """Safety net: refuse two rows that would write the same PNG (the later would overwrite)."""
    seen: Dict[str, int] = {}
    for split in SPLITS:
        s = splits.get(split)
        if s is None or len(s["y"]) == 0:
            continue
        y = np.asarray(s["y"], dtype=np.int64)
        n = len(y)
        stems = list(s.get("stems") or [f"{split}_{i:05d}" for i in range(n)])
        src_cls = list(s.get("source_classes") or [class_names[int(c)] for c in y])
        for i in range(n):
            cname = class_names[int(y[i])]
            rel = f"images/{split}/{cname}/{_png_name(stems[i], src_cls[i], cname)}"
            if rel in seen:
                raise DataError(f"write_prepared: rows {seen[rel]} and {i} of split '{split}' would "
                                f"both be written to {rel} (stem {stems[i]!r}, source class "
                                f"{src_cls[i]!r}); give every row a unique (source class, stem)")
            seen[rel] = i


def fingerprint_files(paths: Iterable[os.PathLike], root: os.PathLike) -> str:
    """SHA-256 over (relative path, content) of every file, in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(Path(p) for p in paths):
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.name
        h.update(os.fsencode(rel) + b"\0")     # bytes of the name, whatever its encoding
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
