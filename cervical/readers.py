"""Raw datasets: decoding, expert masks, the readers of each layout, and the label tasks.

A reader turns a raw folder into a list of ``Record`` (one cell: its file, class, cluster-image
group and mask sources); ``cervical.data.prepare`` decodes, resizes, splits and stores them.

Layouts: SIPaKMeD (``im_<Class>/.../NNN_MM.bmp`` with ``_nuc.dat``/``_cyt.dat`` contours; group =
the cluster image NNN), Herlev (``<class>/<name>.BMP`` with ``-d.bmp`` masks; every image its own
group), any ``<class>/<image>`` folder tree, and the synthetic set (SIPaKMeD's layout). Images are
decoded to 8-bit RGB whatever their mode.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
MIN_SIDE = 8                    # smaller crops carry no usable cell (1x1 images are bad input)
MAX_PIXELS = 40_000_000         # decompression-bomb guard (a SIPaKMeD crop is < 0.3 Mpx)
MASK_BACKGROUND, MASK_CYTOPLASM, MASK_NUCLEUS = 0, 1, 2

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


def assign_groups(records: List[Record], root: os.PathLike, groups_csv: Optional[os.PathLike] = None,
                  pattern: Optional[str] = None) -> str:
    """Set each record's group (the slide, patient or cluster image its cell came from) and say
    where the groups came from.

    A grouped split keeps every group inside one split; cells of one slide share its stain and
    focus, so without group information a "grouped" split is a cell-level split, the study's
    leak. Sources, in order:

        groups_csv  a CSV with columns ``path,group``: path relative to ``root`` (as written in
                    manifest.csv's "source" column), every image listed once;
        pattern     a regular expression searched in each file stem; the group is its first
                    capture group (or the whole match), e.g. ``^(\\d+)_`` for "NNN_MM" names;
        the layout  SIPaKMeD (and the synthetic set): the cluster image NNN of "NNN_MM";
        none        every other layout: each image is its own group.

    Groups from a file or a pattern are prefixed with the class folder, as cluster images are.

    Args:
        records: from a reader (changed in place).
        root: the raw folder.
        groups_csv, pattern: the two user-given sources (at most one).
    Returns:
        "file", "pattern", "layout" or "none".
    Raises:
        DataError: both given, an unreadable file, an image it does not list, a listed image
            that is not there, or a stem the pattern does not match.
    """
    if groups_csv and pattern:
        raise DataError("--groups / --group-pattern: give one of them, not both")
    if groups_csv:
        table = _read_groups_csv(Path(groups_csv))
        missing = []
        for r in records:
            rel = _relative_posix(r.path, Path(root))
            if rel not in table:
                missing.append(rel)
                continue
            r.group = f"{r.source_class}/{table.pop(rel)}"
        if missing:
            raise DataError(f"--groups {groups_csv}: {len(missing)} images are not listed (first: "
                            f"{missing[0]}); give every image a group")
        if table:
            raise DataError(f"--groups {groups_csv}: {len(table)} listed images are not in "
                            f"--data-dir (first: {next(iter(table))}); fix the paths")
        return "file"
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise DataError(f"--group-pattern {pattern!r}: not a regular expression ({exc})") from None
        for r in records:
            m = rx.search(r.stem)
            if not m:
                raise DataError(f"--group-pattern {pattern!r}: no match in the file name {r.path.name}; "
                                f"adjust the pattern")
            r.group = f"{r.source_class}/{m.group(1) if m.groups() else m.group(0)}"
        return "pattern"
    return "none" if all(r.group == f"{r.source_class}/{r.stem}" for r in records) else "layout"


def _relative_posix(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _read_groups_csv(path: Path) -> Dict[str, str]:
    """{relative image path: group} from a ``path,group`` CSV."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"--groups {path}: cannot read ({type(exc).__name__}); give a CSV with "
                        f"columns path,group") from None
    if not rows or not {"path", "group"} <= set(rows[0]):
        raise DataError(f"--groups {path}: needs columns path,group (path relative to --data-dir)")
    table: Dict[str, str] = {}
    for i, row in enumerate(rows, 2):
        key, group = str(row["path"]).strip().replace("\\", "/"), str(row["group"]).strip()
        if not key or not group:
            raise DataError(f"--groups {path}:{i}: empty path or group; fill both columns")
        if key in table:
            raise DataError(f"--groups {path}:{i}: {key} listed twice; list every image once")
        table[key] = group
    return table


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
