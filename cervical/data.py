"""Data side of the study: raw datasets -> a prepared dataset folder, and loaders for it.

The study (thesis ch. 4-5) read SIPaKMeD's single-cell crops, looked at their sizes, resized them to
110x110, split them per class 80/20 then 80/20, and augmented the training split x7 offline. This module
does each step as a small function, fixes the study's flaws by default (grouped split by cluster image,
aspect-preserving resize, lossless storage, seeded augmentation) and keeps the study's protocol
available on purpose (``split="thesis"``, ``resize="stretch"``, ``interpolation="nearest"``).

Prepared folder layout (``prepare`` writes it, ``load_split`` reads it)::

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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIDE = 8                    # smaller crops carry no usable cell (1x1 images are bad input)
MAX_PIXELS = 40_000_000         # decompression-bomb guard (a SIPaKMeD crop is < 0.3 Mpx)
MASK_BACKGROUND, MASK_CYTOPLASM, MASK_NUCLEUS = 0, 1, 2

# The study's class-weight constants (balanced weights of its *test* labels 163/165/159/158/167,
# study_code_findings.md section 7.1). Kept for parity runs only; ours come from train labels.
THESIS_CLASS_WEIGHTS = {0: 0.996319018404908, 1: 0.9842424242424243, 2: 1.0213836477987421,
                        3: 1.0278481012658227, 4: 0.9724550898203593}

SIPAKMED_CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal",
                    "Superficial-Intermediate")
HERLEV_CLASSES = ("carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic", "normal_columnar",
                  "normal_intermediate", "normal_superficiel", "severe_dysplastic")

# Label tasks: folder class -> task class. None = identity.
TASKS: Dict[str, Dict[str, Optional[Dict[str, str]]]] = {
    "sipakmed": {
        "5class": None,
        "3class": {"Superficial-Intermediate": "normal", "Parabasal": "normal",
                   "Koilocytotic": "abnormal", "Dyskeratotic": "abnormal", "Metaplastic": "benign"},
        "2class": {"Superficial-Intermediate": "normal", "Parabasal": "normal",
                   "Metaplastic": "normal", "Koilocytotic": "abnormal",
                   "Dyskeratotic": "abnormal"},
    },
    "herlev": {
        "7class": None,
        "2class": {c: ("normal" if c.startswith("normal") else "abnormal") for c in HERLEV_CLASSES},
    },
    "folders": {"all": None},
}
TASKS["synthetic"] = TASKS["sipakmed"]
DEFAULT_TASK = {"sipakmed": "5class", "synthetic": "5class", "herlev": "7class", "folders": "all"}


class DataError(ValueError):
    """Bad input data or arguments; the message is one line naming the file/flag and the fix."""


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------

def decode_rgb(path: os.PathLike) -> np.ndarray:
    """Decode any image file to an 8-bit RGB array (H, W, 3), whatever its mode.

    Handles L, LA, P (with or without transparency), RGB, RGBA, CMYK, I;16 and I/F modes.
    Transparent pixels are composited on white (cells are imaged on a light background).
    16- and 32-bit images are scaled to 0..255 by their value range, not clipped.

    Raises:
        DataError: unreadable, truncated, too small (< MIN_SIDE px) or too large (> MAX_PIXELS).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DataError(f"{path}: image is {w}x{h} pixels, over the {MAX_PIXELS} limit "
                                f"(possible decompression bomb); remove or downscale it")
            if min(w, h) < MIN_SIDE:
                raise DataError(f"{path}: image is only {w}x{h} pixels (minimum side {MIN_SIDE}); "
                                f"remove it")
            im.load()
            return _to_rgb8(im)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}); "
                        f"replace or remove the file") from None


def _to_rgb8(im) -> np.ndarray:
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0 if hi > 255 else 255.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        g = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "LA" or mode == "PA":
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(arr)


