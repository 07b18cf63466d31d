"""Data side of the study: a raw dataset -> a prepared dataset folder (thesis ch. 4-5).

The study read SIPaKMeD's single-cell crops, looked at their sizes, resized them to 110x110, split
them per class 80/20 then 80/20, and augmented the training split x7 offline. ``prepare`` does each
step as a small named function, fixes the study's flaws by default (grouped split by cluster image,
aspect-preserving resize, lossless storage, seeded augmentation) and keeps the study's protocol
available on purpose (``variant="thesis"``; cervical.protocol).

The pieces live in their own modules, and this one re-exports them so ``cervical.data`` stays the
one import for callers:

    cervical.readers    raw layouts -> Records: decoding, expert masks, label tasks, DataError
    cervical.splits     the study's split and membership, grouped splits and folds, the leak design
    cervical.prepared   the prepared-folder format: write_prepared, read_info, load_split, class weights
    cervical.data       (here) resize, size analysis, parallel decode/augment, figures, ``prepare``
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cervical import files, protocol
from cervical.readers import (  # noqa: F401  (re-exported: cervical.data is the one import)
    IMAGE_EXTS, MIN_SIDE, MAX_PIXELS, MASK_BACKGROUND, MASK_CYTOPLASM, MASK_NUCLEUS,
    SIPAKMED_CLASSES, HERLEV_CLASSES, TASKS, DEFAULT_TASK, DataError, decode_rgb, parse_dat, rasterize_polygon, label_mask_from_contours, herlev_label_mask, Record,
    detect_dataset, read_sipakmed, read_herlev, read_folders, READERS, apply_task, load_class_map,
    assign_groups)
from cervical.splits import (  # noqa: F401  (re-exported: cervical.data is the one import)
    SPLITS, THESIS_SPLIT_CSV, split_thesis, _grouped_fold, _cell_level_val, split_grouped,
    split_folds, randomise_leak, _SAFE_NAME, split_from_manifest, resolve_split_spec)
from cervical.prepared import (  # noqa: F401  (re-exported: cervical.data is the one import)
    THESIS_CLASS_WEIGHTS, class_weights, Split, MANIFEST_COLUMNS, read_info, read_manifest,
    load_split, write_prepared, fingerprint_files)


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


def _pool_each(fn, jobs, workers, progress, label, take) -> None:
    """``take(k, fn(jobs[k]))`` for every job, in order, as the results arrive.

    Jobs go to the worker processes a window at a time (two windows in flight, so the workers
    never wait for the next one), and each result is handed over and dropped before the next is
    kept: what is held is bounded by the window, not by the number of jobs.
    """
    import itertools
    import multiprocessing as mp
    import sys

    total = len(jobs)

    def done(i: int) -> None:
        if i % 200 == 0 or i == total:
            files.report_progress(progress, label, i, total)

    if workers <= 1 or total < 64:
        for k, job in enumerate(jobs):
            take(k, fn(job))
            done(k + 1)
        return
    window = 64 * workers
    # fork is fastest, but unsafe once TensorFlow has started threads in this process.
    ctx = mp.get_context("spawn" if "tensorflow" in sys.modules else "fork")
    with ctx.Pool(workers) as pool:
        starts = range(0, total, window)
        running = [pool.imap(fn, jobs[starts[0]:starts[0] + window], chunksize=16)]
        k = 0
        for start in itertools.chain(starts[1:], [None]):
            if start is not None:            # queue the next window before draining this one
                running.append(pool.imap(fn, jobs[start:start + window], chunksize=16))
            for result in running.pop(0):
                take(k, result)
                k += 1
                done(k)


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
    groups: Optional[Path] = None      # --groups FILE.csv (image -> group)
    group_pattern: Optional[str] = None  # --group-pattern REGEX (group from the file name)


@dataclasses.dataclass
class _RawSource:
    """Where the raw files are now, and where they will be once the staging folder is in place."""

    dataset: str
    data_dir: Path
    final_dir: Path
    generated: Optional[dict]         # the synthetic generator's summary, when it ran
    group_source: str = "layout"      # readers.assign_groups: file, pattern, layout or none

    def final_path(self, p: os.PathLike) -> Path:
        """A raw file's path after the commit (generated files move with the staging folder)."""
        return (self.final_dir / Path(p).relative_to(self.data_dir)
                if self.final_dir != self.data_dir else Path(p))


