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

from cervical import files, protocol

SPLITS = ("train", "val", "test")
#: The study's exact split membership (docs/study.md §1): data/splits/thesis_split.csv in the
#: repository, shipped inside the package (a link to that file) so an installed copy has it too.
THESIS_SPLIT_CSV = Path(__file__).with_name("thesis_split.csv")
IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIDE = 8                    # smaller crops carry no usable cell (1x1 images are bad input)
MAX_PIXELS = 40_000_000         # decompression-bomb guard (a SIPaKMeD crop is < 0.3 Mpx)
MASK_BACKGROUND, MASK_CYTOPLASM, MASK_NUCLEUS = 0, 1, 2

# The study's class-weight constants (balanced weights of its *test* labels 163/165/159/158/167,
# docs/study.md §7). Kept for parity runs only; ours come from train labels.
THESIS_CLASS_WEIGHTS = {0: 0.996319018404908, 1: 0.9842424242424243, 2: 1.0213836477987421,
                        3: 1.0278481012658227, 4: 0.9724550898203593}

SIPAKMED_CLASSES = ("Dyskeratotic", "Koilocytotic", "Metaplastic", "Parabasal",
                    "Superficial-Intermediate")
HERLEV_CLASSES = ("carcinoma_in_situ", "light_dysplastic", "moderate_dysplastic", "normal_columnar",
                  "normal_intermediate", "normal_superficiel", "severe_dysplastic")

def _grouping(classes: Sequence[str], benign: Sequence[str] = ()) -> Dict[str, str]:
    """Folder class -> "abnormal" / "benign" / "normal", the abnormal classes being those of
    ``cervical.metrics.default_abnormal_classes`` (the package's one definition)."""
    from cervical.metrics import default_abnormal_classes

    abnormal = set(default_abnormal_classes(classes) or ())
    return {c: "abnormal" if c in abnormal else "benign" if c in benign else "normal"
            for c in classes}