def parse_dat(path: os.PathLike) -> np.ndarray:
    """Read a SIPaKMeD contour file: one ``x,y`` point per line (comma and/or whitespace separated).

    Returns:
        (P, 2) float64 array of (x, y) vertices, P >= 3.

    Raises:
        DataError: the file is missing, unreadable, or holds fewer than 3 valid points.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read contour file ({type(exc).__name__}); "
                        f"restore it or delete it to skip this mask") from None
    points = []
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = [p for p in re.split(r"[,\s;]+", line.strip()) if p]
        if not parts:
            continue
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise DataError(f"{path}:{lineno}: not an 'x,y' pair of numbers ({line.strip()[:40]!r}); "
                            f"fix or delete the contour file") from None
        if len(values) % 2:
            raise DataError(f"{path}:{lineno}: odd number of coordinates; fix or delete the file")
        points.extend(zip(values[0::2], values[1::2]))
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(arr) < 3 or not np.all(np.isfinite(arr)):
        raise DataError(f"{path}: a contour needs at least 3 finite points (found {len(arr)}); "
                        f"fix or delete the contour file")
    return arr


def rasterize_polygon(polygon_xy: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Fill a polygon given as (x, y) vertices into a boolean mask of ``shape`` (rows, cols).

    Uses skimage.draw.polygon (pixel centres inside the polygon are set; vertices outside the
    image are clipped).
    """
    from skimage.draw import polygon

    poly = np.asarray(polygon_xy, dtype=np.float64)
    rr, cc = polygon(poly[:, 1], poly[:, 0], shape=shape)
    mask = np.zeros(shape, dtype=bool)
    mask[rr, cc] = True
    return mask


def label_mask_from_contours(nucleus_xy: Optional[np.ndarray], cytoplasm_xy: Optional[np.ndarray],
                             shape: Tuple[int, int]) -> np.ndarray:
    """Label mask (0 background, 1 cytoplasm, 2 nucleus) from nucleus and cytoplasm polygons.

    The SIPaKMeD cytoplasm contour is the whole cell outline; the nucleus is painted over it.
    """
    mask = np.zeros(shape, dtype=np.uint8)
    if cytoplasm_xy is not None:
        mask[rasterize_polygon(cytoplasm_xy, shape)] = MASK_CYTOPLASM
    if nucleus_xy is not None:
        mask[rasterize_polygon(nucleus_xy, shape)] = MASK_NUCLEUS
    return mask