@dataclasses.dataclass
class _Cells:
    """The decoded dataset: one entry per readable cell, sorted by (source class, stem, path)."""

    records: List[Record]
    images: files.RowFile             # uint8 (N, size, size, 3), on disk in the staging folder
    masks: Optional[files.RowFile]    # uint8 (N, size, size), or None when any cell lacks one
    widths: List[int]                 # raw sizes, for the size analysis
    heights: List[int]
    labels: np.ndarray                # int64 (N,) task labels
    groups: np.ndarray                # (N,) cluster-image ids
    skipped: List[Tuple[Record, str]]
    masks_dropped: Optional[Tuple[int, str]]   # (cells without masks, an example) if masks were lost


@dataclasses.dataclass
class ManifestRow:
    """One image of a prepared split: one line of manifest.csv, and where its pixels are (row
    ``index`` of the decoded cells, or of the augmented copies when ``augmented``)."""

    index: int
    label: int
    stem: str
    group: str
    source: str                       # the raw file, relative to the raw folder
    source_class: str
    augmented: bool


@dataclasses.dataclass
class _Copies:
    """The augmented copies of the training cells, on disk: cell index -> (first row, names)."""

    images: Optional[files.RowFile]
    masks: Optional[files.RowFile]
    rows: Dict[int, Tuple[int, List[str]]]


class _SplitView:
    """The pixels (or masks) of one split's rows, read from the cell and copy files on demand."""

    def __init__(self, rows: List[ManifestRow], cells: Optional[files.RowFile],
                 copies: Optional[files.RowFile]):
        self.rows, self.cells, self.copies = rows, cells, copies
        self.shape = (len(rows),) + cells.row_shape
        self.dtype = cells.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> np.ndarray:
        r = self.rows[int(i)]
        return (self.copies if r.augmented else self.cells)[r.index]


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
            leak_swap: bool = False, groups: Optional[os.PathLike] = None,
            group_pattern: Optional[str] = None) -> dict:
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
        groups, group_pattern: where each image's group (slide, patient, cluster image) comes
            from when the layout does not say: a ``path,group`` CSV or a regular expression on
            the file name (``readers.assign_groups``). Without either, a folders dataset has one
            group per image, and the summary warns that its grouped split is a cell-level split.
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
                          leak_val, bool(leak_swap), None if groups is None else Path(groups),
                          group_pattern)
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
    _check_disk(len(records), stage, out, opts)
    work = Path(tempfile.mkdtemp(prefix=".rows-", dir=stage))
    try:
        return _prepare_rows(stage, work, raw, records, class_names, task_name, cmap, opts)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_rows(stage: Path, work: Path, raw: _RawSource, records: List[Record],
                  class_names: List[str], task_name: str, cmap, opts: PrepareOptions) -> dict:
    """Decode, analyse, split, augment and write, one cell at a time: the decoded cells and their
    augmented copies go to row files in ``work`` (deleted afterwards), so memory does not grow
    with the dataset."""
    cells = _decode_cells(records, class_names, raw, opts, work)
    sizes = size_analysis(cells.widths, cells.heights)
    save_dataset_figures(stage / "analysis", cells.widths, cells.heights, cells.labels,
                         class_names, cells.images, opts.seed)
    files.write_json(stage / "analysis" / "size_analysis.json", sizes)
    info = _dataset_info(raw, opts, task_name, cmap, sizes, cells)
    assignments, designs = _assign_splits(cells, opts)
    copies = _augment_train(cells, assignments, opts, work)
    fold_infos = []
    for k, assign in enumerate(assignments):
        target = stage / f"fold_{k}" if opts.folds else stage
        splits = {s: _split_rows(cells, assign == s, copies.rows if s == "train" else {}, raw)
                  for s in SPLITS}
        write_prepared(target, {s: _rows_to_arrays(r, cells, copies)
                                for s, r in splits.items() if r}, class_names,
                       dict(info, fold=k if opts.folds else None, folds=opts.folds or None,
                            group_overlap=_group_overlap(assign, cells.groups),
                            **({"leak_design": designs[k]} if designs[k] else {})),
                       save_images=opts.save_images)
        fold_infos.append(read_info(target))
    _write_skipped(stage, cells.skipped, raw)
    return _prepare_summary(stage, fold_infos, info, class_names, cells, opts)