# Label tasks: folder class -> task class. None = identity. SIPaKMeD (Plissiti et al. 2018):
# Dyskeratotic and Koilocytotic abnormal, Metaplastic benign, the rest normal; Herlev: the
# dysplasias and carcinoma in situ abnormal, the normal_* classes normal.
TASKS: Dict[str, Dict[str, Optional[Dict[str, str]]]] = {
    "sipakmed": {
        "5class": None,
        "3class": _grouping(SIPAKMED_CLASSES, benign=("Metaplastic",)),
        "2class": _grouping(SIPAKMED_CLASSES),
    },
    "herlev": {
        "7class": None,
        "2class": _grouping(HERLEV_CLASSES),
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
    except Image.DecompressionBombError as exc:
        # PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS before we can look at their size;
        # the error derives from Exception, not OSError, so it needs its own clause.
        raise DataError(f"{path}: image is too large to decode ({str(exc).splitlines()[0]}; "
                        f"possible decompression bomb); remove or downscale it") from None
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

    Palette index 2 = nucleus, 3 = cytoplasm, 1 and 4 = background (docs/study.md §8).
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
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
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
                    files.save_png(out / mrel, np.asarray(masks[i], dtype=np.uint8),
                                   compress_level=1)
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
        meta["image_size"] = int(np.asarray(any_x).shape[1])
    meta.update(info or {})
    meta.setdefault("versions", files.library_versions())
    files.write_json(out / "dataset.json", meta)


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


# ------------------------------------------------------------------------------------------------
# Resize (thesis: 110x110; the study stretched with nearest-neighbour, we pad and area-average)
# ------------------------------------------------------------------------------------------------

def pad_to_square(img: np.ndarray, mask: Optional[np.ndarray] = None
                  ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Centre ``img`` on a square canvas filled with its border colour (mask padded with 0).

    The border colour is ``cervical.augment.border_colour`` (median of the outermost ring of
    pixels, each counted once) rounded to the nearest 8-bit value.
    """
    from cervical.augment import border_colour

    h, w = img.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    canvas = np.empty((s, s, 3), dtype=np.uint8)
    canvas[:] = np.round(border_colour(img)).astype(np.uint8)
    canvas[top:top + h, left:left + w] = img
    if mask is None:
        return canvas, None
    mcanvas = np.zeros((s, s), dtype=np.uint8)
    mcanvas[top:top + h, left:left + w] = mask
    return canvas, mcanvas


def resize_cell(img: np.ndarray, size: int, mode: str = "pad", interpolation: str = "area",
                mask: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize one cell crop to ``size`` x ``size`` (and its label mask, always nearest-neighbour).

    Args:
        mode: "pad" keeps the aspect ratio (pad to square with the border colour, then resize);
            "stretch" resizes each axis independently, as the study did.
        interpolation: "area" (box filter when shrinking, bilinear when enlarging), "bilinear",
            or "nearest" (PIL's, what keras ``load_img(target_size=...)`` uses: study parity).
    """
    from PIL import Image

    if mode not in ("pad", "stretch"):
        raise DataError(f"--resize {mode}: unknown; choose pad or stretch")
    if mode == "pad":
        img, mask = pad_to_square(img, mask)
    h, w = img.shape[:2]
    if interpolation == "area":
        resample = Image.BOX if size <= min(h, w) else Image.BILINEAR
    elif interpolation == "bilinear":
        resample = Image.BILINEAR
    elif interpolation == "nearest":
        resample = Image.NEAREST
    else:
        raise DataError(f"--interpolation {interpolation}: unknown; choose area, bilinear or nearest")
    out = np.asarray(Image.fromarray(img).resize((size, size), resample=resample), dtype=np.uint8)
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((size, size), resample=Image.NEAREST),
                          dtype=np.uint8)
    return out, mask


# ------------------------------------------------------------------------------------------------
# Size analysis (thesis Fig. 5.2)
# ------------------------------------------------------------------------------------------------

def size_analysis(widths: Sequence[int], heights: Sequence[int], bins: int = 30) -> dict:
    """Width x height statistics and the densest bin of a 2-D histogram (rows = height).

    ``height_range`` is the densest bin's range along the height axis and ``width_range`` along
    the width axis; the suggested size is the mean of the two bin centres, rounded. The study
    printed two left bin edges with the labels swapped (its "height" is ``width_edges[i_h]``, its
    "width" ``height_edges[i_w]``; 108.9 and 98.5 on SIPaKMeD, hence its 110 px): reported as
    ``study_printed`` beside ours.
    """
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    hist, h_edges, w_edges = np.histogram2d(h, w, bins=bins)
    i_h, i_w = np.unravel_index(int(np.argmax(hist)), hist.shape)
    h_rng = (float(h_edges[i_h]), float(h_edges[i_h + 1]))
    w_rng = (float(w_edges[i_w]), float(w_edges[i_w + 1]))
    return {
        "count": int(w.size),
        "width": {"min": int(w.min()), "max": int(w.max()), "mean": float(w.mean()),
                  "median": float(np.median(w))},
        "height": {"min": int(h.min()), "max": int(h.max()), "mean": float(h.mean()),
                   "median": float(np.median(h))},
        "densest_bin": {"height_range": h_rng, "width_range": w_rng, "count": int(hist[i_h, i_w]),
                        "bins": bins},
        "suggested_size": int(round((sum(h_rng) + sum(w_rng)) / 4)),
        "study_printed": {"height": float(w_edges[i_h]), "width": float(h_edges[i_w])},
    }


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------

def split_thesis(labels: Sequence[int], seed: int = 42, train: float = 0.8) -> np.ndarray:
    """The study's split: per class, ``train_test_split`` 80/20, then 80/20 of the remainder.

    Cell level (cells of one cluster image can land in train and test: the study's leak).
    Rows are taken in the given order (pass records sorted by file name for a filesystem-
    independent result; the study used unsorted glob order). On SIPaKMeD's counts this gives
    exactly 2589/648/812 (scikit-learn rounds the test share up).

    Returns:
        array of "train"/"val"/"test", one per label.
    """
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    out = np.empty(len(y), dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        trval, test = train_test_split(idx, train_size=train, test_size=1 - train, random_state=seed)
        tr, val = train_test_split(trval, train_size=train, test_size=1 - train, random_state=seed)
        out[tr], out[val], out[test] = "train", "val", "test"
    return out


def _grouped_fold(y: np.ndarray, groups: np.ndarray, n_splits: int, seed: int, fold: int = 0
                  ) -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    smallest = int(np.unique(y, return_counts=True)[1].min())
    if n_groups < n_splits or smallest < n_splits:
        raise DataError(f"--split grouped: {n_groups} cluster images and {smallest} cells in the "
                        f"smallest class, too few for {n_splits} folds; use more data "
                        f"(at least {n_splits} cells per class) or --split thesis")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for k, (a, b) in enumerate(sgkf.split(np.zeros(len(y)), y, groups)):
        if k == fold:
            return a, b
    raise AssertionError("unreachable")


def _cell_level_val(labels: Sequence[int], seed: int, val: float = 0.2) -> np.ndarray:
    """Per class, ``train_test_split`` into train and val (val share ``val``), at cell level."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    out = np.full(len(y), "train", dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if len(idx) >= 2:
            out[train_test_split(idx, test_size=val, random_state=seed)[1]] = "val"
    return out


def split_grouped(labels: Sequence[int], groups: Sequence[str], seed: int = 42,
                  test: float = 0.2, val: float = 0.2) -> np.ndarray:
    """Stratified split with no group (cluster image) in two splits.

    Test = one fold of a StratifiedGroupKFold with round(1/test) folds; val = one fold of the
    same on the remainder, so the shares approach the study's 64/16/20.
    """
    y, g = np.asarray(labels), np.asarray(groups)
    out = np.empty(len(y), dtype=object)
    rest, te = _grouped_fold(y, g, int(round(1 / test)), seed)
    tr, va = _grouped_fold(y[rest], g[rest], int(round(1 / val)), seed)
    out[te], out[rest[va]], out[rest[tr]] = "test", "val", "train"
    return out


def split_folds(labels: Sequence[int], groups: Sequence[str], k: int, seed: int = 42,
                val: float = 0.2) -> List[np.ndarray]:
    """Grouped stratified K-fold: fold i tests on group-fold i, validates on a grouped 20 % of the rest."""
    if k < 2:
        raise DataError(f"--folds {k}: need at least 2 folds (or 0 for a single split)")
    y, g = np.asarray(labels), np.asarray(groups)
    out = []
    for i in range(k):
        rest, te = _grouped_fold(y, g, k, seed, fold=i)
        tr, va = _grouped_fold(y[rest], g[rest], int(round(1 / val)), seed)
        s = np.empty(len(y), dtype=object)
        s[te], s[rest[va]], s[rest[tr]] = "test", "val", "train"
        out.append(s)
    return out


def randomise_leak(assign: np.ndarray, labels: Sequence[int], groups: Sequence[str], moved: int,
                   seed: int = 42, fold: int = 0, swap: bool = False) -> Tuple[np.ndarray, dict]:
    """The randomised-leak design: a grouped split in which half the test cluster images leak.

    The question it answers: how much more accurate is a model on cells whose cluster image gave
    it training cells (the study's leak), everything else equal? Starting from a grouped split
    (no cluster image in two splits), in every class the test cluster images with more than
    ``moved`` test cells are sorted by size and taken in pairs of neighbours; a coin decides which
    of each pair is "leaked" (``moved`` of its cells, drawn at random, move to train) and which is
    "held out" (``moved`` of its cells are set aside, in no split, so both arms keep the same
    number of test cells per cluster). An odd cluster left over gets its own coin. One model
    then sees both kinds, and the accuracy on the remaining test cells of leaked against held-out
    clusters, class by class, is the leak: same model, same procedure, same preparation, same
    cluster sizes and class mix on both sides, only the leak differs. Test clusters with too few
    cells stay in test outside both arms.

    ``swap=True`` gives the crossover: the same draw (pairs, coins, and which cells of each cluster
    move or are set aside) with the two arms exchanged. A model trained on the swapped design sees
    the other half leak, so every remaining test cell is scored once leaked and once held out,
    and cluster-to-cluster differences in difficulty cancel from the paired comparison.

    Args:
        assign: (N,) "train" / "val" / "test" of a grouped split (no group in two splits).
        labels: (N,) class labels.
        groups: (N,) cluster-image ids.
        moved: cells per leaked cluster moved to train (and per held-out cluster set aside), >= 1.
        seed, fold: the draw is ``default_rng([seed, 7, fold])``: same arguments, same design.
        swap: exchange the leaked and held-out clusters of that draw (the crossover).
    Returns:
        (new assignment with "" for cells set aside, {"moved", "leaked": [group, ...],
        "held_out": [group, ...], "moved_cells": n, "set_aside_cells": n}).
    Raises:
        DataError: moved < 1, or a group in two splits (not a grouped split).
    """
    if moved < 1:
        raise DataError(f"--leak-cells {moved}: must be 1 or more (0 = no leak design)")
    y, g = np.asarray(labels), np.asarray(groups)
    out = np.asarray(assign, dtype=object).copy()
    splits_of: Dict[str, set] = {}
    for gi, si in zip(g.tolist(), out.tolist()):
        splits_of.setdefault(gi, set()).add(si)
    if any(len(v) > 1 for v in splits_of.values()):
        raise DataError("--leak-cells: needs a grouped split (a cluster image is in two splits); "
                        "use --split grouped")
    rng = np.random.default_rng([seed, 7, fold])
    leaked, held = [], []
    for c in np.unique(y):
        test_groups, sizes = np.unique(g[(out == "test") & (y == c)], return_counts=True)
        eligible = test_groups[sizes > moved]
        size = sizes[sizes > moved]
        order = rng.permutation(len(eligible))              # random tie order, then by size
        order = order[np.argsort(size[order], kind="stable")]
        for i in range(0, len(order), 2):
            pair = [eligible[j] for j in order[i:i + 2]]
            if len(pair) == 2 and rng.random() < 0.5:
                pair.reverse()
            if len(pair) == 1 and rng.random() < 0.5:
                held.append(pair[0])
                continue
            leaked.append(pair[0])
            held.extend(pair[1:])
    chosen = {grp: rng.choice(np.flatnonzero((g == grp) & (out == "test")), size=moved,
                              replace=False) for grp in sorted(leaked + held)}
    if swap:
        leaked, held = held, leaked
    for group_list, target in ((leaked, "train"), (held, "")):
        for grp in group_list:
            out[chosen[grp]] = target
    design = {"moved": int(moved), "leaked": sorted(map(str, leaked)),
              "held_out": sorted(map(str, held)), "moved_cells": int(moved * len(leaked)),
              "set_aside_cells": int(moved * len(held)), "swapped": bool(swap)}
    return out, design


#: A class or stem name in a split manifest: no path separators, no "..", nothing hidden.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.+-]*")


def split_from_manifest(records: Sequence[Record], csv_path: os.PathLike) -> np.ndarray:
    """Exact split membership from a CSV with columns ``split,class,stem`` (the study's own:
    data/splits/thesis_split.csv). Class is the folder class (SIPaKMeD name without "im_").

    Raises:
        DataError: unreadable CSV, missing columns, an image the CSV does not list, or CSV rows
            without an image.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DataError(f"--split manifest:{csv_path}: cannot read ({type(exc).__name__}); "
                        f"check the path") from None
    if not rows or not {"split", "class", "stem"} <= set(rows[0]):
        raise DataError(f"--split manifest:{csv_path}: needs columns split,class,stem")
    table: Dict[Tuple[str, str], str] = {}
    for lineno, r in enumerate(rows, 2):
        key = (r["class"], r["stem"])
        if not _SAFE_NAME.fullmatch(str(r["stem"])) or not _SAFE_NAME.fullmatch(str(r["class"])):
            raise DataError(f"--split manifest:{csv_path}:{lineno}: {r['class']}/{r['stem']!r} is "
                            f"not a plain class and file stem (no paths); fix the CSV")
        if key in table:
            raise DataError(f"--split manifest:{csv_path}:{lineno}: duplicate row for "
                            f"{key[0]}/{key[1]}; list every cell once")
        table[key] = r["split"]
    bad = sorted({r["split"] for r in rows} - set(SPLITS))
    if bad:
        raise DataError(f"{csv_path}: unknown split value {bad[0]!r}; use train, val or test")
    out = np.empty(len(records), dtype=object)
    seen = set()
    for i, r in enumerate(records):
        key = (r.source_class, r.stem)
        if key not in table:
            raise DataError(f"--split manifest:{csv_path}: {r.path} is not listed; the CSV does not "
                            f"describe this dataset (use --split grouped or thesis)")
        out[i] = table[key]
        seen.add(key)
    missing = [k for k in table if k not in seen]
    if missing:
        raise DataError(f"--split manifest:{csv_path}: {len(missing)} listed cells have no image "
                        f"(first: {missing[0][0]}/{missing[0][1]}); point --data-dir at the full dataset")
    return out


def resolve_split_spec(spec: str) -> Tuple[str, Optional[Path]]:
    """'grouped' | 'thesis' | 'manifest:FILE' | 'manifest:thesis' -> (kind, csv path)."""
    if spec in ("grouped", "thesis"):
        return spec, None
    if spec.startswith("manifest:"):
        target = spec.split(":", 1)[1]
        if target == "thesis":
            return "manifest", THESIS_SPLIT_CSV
        if not Path(target).is_file():
            raise DataError(f"--split {spec}: file not found; give manifest:PATH.csv with columns "
                            f"split,class,stem")
        return "manifest", Path(target)
    raise DataError(f"--split {spec}: unknown; choose grouped, thesis or manifest:FILE.csv")


# ------------------------------------------------------------------------------------------------
# Parallel decode / augment (module-level functions so worker processes can pickle them)
# ------------------------------------------------------------------------------------------------

def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` (PIL, 4:2:0 chroma subsampling) and decode again: what the
    study's conversion of every image to .jpg (OpenCV's default quality 95) did to the pixels."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)


def _unsafe_file(rec: "Record", root: Optional[Path]) -> Optional[str]:
    """Why a record must be skipped before it is read: a name that is not UTF-8 (it cannot be
    written to manifest.csv), or a file that is a link leaving the data folder."""
    try:
        str(rec.path).encode("utf-8")
    except UnicodeEncodeError:
        return (f"{os.fsdecode(os.fsencode(rec.path)).encode('utf-8', 'backslashreplace').decode()}: "
                f"file name is not valid UTF-8; rename it")
    if root is not None:
        base = Path(root).resolve()
        for p in (rec.path, rec.nucleus, rec.cytoplasm, rec.mask_image):
            if p is not None and base not in Path(p).resolve().parents:
                return (f"{p}: links to {Path(p).resolve()}, outside --data-dir {root}; copy the "
                        f"file into the data folder or remove the link")
    return None


def _contour_inside(path: Path, shape: Tuple[int, int]) -> np.ndarray:
    """parse_dat, and refuse a contour far outside the image (it belongs to another image).

    Contours may touch or slightly cross the crop edge (a cell cut by the crop): a margin of
    max(5 px, 10 % of the longer side) is allowed.
    """
    poly = parse_dat(path)
    h, w = shape
    margin = max(5.0, 0.1 * max(h, w))
    if (np.any(poly < -margin) or np.any(poly[:, 0] > w - 1 + margin)
            or np.any(poly[:, 1] > h - 1 + margin)):
        raise DataError(f"{path}: contour points lie outside the {w}x{h} image; it belongs to "
                        f"another image: fix or delete the contour file")
    return poly


def _read_raw(rec: "Record", jpeg_quality: int = 0, root: Optional[Path] = None
              ) -> Tuple[str, object]:
    """Decode one record at its raw size with its label mask: ("ok", (img, mask)) or an error."""
    unsafe = _unsafe_file(rec, root)
    if unsafe:
        return "skip", unsafe
    try:
        img = decode_rgb(rec.path)
    except DataError as exc:
        return "skip", str(exc)
    h, w = img.shape[:2]
    mask = None
    try:
        if rec.nucleus is not None or rec.cytoplasm is not None:
            nuc = _contour_inside(rec.nucleus, (h, w)) if rec.nucleus is not None else None
            cyt = _contour_inside(rec.cytoplasm, (h, w)) if rec.cytoplasm is not None else None
            mask = label_mask_from_contours(nuc, cyt, (h, w))
        elif rec.mask_image is not None:
            mask = herlev_label_mask(rec.mask_image)
            if mask.shape != (h, w):
                raise DataError(f"{rec.mask_image}: mask is {mask.shape[1]}x{mask.shape[0]} but the "
                                f"image is {w}x{h}; use the mask that belongs to {rec.path.name}")
    except DataError as exc:
        return "fatal", str(exc)
    return "ok", (jpeg_roundtrip(img, jpeg_quality) if jpeg_quality else img, mask)


def _load_record(job) -> Tuple[str, object]:
    """Decode, build the label mask, (JPEG-recompress) and resize one record.

    Returns ("ok", (image, mask, (raw width, raw height))), or ("skip" | "fatal", message).
    """
    rec, size, mode, interpolation, jpeg_quality, root = job
    status, payload = _read_raw(rec, jpeg_quality, root)
    if status != "ok":
        return status, payload
    img, mask = payload
    small, small_mask = resize_cell(img, size, mode, interpolation, mask)
    return "ok", (small, small_mask, (img.shape[1], img.shape[0]))


def _augment_job(job):
    """The augmented copies of one training cell (module-level: worker processes pickle it).

    ``source`` is the resized cell (augment at the target size) or its Record (augment at the raw
    size, then resize each copy, as the study did); ``order`` "bgr" runs the augmenters on the
    channel-reversed image (the study fed OpenCV's BGR arrays to colour operations written for
    RGB); each copy is JPEG-recompressed when ``jpeg_quality`` > 0.
    """
    from cervical import augment

    source, mask, n, entropy, fill, order, jpeg_quality, resize = job
    if resize is not None:                          # raw: the record, decoded here
        status, payload = _read_raw(source)
        if status != "ok":
            raise DataError(str(payload))
        source, mask = payload
    image = source[..., ::-1].copy() if order == "bgr" else source
    copies = augment.augment_copies(image, mask, n=n, seed=np.random.SeedSequence(entropy),
                                    fill=fill)
    out = []
    for img, m, name in copies:
        img = img[..., ::-1].copy() if order == "bgr" else img
        if jpeg_quality:
            img = jpeg_roundtrip(img, jpeg_quality)
        if resize is not None:
            img, m = resize_cell(img, *resize, mask=m)
        out.append((img, m, name))
    return out


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _pool_map(fn, jobs, workers, progress, label):
    """Map ``fn`` over ``jobs`` in order, in worker processes when workers > 1, reporting progress."""
    import multiprocessing as mp
    import sys

    total = len(jobs)
    out = []

    def done(i: int) -> None:
        if i % 200 == 0 or i == total:
            files.report_progress(progress, label, i, total)

    if workers <= 1 or total < 64:
        for i, job in enumerate(jobs, 1):
            out.append(fn(job))
            done(i)
        return out
    # fork is fastest, but unsafe once TensorFlow has started threads in this process.
    ctx = mp.get_context("spawn" if "tensorflow" in sys.modules else "fork")
    with ctx.Pool(workers) as pool:
        for i, res in enumerate(pool.imap(fn, jobs, chunksize=16), 1):
            out.append(res)
            done(i)
    return out


# ------------------------------------------------------------------------------------------------
# Dataset figures (thesis Fig. 5.2, Table 4.1, Figs 4.1-4.5)
# ------------------------------------------------------------------------------------------------

def save_dataset_figures(out: Path, widths, heights, labels, class_names, images, seed: int) -> None:
    """Size scatter + hexbin, class-distribution bar chart and a per-class montage, as PNGs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    axes[0].scatter(widths, heights, s=4, alpha=0.5)
    axes[0].set(xlabel="width (px)", ylabel="height (px)", title="Cell crop sizes")
    hb = axes[1].hexbin(widths, heights, gridsize=30, cmap="inferno", mincnt=1)
    axes[1].set(xlabel="width (px)", ylabel="height (px)", title="Size density (hexbin)")
    fig.colorbar(hb, ax=axes[1], label="cells")
    fig.tight_layout()
    fig.savefig(out / "size_analysis.png", dpi=110)
    plt.close(fig)

    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(class_names)), 3.6))
    bars = ax.bar(range(len(class_names)), counts, color="#4c72b0")
    ax.bar_label(bars)
    ax.set_xticks(range(len(class_names)), class_names, rotation=20, ha="right")
    ax.set(ylabel="cells", title="Class distribution")
    fig.tight_layout()
    fig.savefig(out / "class_distribution.png", dpi=110)
    plt.close(fig)

    rng = np.random.default_rng(seed)
    per_row = 6
    fig, axes = plt.subplots(len(class_names), per_row,
                             figsize=(1.4 * per_row, 1.5 * len(class_names)), squeeze=False)
    labels = np.asarray(labels)
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(labels == c)
        pick = rng.choice(idx, size=min(per_row, len(idx)), replace=False) if len(idx) else []
        for j in range(per_row):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(pick):
                ax.imshow(images[pick[j]])
        axes[c, 0].set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(out / "montage.png", dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# prepare: the whole data side of the study
# ------------------------------------------------------------------------------------------------

def _is_prepared_dir(folder: Path) -> bool:
    """True for a folder written by ``prepare``: dataset.json, or folds.json for K-fold output."""
    for name, key in (("dataset.json", "class_names"), ("folds.json", "fold_dirs")):
        f = folder / name
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(meta, dict) and key in meta:
                return True
    return False


def _check_out_vs_data_dir(out: Path, data_dir: Optional[os.PathLike]) -> None:
    """Refuse an --out that is, or holds, the raw data: prepare replaces --out as a whole."""
    if data_dir is None:
        return                  # synthetic: the raw files are generated inside out (out/raw)
    d, o = Path(data_dir).resolve(), out.resolve()
    if d == o or o in d.parents:
        raise DataError(f"--data-dir {data_dir}: is inside --out {out} (prepare replaces --out and "
                        f"would delete the raw data); choose an --out outside --data-dir")
    if d in o.parents:
        raise DataError(f"--out {out}: is inside --data-dir {data_dir} (a later prepare would read "
                        f"the prepared images as raw data); choose an --out outside --data-dir")


def _stage_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"--out {out}: exists and is not empty; choose a new folder or pass "
                            f"--overwrite")
        if not out.is_dir() or not _is_prepared_dir(out):
            raise DataError(f"--out {out}: not a prepared dataset folder; --overwrite only replaces "
                            f"prepared datasets; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"--out {out}: parent folder is not writable; choose another --out")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _commit_dir(stage: Path, out: Path) -> None:
    """Move the finished staging folder into place (replacing an old --out only now)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not _is_prepared_dir(out):
        # re-checked here: something may have written into --out while we were preparing
        raise DataError(f"--out {out}: not a prepared dataset folder; --overwrite only replaces "
                        f"prepared datasets; choose another --out")
    files.swap_in(stage, out)


@dataclasses.dataclass
class PrepareOptions:
    """The arguments of ``prepare`` (see there), checked, with the split spec resolved."""

    dataset: str
    data_dir: Optional[Path]
    task: Optional[str]
    class_map: Optional[os.PathLike]
    size: int
    resize: str
    interpolation: str
    split: str
    split_kind: str                   # "grouped" | "thesis" | "manifest"
    manifest_csv: Optional[Path]
    folds: int
    augment: int
    seed: int
    per_class: Optional[int]
    workers: int
    save_images: bool
    progress: Optional[files.Progress]
    augment_at: str = "target"         # "target" (after resizing) | "raw" (before: the study)
    fill: str = "border"               # affine gaps: "border" colour | "black" (the study)
    jpeg_quality: int = 0              # > 0: JPEG-recompress every image (the study: 95)
    augment_order: str = "rgb"         # "rgb" | "bgr" (the study's channel order)
    variant: str = "standard"          # whose defaults filled the options above
    synthetic: str = "default"         # the synthetic generator's difficulty ("hard")
    leak_cells: int = 0                # > 0: the randomised-leak design (randomise_leak)
    leak_val: str = "grouped"          # its validation split: "grouped" or "cells" (the study's)
    leak_swap: bool = False            # the crossover: leaked and held-out clusters exchanged


@dataclasses.dataclass
class _RawSource:
    """Where the raw files are now, and where they will be once the staging folder is in place."""

    dataset: str
    data_dir: Path
    final_dir: Path
    generated: Optional[dict]         # the synthetic generator's summary, when it ran

    def final_path(self, p: os.PathLike) -> Path:
        """A raw file's path after the commit (generated files move with the staging folder)."""
        return (self.final_dir / Path(p).relative_to(self.data_dir)
                if self.final_dir != self.data_dir else Path(p))


@dataclasses.dataclass
class _Cells:
    """The decoded dataset: one entry per readable cell, sorted by (source class, stem, path)."""

    records: List[Record]
    images: np.ndarray                # uint8 (N, size, size, 3)
    masks: Optional[np.ndarray]       # uint8 (N, size, size), or None when any cell lacks one
    widths: List[int]                 # raw sizes, for the size analysis
    heights: List[int]
    labels: np.ndarray                # int64 (N,) task labels
    groups: np.ndarray                # (N,) cluster-image ids
    skipped: List[Tuple[Record, str]]
    masks_dropped: Optional[Tuple[int, str]]   # (cells without masks, an example) if masks were lost


@dataclasses.dataclass
class ManifestRow:
    """One image of a prepared split: one line of manifest.csv, its pixels and its mask."""

    image: np.ndarray
    label: int
    stem: str
    group: str
    source: str                       # the raw file, relative to the raw folder
    source_class: str
    augmented: bool
    mask: Optional[np.ndarray]


#: How each prepare option is set by default (ours) and by the study's code (variant "thesis"):
#: the preparation half of cervical.protocol's two protocols. "manifest:thesis" applies when the
#: raw files carry SIPaKMeD's names (SIPaKMeD itself, or the synthetic set made with them); other
#: data get the study's rule.
PREPARE_VARIANTS = {name: p.prepare_options() for name, p in protocol.PROTOCOLS.items()}


def prepare(dataset: str = "synthetic", data_dir: Optional[os.PathLike] = None,
            out: os.PathLike = "outputs/prepared", task: Optional[str] = None,
            class_map: Optional[os.PathLike] = None, size: int = 110,
            resize: Optional[str] = None, interpolation: Optional[str] = None,
            split: Optional[str] = None, folds: int = 0, augment: int = 6,
            seed: int = 42, per_class: Optional[int] = None, workers: int = 0,
            save_images: bool = True, overwrite: bool = False,
            progress: Optional[files.Progress] = None, variant: str = "standard",
            augment_at: Optional[str] = None, fill: Optional[str] = None,
            jpeg_quality: Optional[int] = None, augment_order: Optional[str] = None,
            synthetic: str = "default", leak_cells: int = 0, leak_val: str = "grouped",
            leak_swap: bool = False) -> dict:
    """Raw dataset -> prepared dataset folder (thesis ch. 5: size analysis, resize, split, augment).

    Everything is written to a staging folder beside ``out`` and renamed into place at the end,
    so a failed run leaves nothing half-written. Same arguments -> byte-identical output.

    Args:
        dataset: "sipakmed", "herlev", "folders", "synthetic" or "auto" (detect from data_dir).
        data_dir: raw dataset folder. For "synthetic" the generated raw files are kept in
            ``out/raw`` unless data_dir names another place (reused if it already holds files).
        task, class_map: label task preset or JSON map (see TASKS).
        size, resize, interpolation: see resize_cell.
        split: "grouped" | "thesis" | "manifest:FILE" | "manifest:thesis".
        folds: K > 1 writes out/fold_0 ... fold_{K-1}, each a prepared dataset.
        augment: augmented copies per train image (train split only, after splitting).
        per_class: synthetic only, cells per class (0 = the real SIPaKMeD counts; default 120).
        workers: processes for decode/augment (0 = all cores).
        save_images: also write every image and mask as PNG.
        overwrite: replace an existing ``out`` that is a prepared dataset (dataset.json, or
            folds.json for K-fold output); any other non-empty folder is refused, and so is a
            ``data_dir`` inside (or equal to) ``out``, with or without overwrite.
        progress: None, or ``progress(step, done, total)`` for long loops (cervical.files).
        variant: "standard" or "thesis": the defaults of the options below (PREPARE_VARIANTS).
        augment_at: "target" (augment the resized cell) or "raw" (augment the raw crop, then
            resize each copy, as the study did).
        fill: what fills the gaps of rotations and shifts: "border" (the crop's background
            colour) or "black" (imgaug's default, the study's).
        jpeg_quality: 0, or JPEG-recompress every image at this quality before resizing (and
            every augmented copy once made), as the study's conversion to .jpg (95) did.
        augment_order: "rgb", or "bgr": run the augmenters on the channel-reversed image, as the
            study's OpenCV arrays were (it changes the CLAHE/gamma, Canny and colour groups).
        synthetic: with dataset "synthetic": the generator's setting ("default", "hard",
            "hard-uniform"; cervical.synthetic.Difficulty).
        leak_cells: > 0 (grouped splits only): the randomised-leak design of ``randomise_leak``:
            in half the test cluster images of every class, this many cells move to train; the
            design is recorded in dataset.json ("leak_design").
        leak_val: with ``leak_cells``: "grouped" keeps the grouped validation split; "cells"
            re-splits the training and validation cells at cell level (per class 80/20, as the
            study's validation split was, so validation shares cluster images with training and
            early stopping rewards memorising them), the moved cells staying in train.
        leak_swap: with ``leak_cells``: the same design with the leaked and held-out clusters
            exchanged (``randomise_leak``'s crossover).
    Returns:
        A summary dict (also stored in dataset.json).
    """
    out = Path(out)
    if variant not in PREPARE_VARIANTS:
        raise DataError(f"--variant {variant}: unknown; choose standard or thesis")
    given = {"resize": resize, "interpolation": interpolation, "split": split,
             "augment_at": augment_at, "fill": fill, "jpeg_quality": jpeg_quality,
             "augment_order": augment_order}
    chosen = {k: PREPARE_VARIANTS[variant][k] if v is None else v for k, v in given.items()}
    if variant == "thesis" and split is None and dataset not in ("sipakmed", "synthetic", "auto"):
        chosen["split"] = "thesis"          # no SIPaKMeD file names: the study's rule instead
    _check_prepare_numbers(size, augment, chosen, folds, per_class)
    split_kind, manifest_csv = resolve_split_spec(chosen["split"])
    if folds and split_kind != "grouped":
        raise DataError("--folds: K-fold splits are grouped; drop --split or use --split grouped")
    if leak_cells and split_kind != "grouped":
        raise DataError("--leak-cells: the leak design starts from a grouped split; use --split "
                        "grouped")
    if leak_cells < 0 or leak_cells > 50:
        raise DataError(f"--leak-cells {leak_cells}: must be 0 (off) to 50")
    if leak_val not in ("grouped", "cells"):
        raise DataError(f"--leak-val {leak_val}: unknown; choose grouped or cells")
    opts = PrepareOptions(dataset, None if data_dir is None else Path(data_dir), task, class_map,
                          size, chosen["resize"], chosen["interpolation"], chosen["split"],
                          split_kind, manifest_csv, folds, augment, seed, per_class,
                          workers or os.cpu_count() or 1, save_images, progress,
                          chosen["augment_at"], chosen["fill"], int(chosen["jpeg_quality"]),
                          chosen["augment_order"], variant, synthetic, int(leak_cells),
                          leak_val, bool(leak_swap))
    _check_out_vs_data_dir(out, data_dir)
    with files.output_lock(out):
        stage = _stage_dir(out, overwrite)
        try:
            summary = _prepare_into(stage, out, opts)
            _commit_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    summary["out"] = str(out)
    return summary


def _check_prepare_numbers(size: int, augment: int, chosen: dict, folds: int = 0,
                           per_class: Optional[int] = None) -> None:
    from cervical import LIMITS

    if size < MIN_SIDE or size > LIMITS["size"]:
        raise DataError(f"--size {size}: use {MIN_SIDE} to {LIMITS['size']} (the study used 110)")
    if augment < 0 or augment > LIMITS["augment"]:
        raise DataError(f"--augment {augment}: must be 0 to {LIMITS['augment']}")
    if folds == 1 or folds < 0 or folds > LIMITS["folds"]:
        raise DataError(f"--folds {folds}: use 0 (one split) or 2 to {LIMITS['folds']} folds")
    if per_class is not None and not 0 <= per_class <= LIMITS["per_class"]:
        raise DataError(f"--per-class {per_class}: must be 0 to {LIMITS['per_class']}")
    for flag, allowed in (("augment_at", ("target", "raw")), ("fill", ("border", "black")),
                          ("augment_order", ("rgb", "bgr"))):
        if chosen[flag] not in allowed:
            raise DataError(f"--{flag.replace('_', '-')} {chosen[flag]}: unknown; choose "
                            f"{' or '.join(allowed)}")
    q = chosen["jpeg_quality"]
    if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q <= 100:
        raise DataError(f"--jpeg-quality {q}: must be an integer 0 (off) to 100")


def _prepare_into(stage: Path, out: Path, opts: PrepareOptions) -> dict:
    """Every step of ``prepare``, written into the staging folder ``stage``."""
    raw = _raw_source(stage, out, opts)
    records, class_names, task_name, cmap = _read_records(raw, opts)
    cells = _decode_cells(records, class_names, raw, opts)
    sizes = size_analysis(cells.widths, cells.heights)
    save_dataset_figures(stage / "analysis", cells.widths, cells.heights, cells.labels,
                         class_names, cells.images, opts.seed)
    files.write_json(stage / "analysis" / "size_analysis.json", sizes)
    info = _dataset_info(raw, opts, task_name, cmap, sizes, cells)
    assignments, designs = _assign_splits(cells, opts)
    copies = _augment_train(cells, assignments, opts)
    fold_infos = []
    for k, assign in enumerate(assignments):
        target = stage / f"fold_{k}" if opts.folds else stage
        splits = {s: _split_rows(cells, assign == s, copies if s == "train" else {}, raw)
                  for s in SPLITS}
        write_prepared(target, {s: _rows_to_arrays(r, cells.masks is not None)
                                for s, r in splits.items() if r}, class_names,
                       dict(info, fold=k if opts.folds else None, folds=opts.folds or None,
                            group_overlap=_group_overlap(assign, cells.groups),
                            **({"leak_design": designs[k]} if designs[k] else {})),
                       save_images=opts.save_images)
        fold_infos.append(read_info(target))
    _write_skipped(stage, cells.skipped, raw)
    return _prepare_summary(stage, fold_infos, info, class_names, cells, opts)


def _raw_source(stage: Path, out: Path, opts: PrepareOptions) -> _RawSource:
    """The raw folder: --data-dir, or synthetic cells generated into it (or into out/raw)."""
    if opts.dataset != "synthetic":
        if opts.data_dir is None:
            raise DataError(f"--data-dir is required for --dataset {opts.dataset}; point it at "
                            f"the raw files")
        return _RawSource(opts.dataset, opts.data_dir, opts.data_dir, None)
    from cervical import synthetic

    n = synthetic.FULL_COUNTS if opts.per_class == 0 else (opts.per_class or 120)
    # a split manifest names real files: generate exactly those (e.g. manifest:thesis gives the
    # study's 4049 SIPaKMeD file names, so its exact split can be rehearsed offline)
    stems = (synthetic.stems_from_csv(opts.manifest_csv) if opts.split_kind == "manifest"
             else None)
    if opts.data_dir is None:          # generated inside the staging folder, renamed with it
        generated = synthetic.generate(stage / "raw", per_class=n, seed=opts.seed, stems=stems,
                                       difficulty=opts.synthetic)
        generated["out_dir"] = str(out / "raw")
        return _RawSource("synthetic", stage / "raw", out / "raw", generated)
    generated = None
    if not opts.data_dir.exists() or not any(opts.data_dir.iterdir()):
        generated = synthetic.generate(opts.data_dir, per_class=n, seed=opts.seed, stems=stems,
                                       difficulty=opts.synthetic)
    return _RawSource("synthetic", opts.data_dir, opts.data_dir, generated)


def _read_records(raw: _RawSource, opts: PrepareOptions):
    """(records sorted by class and stem, task class names, task name, class map)."""
    dataset = detect_dataset(raw.data_dir) if raw.dataset == "auto" else raw.dataset
    if dataset not in READERS:
        raise DataError(f"--dataset {dataset}: unknown; choose sipakmed, herlev, folders or "
                        f"synthetic")
    raw.dataset = dataset
    records = READERS[dataset](raw.data_dir)
    cmap = load_class_map(opts.class_map) if opts.class_map else None
    task_name = "custom" if cmap else (opts.task or DEFAULT_TASK.get(dataset, "all"))
    class_names = apply_task(records, dataset, opts.task, cmap)
    records.sort(key=lambda r: (r.source_class, r.stem, str(r.path)))
    return records, class_names, task_name, cmap


def _decode_cells(records: List[Record], class_names: List[str], raw: _RawSource,
                  opts: PrepareOptions) -> _Cells:
    """Decode, mask and resize every record (in parallel, in a fixed order); skip unreadable ones."""
    jobs = [(r, opts.size, opts.resize, opts.interpolation, opts.jpeg_quality, raw.data_dir)
            for r in records]
    results = _pool_map(_load_record, jobs, opts.workers, opts.progress, "decode+resize")
    fatal = [msg for status, msg in results if status == "fatal"]
    if fatal:
        raise DataError(fatal[0])
    skipped = [(r, msg) for r, (status, msg) in zip(records, results) if status == "skip"]
    keep = [i for i, (status, _) in enumerate(results) if status == "ok"]
    if not keep:
        raise DataError(f"--data-dir {raw.data_dir}: none of the {len(records)} images could be "
                        f"read (first: {skipped[0][1]})")
    records = [records[i] for i in keep]
    payload = [results[i][1] for i in keep]            # (image, mask, (width, height))
    masks_list = [p[1] for p in payload]
    without = [r.path for r, m in zip(records, masks_list) if m is None]
    labels = np.array([class_names.index(r.class_name) for r in records], dtype=np.int64)
    missing = [c for i, c in enumerate(class_names) if i not in set(labels.tolist())]
    if missing:
        raise DataError(f"--data-dir {raw.data_dir}: class {missing[0]} has no readable image; "
                        f"fix its files or remove the folder")
    # masks are all-or-nothing (one array per split); say so when a few cells cost them all
    return _Cells(records=records, images=np.stack([p[0] for p in payload]),
                  masks=None if without else np.stack(masks_list),
                  widths=[p[2][0] for p in payload], heights=[p[2][1] for p in payload],
                  labels=labels, groups=np.array([r.group for r in records]), skipped=skipped,
                  masks_dropped=(len(without), str(without[0]))
                  if 0 < len(without) < len(records) else None)


def _dataset_info(raw: _RawSource, opts: PrepareOptions, task_name: str, cmap, sizes: dict,
                  cells: _Cells) -> dict:
    """The dataset.json keys shared by every fold: provenance, settings, size analysis."""
    fingerprint = fingerprint_files(
        [r.path for r in cells.records]
        + [p for r in cells.records for p in (r.nucleus, r.cytoplasm, r.mask_image) if p is not None]
        + [r.path for r, _ in cells.skipped], raw.data_dir)
    return {
        "dataset": raw.dataset, "task": task_name, "class_map": cmap,
        "source_dir": str(raw.final_dir), "image_size": opts.size, "resize": opts.resize,
        "interpolation": opts.interpolation,
        "split": opts.split if opts.split_kind != "manifest" else f"manifest:{opts.manifest_csv.name}",
        "variant": opts.variant, "seed": opts.seed, "augment": opts.augment,
        "augment_at": opts.augment_at,
        "fill": opts.fill, "jpeg_quality": opts.jpeg_quality,
        "augment_order": opts.augment_order, "size_analysis": sizes,
        "fingerprint": fingerprint, "skipped": len(cells.skipped), "generated": raw.generated,
        "versions": files.library_versions(),
    }


def _assign_splits(cells: _Cells, opts: PrepareOptions
                   ) -> Tuple[List[np.ndarray], List[Optional[dict]]]:
    """One (N,) array of "train"/"val"/"test" per fold (a single one without --folds), and the
    leak design of each ("" marks cells set aside by it; None without --leak-cells)."""
    if opts.split_kind == "thesis":
        assignments = [split_thesis(cells.labels, opts.seed)]
    elif opts.split_kind == "manifest":
        assignments = [split_from_manifest(cells.records, opts.manifest_csv)]
    elif opts.folds:
        assignments = split_folds(cells.labels, cells.groups, opts.folds, opts.seed)
    else:
        assignments = [split_grouped(cells.labels, cells.groups, opts.seed)]
    if not opts.leak_cells:
        return assignments, [None] * len(assignments)
    pairs = [randomise_leak(a, cells.labels, cells.groups, opts.leak_cells, opts.seed, k,
                            swap=opts.leak_swap) for k, a in enumerate(assignments)]
    designs = [dict(p[1], validation=opts.leak_val) for p in pairs]
    if opts.leak_val == "grouped":
        return [p[0] for p in pairs], designs
    out = []
    for (assign, _), before in zip(pairs, assignments):
        pool = np.flatnonzero(np.isin(before, ("train", "val")))     # not the moved test cells
        assign = assign.copy()
        assign[pool] = _cell_level_val(cells.labels[pool], opts.seed)
        out.append(assign)
    return out, designs


def _augment_train(cells: _Cells, assignments: List[np.ndarray], opts: PrepareOptions
                   ) -> Dict[int, list]:
    """{cell index: augmented copies} for every cell that is in train in some fold.

    A cell's copies depend only on (seed, class, stem), so the same cell gets the same copies
    whatever the split or fold.
    """
    if not opts.augment:
        return {}
    train_union = sorted({i for a in assignments for i in np.flatnonzero(a == "train")})
    raw = opts.augment_at == "raw"
    fill = 0 if opts.fill == "black" else "border"
    jobs = [(cells.records[i] if raw else cells.images[i],
             None if cells.masks is None or raw else cells.masks[i], opts.augment,
             [opts.seed, _stable_int(f"{cells.records[i].source_class}/{cells.records[i].stem}")],
             fill, opts.augment_order, opts.jpeg_quality,
             (opts.size, opts.resize, opts.interpolation) if raw else None)
            for i in train_union]
    copies = _pool_map(_augment_job, jobs, opts.workers, opts.progress, f"augment x{opts.augment}")
    return dict(zip(train_union, copies))


def _split_rows(cells: _Cells, member: np.ndarray, copies: Dict[int, list], raw: _RawSource
                ) -> List[ManifestRow]:
    """The rows of one split: each member cell, followed by its augmented copies (train only)."""
    rows = []
    for i in np.flatnonzero(member):
        r = cells.records[i]
        mask = None if cells.masks is None else cells.masks[i]
        common = dict(label=int(cells.labels[i]), group=r.group, source=_relative(r.path, raw.data_dir),
                      source_class=r.source_class)
        rows.append(ManifestRow(image=cells.images[i], stem=r.stem, augmented=False, mask=mask,
                                **common))
        for j, (image, aug_mask, group_name) in enumerate(copies.get(i, [])):
            rows.append(ManifestRow(image=image, stem=f"{r.stem}_aug{j}_{group_name}",
                                    augmented=True,
                                    mask=None if mask is None else
                                    (aug_mask if aug_mask is not None else mask), **common))
    return rows


def _rows_to_arrays(rows: List[ManifestRow], with_masks: bool) -> dict:
    """ManifestRows -> the column arrays ``write_prepared`` takes."""
    return dict(x=np.stack([r.image for r in rows]), y=np.array([r.label for r in rows]),
                stems=[r.stem for r in rows], groups=[r.group for r in rows],
                sources=[r.source for r in rows], source_classes=[r.source_class for r in rows],
                augmented=np.array([r.augmented for r in rows]),
                masks=np.stack([r.mask for r in rows]) if with_masks else None)


def _write_skipped(stage: Path, skipped: List[Tuple[Record, str]], raw: _RawSource) -> None:
    """skipped.txt: every unreadable input, under the path it will have after the commit."""
    if skipped:
        (stage / "skipped.txt").write_text("".join(
            f"{raw.final_path(r.path)}\t{msg.replace(str(r.path), str(raw.final_path(r.path)))}\n"
            for r, msg in skipped), encoding="utf-8", errors="backslashreplace")


def _prepare_summary(stage: Path, fold_infos: List[dict], info: dict, class_names: List[str],
                     cells: _Cells, opts: PrepareOptions) -> dict:
    """The returned summary (and folds.json for K-fold output)."""
    if opts.folds:
        files.write_json(stage / "folds.json", {
            "folds": opts.folds, "class_names": class_names,
            "fold_dirs": [f"fold_{k}" for k in range(opts.folds)], **info})
        summary = {"class_names": class_names, "folds": opts.folds,
                   "fold_totals": [f["totals"] for f in fold_infos], **info}
    else:
        summary = dict(fold_infos[0])
    summary["has_masks"] = cells.masks is not None
    if cells.masks_dropped:
        summary["masks_dropped"] = {"cells_without_masks": cells.masks_dropped[0],
                                    "example": cells.masks_dropped[1]}
    return summary


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _group_overlap(assign: np.ndarray, groups: np.ndarray) -> Dict[str, int]:
    """Number of groups (cluster images) shared between each pair of splits."""
    sets = {s: set(groups[assign == s].tolist()) for s in SPLITS}
    return {"train-val": len(sets["train"] & sets["val"]),
            "train-test": len(sets["train"] & sets["test"]),
            "val-test": len(sets["val"] & sets["test"])}


def format_summary(summary: dict) -> str:
    """A short human-readable summary of a prepare run."""
    lines = [f"prepared {summary.get('dataset')} ({summary.get('task')}) -> {summary.get('out')}"]
    names = summary["class_names"]
    if summary.get("folds"):
        for k, t in enumerate(summary["fold_totals"]):
            lines.append(f"  fold {k}: train {t['train']}  val {t['val']}  test {t['test']}")
    else:
        counts = summary["counts"]
        w = max(len(n) for n in names + ["class"])
        lines.append(f"  {'class':<{w}}  {'train':>6} {'val':>5} {'test':>5}")
        for n in names:
            lines.append(f"  {n:<{w}}  {counts['train'][n]:>6} {counts['val'][n]:>5} "
                         f"{counts['test'][n]:>5}")
        t = summary["totals"]
        lines.append(f"  {'total':<{w}}  {t['train']:>6} {t['val']:>5} {t['test']:>5}"
                     f"   (train includes x{summary.get('augment', 0)} augmented copies)")
        ov = summary.get("group_overlap") or {}
        lines.append(f"  groups shared between splits: train-test {ov.get('train-test')}, "
                     f"train-val {ov.get('train-val')}, val-test {ov.get('val-test')}")
    sa = summary.get("size_analysis", {})
    if sa:
        db = sa["densest_bin"]
        lines.append(f"  sizes: width {sa['width']['min']}-{sa['width']['max']}, height "
                     f"{sa['height']['min']}-{sa['height']['max']}; densest bin height "
                     f"{db['height_range'][0]:.0f}-{db['height_range'][1]:.0f} x width "
                     f"{db['width_range'][0]:.0f}-{db['width_range'][1]:.0f} -> suggested size "
                     f"{sa['suggested_size']}" + (
                         f" (the study's reading of the same bin: 'height {sa['study_printed']['height']:.1f}, "
                         f"width {sa['study_printed']['width']:.1f}')" if "study_printed" in sa else ""))
    if summary.get("skipped"):
        lines.append(f"  skipped {summary['skipped']} unreadable images (see skipped.txt)")
    if summary.get("masks_dropped"):
        md = summary["masks_dropped"]
        lines.append(f"  no masks stored: {md['cells_without_masks']} cells have no contour files "
                     f"(e.g. {md['example']}); add them to get nucleus/cell masks for all")
    return "\n".join(lines)