def herlev_label_mask(path: os.PathLike) -> np.ndarray:
    """Herlev expert mask (8-bit palette BMP) -> label mask.

    Palette index 2 = nucleus, 3 = cytoplasm, 1 and 4 = background
    (../shared/data/herlev_sample/SOURCE.md).
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "P":
                raise DataError(f"{path}: Herlev mask must be an 8-bit palette image (got {im.mode}); "
                                f"use the original '-d.bmp' file")
            idx = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: cannot decode mask ({type(exc).__name__}); "
                        f"replace or remove it") from None
    out = np.zeros(idx.shape, dtype=np.uint8)
    out[idx == 3] = MASK_CYTOPLASM
    out[idx == 2] = MASK_NUCLEUS
    return out


# ------------------------------------------------------------------------------------------------
# Readers: raw dataset -> list of Records
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
    """One raw cell image and what is known about it before decoding."""

    path: Path                       # image file
    source_class: str                # class as named on disk (folder name without "im_")
    stem: str                        # file name without extension, e.g. "001_03"
    group: str                       # source cluster image, e.g. "Dyskeratotic/001"
    nucleus: Optional[Path] = None   # SIPaKMeD contour files
    cytoplasm: Optional[Path] = None
    mask_image: Optional[Path] = None  # Herlev expert mask
    class_name: str = ""             # task class (after --task / --class-map)


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _require_dir(root: os.PathLike, flag: str = "--data-dir") -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{flag} {root}: folder does not exist; point it at the unpacked dataset")
    if not root.is_dir():
        raise DataError(f"{flag} {root}: not a folder; point it at the unpacked dataset")
    if not any(root.iterdir()):
        raise DataError(f"{flag} {root}: folder is empty; unpack the dataset into it")
    return root


def detect_dataset(root: os.PathLike) -> str:
    """Guess the layout of a raw dataset folder: 'sipakmed', 'herlev' or 'folders'."""
    root = _require_dir(root)
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    if any(d.name.startswith("im_") for d in subdirs):
        return "sipakmed"
    if any(p.name.lower().endswith("-d.bmp") for d in subdirs for p in d.iterdir()):
        return "herlev"
    return "folders"


_SIPAKMED_STEM = re.compile(r"^(\d+)_(\d+)$")


def read_sipakmed(root: os.PathLike) -> List[Record]:
    """Read SIPaKMeD: ``im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp`` (official, with ``NNN_MM_nuc.dat``
    and ``NNN_MM_cyt.dat`` contours) or the study's flat ``im_<Class>/NNN_MM.bmp``.

    Group = (class, NNN), the source cluster image, so a grouped split keeps every cell of one
    cluster image in one split.
    """
    root = _require_dir(root)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("im_"))
    if not class_dirs:
        raise DataError(f"--data-dir {root}: no 'im_<Class>' folders found; expected the SIPaKMeD "
                        f"layout im_<Class>/im_<Class>/CROPPED/NNN_MM.bmp (or use --dataset folders)")
    records: List[Record] = []
    for cdir in class_dirs:
        cls = cdir.name[3:]
        nested = cdir / cdir.name / "CROPPED"
        folder = nested if nested.is_dir() else cdir
        files = _image_files(folder)
        if not files:
            raise DataError(f"{folder}: class folder holds no images; add the .bmp crops or remove "
                            f"the folder")
        for f in files:
            m = _SIPAKMED_STEM.match(f.stem)
            group = f"{cls}/{m.group(1)}" if m else f"{cls}/{f.stem}"
            nuc, cyt = folder / f"{f.stem}_nuc.dat", folder / f"{f.stem}_cyt.dat"
            records.append(Record(path=f, source_class=cls, stem=f.stem, group=group,
                                  nucleus=nuc if nuc.exists() else None,
                                  cytoplasm=cyt if cyt.exists() else None))
    return records


def read_herlev(root: os.PathLike) -> List[Record]:
    """Read Herlev: ``<class>/<name>.BMP`` with expert masks ``<class>/<name>-d.bmp``.

    Every image is its own group (Herlev crops do not share cluster images).
    """
    root = _require_dir(root)
    records: List[Record] = []
    for cdir in sorted(d for d in root.iterdir() if d.is_dir()):
        files = [f for f in _image_files(cdir) if not f.stem.lower().endswith("-d")]
        if not files:
            raise DataError(f"{cdir}: class folder holds no images; add images or remove the folder")
        masks = {f.stem.lower()[:-2]: f for f in _image_files(cdir) if f.stem.lower().endswith("-d")}
        for f in files:
            records.append(Record(path=f, source_class=cdir.name, stem=f.stem,
                                  group=f"{cdir.name}/{f.stem}",
                                  mask_image=masks.get(f.stem.lower())))
    if not records:
        raise DataError(f"--data-dir {root}: no class folders found; expected <class>/<name>.BMP")
    return records


def read_folders(root: os.PathLike) -> List[Record]:
    """Read any ``<class>/<image>`` tree (bmp, png, jpg, tif); no masks; each image its own group."""
    root = _require_dir(root)
    records: List[Record] = []
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not class_dirs:
        raise DataError(f"--data-dir {root}: no class folders found; expected <class>/<image> files")
    for cdir in class_dirs:
        files = _image_files(cdir)
        if not files:
            raise DataError(f"{cdir}: class folder holds no images ({', '.join(IMAGE_EXTS)}); "
                            f"add images or remove the folder")
        records += [Record(path=f, source_class=cdir.name, stem=f.stem,
                           group=f"{cdir.name}/{f.stem}") for f in files]
    return records


READERS = {"sipakmed": read_sipakmed, "synthetic": read_sipakmed, "herlev": read_herlev,
           "folders": read_folders}


def apply_task(records: List[Record], dataset: str, task: Optional[str] = None,
               class_map: Optional[Dict[str, str]] = None) -> List[str]:
    """Set each record's task class from a ``--task`` preset or a ``--class-map``; return class names.

    Records whose folder class the map does not mention are dropped (a map may select classes).
    Class names are sorted, as the study sorted its folder names (label ids follow that order).
    """
    if class_map is None:
        presets = TASKS.get(dataset, TASKS["folders"])
        task = task or DEFAULT_TASK.get(dataset, "all")
        if task not in presets:
            raise DataError(f"--task {task}: unknown for dataset {dataset}; choose one of "
                            f"{', '.join(presets)} or pass --class-map FILE.json")
        class_map = presets[task]
    if class_map is None:
        for r in records:
            r.class_name = r.source_class
    else:
        unknown = sorted({r.source_class for r in records} - set(class_map))
        if unknown and len(unknown) == len({r.source_class for r in records}):
            raise DataError(f"--class-map: none of the folder classes ({', '.join(unknown[:5])}) is "
                            f"mapped; keys must be folder names without 'im_'")
        records[:] = [r for r in records if r.source_class in class_map]
        for r in records:
            r.class_name = class_map[r.source_class]
    names = sorted({r.class_name for r in records})
    if len(names) < 2:
        raise DataError(f"--task/--class-map: only {len(names)} class found; a classifier needs 2 or more")
    return names


def load_class_map(path: os.PathLike) -> Dict[str, str]:
    """Read a ``--class-map`` JSON file: {"folder class": "task class", ...}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"--class-map {path}: cannot read JSON ({type(exc).__name__}); "
                        f"write a JSON object of folder class -> task class") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise DataError(f"--class-map {path}: must be a JSON object of folder class -> task class")
    return data


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