def prepare_disk_estimate(n_cells: int, size: int, augment: int, folds: int = 0,
                          save_images: bool = True) -> float:
    """Bytes ``prepare`` writes at its peak for ``n_cells`` cells, an upper bound: every image and
    mask (4 bytes per pixel) with the augmented copies of the training share (0.64 of the cells),
    once in the row files of the decoded cells and their copies and once in the array cache of
    each fold (one without --folds), and once more as PNG files (at most their raw size) when
    images are saved. Memory no longer grows with the dataset (the rows are on disk); disk does."""
    once = n_cells * size * size * 4 * (1 + 0.64 * augment)
    return once * (1 + max(1, folds) * (2 if save_images else 1))


def free_disk(folder: os.PathLike) -> Optional[float]:
    """Bytes free on the file system holding ``folder``, None where unknown."""
    try:
        return float(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _check_disk(n_cells: int, stage: Path, out: Path, opts: "PrepareOptions") -> None:
    """Stop in one line before decoding when the output would not fit on the disk."""
    need = prepare_disk_estimate(n_cells, opts.size, opts.augment, opts.folds, opts.save_images)
    have = free_disk(stage)
    if have is not None and need > have:
        gb = 1024 ** 3
        raise DataError(f"--out {out}: preparing {n_cells} cells at --size {opts.size} "
                        f"--augment {opts.augment} writes up to {need / gb:.1f} GB and "
                        f"{have / gb:.1f} GB are free there; free space, choose another --out, "
                        f"or lower --size or --augment (--no-images saves the PNG copies)")


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
    raw.group_source = assign_groups(records, raw.data_dir, opts.groups, opts.group_pattern)
    cmap = load_class_map(opts.class_map) if opts.class_map else None
    task_name = "custom" if cmap else (opts.task or DEFAULT_TASK.get(dataset, "all"))
    class_names = apply_task(records, dataset, opts.task, cmap)
    records.sort(key=lambda r: (r.source_class, r.stem, str(r.path)))
    return records, class_names, task_name, cmap


def _decode_cells(records: List[Record], class_names: List[str], raw: _RawSource,
                  opts: PrepareOptions, work: Path) -> _Cells:
    """Decode, mask and resize every record (in parallel, in a fixed order) into row files in
    ``work``, one cell at a time; skip unreadable ones."""
    jobs = [(r, opts.size, opts.resize, opts.interpolation, opts.jpeg_quality, raw.data_dir)
            for r in records]
    images = files.RowFile(work / "cells_x.u8", (opts.size, opts.size, 3))
    masks = files.RowFile(work / "cells_masks.u8", (opts.size, opts.size))
    kept, skipped, without, widths, heights = [], [], [], [], []

    def take(k: int, result) -> None:
        status, payload = result
        if status == "fatal":
            raise DataError(payload)
        if status == "skip":
            skipped.append((records[k], payload))
            return
        image, mask, (width, height) = payload
        kept.append(records[k])
        images.append(image)
        masks.append(np.zeros(masks.row_shape, np.uint8) if mask is None else mask)
        if mask is None:
            without.append(records[k].path)
        widths.append(width)
        heights.append(height)

    _pool_each(_load_record, jobs, opts.workers, opts.progress, "decode+resize", take)
    if not kept:
        raise DataError(f"--data-dir {raw.data_dir}: none of the {len(records)} images could be "
                        f"read (first: {skipped[0][1]})")
    labels = np.array([class_names.index(r.class_name) for r in kept], dtype=np.int64)
    missing = [c for i, c in enumerate(class_names) if i not in set(labels.tolist())]
    if missing:
        raise DataError(f"--data-dir {raw.data_dir}: class {missing[0]} has no readable image; "
                        f"fix its files or remove the folder")
    # masks are all-or-nothing (one array per split); say so when a few cells cost them all
    return _Cells(records=kept, images=images, masks=None if without else masks,
                  widths=widths, heights=heights, labels=labels,
                  groups=np.array([r.group for r in kept]), skipped=skipped,
                  masks_dropped=(len(without), str(without[0]))
                  if 0 < len(without) < len(kept) else None)


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
        "versions": files.library_versions(), "groups": _group_info(raw, cells),
    }