def load_split(data_dir: os.PathLike, split: str = "train") -> Split:
    """Load one split of a prepared dataset from its array cache.

    Args:
        data_dir: a folder written by ``prepare`` (or ``write_prepared``).
        split: "train" (augmented copies included), "val", "test", or "all" (every original image
            of the three splits, no augmented copies).
    Raises:
        DataError: not a prepared dataset, unknown split, or an empty split.
    """
    info = read_info(data_dir)
    d = Path(data_dir)
    if split == "all":
        parts = [load_split(d, s) for s in SPLITS if info.get("totals", {}).get(s)]
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
    x = np.load(xf)
    y = np.load(d / "cache" / f"{split}_y.npy").astype(np.int64)
    mf = d / "cache" / f"{split}_masks.npy"
    masks = np.load(mf) if mf.is_file() else None
    rows = [r for r in read_manifest(d) if r["split"] == split]
    if len(rows) != len(y):
        raise DataError(f"{d}: manifest.csv and cache disagree for split '{split}' "
                        f"({len(rows)} vs {len(y)} rows); prepare the dataset again")
    if len(y) == 0:
        raise DataError(f"--split {split}: no images in {d}; choose another split")
    return Split(x=x, y=y, paths=[r["path"] for r in rows], groups=[r["group"] for r in rows],
                 augmented=np.array([r["augmented"] == "1" for r in rows], dtype=bool),
                 masks=masks, class_names=list(info["class_names"]),
                 sources=[r["source"] for r in rows])


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: os.PathLike, obj) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
                                     + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def write_prepared(out_dir: os.PathLike, splits: Dict[str, dict], class_names: Sequence[str],
                   info: Optional[dict] = None, save_images: bool = True) -> None:
    """Write a prepared dataset folder from arrays (used by ``prepare`` and by test fixtures).

    Args:
        out_dir: destination; must not exist or be empty (``prepare`` handles --overwrite).
        splits: {"train"|"val"|"test": dict(x=uint8 (N,H,W,3), y=int (N,), and optionally
            paths/stems, groups, sources, source_classes, augmented (bool N), masks (uint8 N,H,W))}.
        class_names: names of label ids 0..K-1.
        info: extra keys for dataset.json (task, dataset, split protocol, seed, ...).
        save_images: also write every image (and mask) as PNG next to the cache.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache").mkdir(exist_ok=True)
    rows = []
    counts: Dict[str, Dict[str, int]] = {}
    has_masks = True
    for split in SPLITS:
        s = splits.get(split)
        if s is None or len(s["y"]) == 0:
            counts[split] = {c: 0 for c in class_names}
            continue
        x = np.ascontiguousarray(s["x"], dtype=np.uint8)
        y = np.asarray(s["y"], dtype=np.int64)
        n = len(y)
        if x.ndim != 4 or x.shape[0] != n or x.shape[-1] != 3:
            raise DataError(f"write_prepared: split '{split}' x must be (N,H,W,3) with N={n}")
        masks = s.get("masks")
        has_masks &= masks is not None
        stems = list(s.get("stems") or [f"{split}_{i:05d}" for i in range(n)])
        groups = list(s.get("groups") or stems)
        sources = list(s.get("sources") or [""] * n)
        src_cls = list(s.get("source_classes") or [class_names[int(c)] for c in y])
        aug = np.zeros(n, bool) if s.get("augmented") is None else np.asarray(s["augmented"], bool)
        np.save(out / "cache" / f"{split}_x.npy", x)
        np.save(out / "cache" / f"{split}_y.npy", y)
        if masks is not None:
            np.save(out / "cache" / f"{split}_masks.npy", np.asarray(masks, dtype=np.uint8))
        counts[split] = {c: int((y == i).sum()) for i, c in enumerate(class_names)}
        for i in range(n):
            cname = class_names[int(y[i])]
            rel = f"images/{split}/{cname}/{stems[i]}.png"
            mrel = f"masks/{split}/{cname}/{stems[i]}.png" if masks is not None else ""
            if save_images:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                _save_png(out / rel, x[i])
                if masks is not None:
                    (out / mrel).parent.mkdir(parents=True, exist_ok=True)
                    _save_png(out / mrel, np.asarray(masks[i], dtype=np.uint8))
            rows.append({"path": rel, "class_name": cname, "label": int(y[i]), "group": groups[i],
                         "split": split, "source": sources[i], "augmented": int(bool(aug[i])),
                         "source_class": src_cls[i], "stem": stems[i], "mask": mrel})
    tmp = out / ".manifest.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / "manifest.csv")
    meta = {"class_names": list(class_names), "num_classes": len(class_names),
            "counts": counts, "totals": {s: int(sum(counts[s].values())) for s in SPLITS},
            "has_masks": bool(has_masks and rows)}
    any_x = next((splits[s]["x"] for s in SPLITS if s in splits and len(splits[s]["y"])), None)
    if any_x is not None:
        meta["image_size"] = int(np.asarray(any_x).shape[1])
    meta.update(info or {})
    meta.setdefault("versions", library_versions())
    write_json(out / "dataset.json", meta)


def library_versions() -> Dict[str, str]:
    """Versions of Python and the libraries that shape results (without importing TensorFlow)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "cervical": __import__("cervical").__version__}
    for pkg in ("numpy", "scikit-learn", "scikit-image", "pillow", "tensorflow", "keras",
                "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fingerprint_files(paths: Iterable[os.PathLike], root: os.PathLike) -> str:
    """SHA-256 over (relative path, content) of every file, in sorted order."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(Path(p) for p in paths):
        try:
            rel = p.relative_to(root).as_posix()
        except ValueError:
            rel = p.name
        h.update(rel.encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