def _group_info(raw: "_RawSource", cells: "_Cells") -> dict:
    """Where the groups came from and whether they are only the images themselves."""
    n_groups = len(set(cells.groups.tolist()))
    return {"source": raw.group_source, "n_groups": n_groups, "n_cells": len(cells.records),
            "cell_level": n_groups == len(cells.records)}


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


def _augment_train(cells: _Cells, assignments: List[np.ndarray], opts: PrepareOptions,
                   work: Path) -> _Copies:
    """The augmented copies of every cell that is in train in some fold, written to row files in
    ``work`` as they are made.

    A cell's copies depend only on (seed, class, stem), so the same cell gets the same copies
    whatever the split or fold.
    """
    if not opts.augment:
        return _Copies(None, None, {})
    train_union = sorted({i for a in assignments for i in np.flatnonzero(a == "train")})
    raw = opts.augment_at == "raw"
    fill = 0 if opts.fill == "black" else "border"
    copies = _Copies(files.RowFile(work / "copies_x.u8", cells.images.row_shape),
                     None if cells.masks is None
                     else files.RowFile(work / "copies_masks.u8", cells.masks.row_shape), {})
    jobs = _LazyJobs(lambda i: (
        cells.records[i] if raw else cells.images[i],
        None if cells.masks is None or raw else cells.masks[i], opts.augment,
        [opts.seed, _stable_int(f"{cells.records[i].source_class}/{cells.records[i].stem}")],
        fill, opts.augment_order, opts.jpeg_quality,
        (opts.size, opts.resize, opts.interpolation) if raw else None), train_union)

    def take(k: int, made: list) -> None:
        i = train_union[k]
        copies.rows[i] = (len(copies.images), [name for _, _, name in made])
        for image, aug_mask, _ in made:
            copies.images.append(image)
            if copies.masks is not None:
                copies.masks.append(cells.masks[i] if aug_mask is None else aug_mask)

    _pool_each(_augment_job, jobs, opts.workers, opts.progress, f"augment x{opts.augment}", take)
    return copies


class _LazyJobs:
    """``[make(i) for i in items]``, made only when a slice or an item is asked for (the jobs
    of the augmentation carry a whole image each)."""

    def __init__(self, make, items: Sequence[int]):
        self.make, self.items = make, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.make(i) for i in self.items[key]]
        return self.make(self.items[key])

    def __iter__(self):
        return (self.make(i) for i in self.items)


def _split_rows(cells: _Cells, member: np.ndarray, copies: Dict[int, Tuple[int, List[str]]],
                raw: _RawSource) -> List[ManifestRow]:
    """The rows of one split: each member cell, followed by its augmented copies (train only)."""
    rows = []
    for i in np.flatnonzero(member):
        r = cells.records[i]
        common = dict(label=int(cells.labels[i]), group=r.group,
                      source=_relative(r.path, raw.data_dir), source_class=r.source_class)
        rows.append(ManifestRow(index=int(i), stem=r.stem, augmented=False, **common))
        first, names = copies.get(i, (0, []))
        for j, group_name in enumerate(names):
            rows.append(ManifestRow(index=first + j, stem=f"{r.stem}_aug{j}_{group_name}",
                                    augmented=True, **common))
    return rows


def _rows_to_arrays(rows: List[ManifestRow], cells: _Cells, copies: _Copies) -> dict:
    """ManifestRows -> the columns ``write_prepared`` takes (pixels and masks as views that read
    the row files on demand)."""
    return dict(x=_SplitView(rows, cells.images, copies.images), y=np.array([r.label for r in rows]),
                stems=[r.stem for r in rows], groups=[r.group for r in rows],
                sources=[r.source for r in rows], source_classes=[r.source_class for r in rows],
                augmented=np.array([r.augmented for r in rows]),
                masks=None if cells.masks is None
                else _SplitView(rows, cells.masks, copies.masks))


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
    if info["groups"]["cell_level"] and opts.split_kind == "grouped":
        summary["warnings"] = [
            "no group information: every image is its own group, so this grouped split is a "
            "cell-level split (cells of one slide can be in train and test); give --groups "
            "FILE.csv or --group-pattern REGEX"]
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
    for warning in summary.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if summary.get("masks_dropped"):
        md = summary["masks_dropped"]
        lines.append(f"  no masks stored: {md['cells_without_masks']} cells have no contour files "
                     f"(e.g. {md['example']}); add them to get nucleus/cell masks for all")
    return "\n".join(lines)
