"""Data side: decoding, contours, splits, class weights, prepare end to end, bad input."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cervical import data
from conftest import HERLEV, make_blob_cells, requires_herlev

ROOT = Path(__file__).resolve().parents[1]
SIPAKMED_COUNTS = {"Dyskeratotic": 813, "Koilocytotic": 825, "Metaplastic": 793, "Parabasal": 787,
                   "Superficial-Intermediate": 831}
# The study's per-class table (docs/study.md §1).
THESIS_TABLE = {"Dyskeratotic": (520, 130, 163), "Koilocytotic": (528, 132, 165),
                "Metaplastic": (507, 127, 159), "Parabasal": (503, 126, 158),
                "Superficial-Intermediate": (531, 133, 167)}


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# --- class weights -----------------------------------------------------------------------------

def test_class_weights_reproduce_study_constants_from_its_test_counts():
    labels = np.repeat(np.arange(5), [163, 165, 159, 158, 167])
    w = data.class_weights(labels)
    assert w == pytest.approx(data.THESIS_CLASS_WEIGHTS, abs=0, rel=0)
    assert w[0] == 0.996319018404908 and w[4] == 0.9724550898203593


def test_class_weights_formula_by_hand():
    # n = 6, K = 2: class 0 has 4 -> 6/(2*4) = 0.75, class 1 has 2 -> 6/(2*2) = 1.5
    assert data.class_weights([0, 0, 0, 0, 1, 1]) == {0: 0.75, 1: 1.5}


# --- splits ------------------------------------------------------------------------------------

def test_thesis_split_gives_the_study_counts_per_class():
    names = sorted(SIPAKMED_COUNTS)
    labels = np.repeat(np.arange(5), [SIPAKMED_COUNTS[n] for n in names])
    assign = data.split_thesis(labels, seed=42)
    for c, n in enumerate(names):
        got = tuple(int(((labels == c) & (assign == s)).sum()) for s in data.SPLITS)
        assert got == THESIS_TABLE[n]
    assert [int((assign == s).sum()) for s in data.SPLITS] == [2589, 648, 812]


def _clustered_labels(seed=0):
    """SIPaKMeD-like: 4049 cells in 966 cluster images (1..8 cells each), one class per cluster."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    gid = 0
    for c, n in enumerate(SIPAKMED_COUNTS.values()):
        left = n
        while left > 0:
            k = min(left, int(rng.integers(1, 8)))
            labels += [c] * k
            groups += [f"{c}/{gid:03d}"] * k
            left -= k
            gid += 1
    return np.array(labels), np.array(groups)


def test_grouped_split_has_no_shared_group_and_study_proportions():
    labels, groups = _clustered_labels()
    assign = data.split_grouped(labels, groups, seed=42)
    sets = {s: set(groups[assign == s]) for s in data.SPLITS}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"])
    assert not (sets["val"] & sets["test"])
    shares = {s: (assign == s).mean() for s in data.SPLITS}
    assert shares["train"] == pytest.approx(0.64, abs=0.02)
    assert shares["val"] == pytest.approx(0.16, abs=0.02)
    assert shares["test"] == pytest.approx(0.20, abs=0.02)
    for c in range(5):  # stratified: each class keeps its share in every split
        for s in data.SPLITS:
            assert ((labels == c) & (assign == s)).sum() / (labels == c).sum() == pytest.approx(
                {"train": 0.64, "val": 0.16, "test": 0.2}[s], abs=0.05)
    assert np.array_equal(assign, data.split_grouped(labels, groups, seed=42))


def test_kfold_tests_every_cell_exactly_once_without_group_leak():
    labels, groups = _clustered_labels(1)
    folds = data.split_folds(labels, groups, k=5, seed=0)
    tested = np.sum([f == "test" for f in folds], axis=0)
    assert np.all(tested == 1)
    for f in folds:
        assert not set(groups[f == "train"]) & set(groups[f == "test"])


def test_manifest_split_reproduces_the_study_csv_membership():
    rows = list(csv.DictReader(open(ROOT / "data" / "splits" / "thesis_split.csv")))
    records = [data.Record(path=Path(f"{r['class']}/{r['stem']}.bmp"), source_class=r["class"],
                           stem=r["stem"], group=f"{r['class']}/{r['stem'][:3]}") for r in rows]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(records))  # membership must not depend on order
    assign = data.split_from_manifest([records[i] for i in order], data.resolve_split_spec(
        "manifest:thesis")[1])
    assert [assign[j] for j in range(len(order))] == [rows[i]["split"] for i in order]
    assert [int((assign == s).sum()) for s in data.SPLITS] == [2589, 648, 812]


def test_manifest_split_refuses_a_dataset_it_does_not_describe(tmp_path):
    f = tmp_path / "m.csv"
    f.write_text("split,class,stem\ntrain,A,001_01\ntest,A,001_02\n")
    recs = [data.Record(path=Path("x.bmp"), source_class="A", stem="009_01", group="A/009")]
    with pytest.raises(data.DataError, match="not listed"):
        data.split_from_manifest(recs, f)


# --- decoding and contours ---------------------------------------------------------------------

@pytest.mark.parametrize("mode,value,expected", [
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 0), (255, 255, 255)),          # fully transparent -> white background
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_every_mode_decodes_to_rgb8(tmp_path, mode, value, expected):
    f = tmp_path / f"im_{mode}.{'tif' if mode == 'CMYK' else 'png'}"
    Image.new(mode, (12, 10), value).save(f)
    arr = data.decode_rgb(f)
    assert arr.dtype == np.uint8 and arr.shape == (10, 12, 3)
    assert tuple(arr[5, 5]) == expected


def test_palette_and_16bit_decode(tmp_path):
    p = Image.new("P", (9, 9), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.save(tmp_path / "p.bmp")
    assert tuple(data.decode_rgb(tmp_path / "p.bmp")[0, 0]) == (200, 100, 50)
    arr16 = np.full((9, 9), 65535, np.uint16)
    arr16[0, 0] = 0
    Image.fromarray(arr16).save(tmp_path / "i16.png")
    out = data.decode_rgb(tmp_path / "i16.png")
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_dat_square_polygon_rasterises_to_known_pixels(tmp_path):
    # Vertices on half-pixel coordinates: pixel centres 2..5 (x and y) are strictly inside -> 4x4.
    f = tmp_path / "c.dat"
    f.write_text("1.5,1.5\n5.5, 1.5\n5.5\t5.5\n1.5 5.5\n\n")
    poly = data.parse_dat(f)
    assert poly.shape == (4, 2)
    mask = data.rasterize_polygon(poly, (8, 10))
    expected = np.zeros((8, 10), bool)
    expected[2:6, 2:6] = True
    assert np.array_equal(mask, expected)
    # nucleus painted over cytoplasm
    lab = data.label_mask_from_contours(poly, np.array([[0.5, 0.5], [8.5, 0.5], [8.5, 6.5],
                                                        [0.5, 6.5]]), (8, 10))
    assert (lab == 2).sum() == 16 and (lab == 1).sum() == 8 * 6 - 16


def test_unreadable_dat_is_a_one_line_error(tmp_path):
    f = tmp_path / "bad.dat"
    f.write_text("12,abc\n")
    with pytest.raises(data.DataError, match="bad.dat:1"):
        data.parse_dat(f)


def test_resize_pad_keeps_aspect_and_mask_alignment():
    img = np.full((20, 40, 3), 200, np.uint8)
    img[5:15, 10:20] = 0                         # a dark square
    mask = np.zeros((20, 40), np.uint8)
    mask[5:15, 10:20] = 2
    out, m = data.resize_cell(img, 20, "pad", "nearest", mask)
    # 40x40 canvas (10 rows of border colour above), halved: square -> rows 7..12, cols 5..10
    assert out.shape == (20, 20, 3) and m.shape == (20, 20)
    assert np.array_equal(m == 2, out[:, :, 0] == 0)
    assert (m == 2).sum() == 25
    assert tuple(out[0, 0]) == (200, 200, 200)


# --- readers -----------------------------------------------------------------------------------

@requires_herlev
def test_herlev_sample_reads_297_cells_with_masks():
    recs = data.read_herlev(HERLEV)
    assert len(recs) == 297 and all(r.mask_image is not None for r in recs)
    names = data.apply_task(recs, "herlev", "7class")
    assert names == sorted(data.HERLEV_CLASSES)
    m = data.herlev_label_mask(recs[0].mask_image)
    assert set(np.unique(m)) <= {0, 1, 2} and (m == 2).any() and (m == 1).any()
    assert data.apply_task(data.read_herlev(HERLEV), "herlev", "2class") == ["abnormal", "normal"]


def _write_sipakmed(root, nested=True, classes=("Dyskeratotic", "Parabasal"), clusters=3, cells=2):
    rng = np.random.default_rng(0)
    for cls in classes:
        folder = root / f"im_{cls}" / f"im_{cls}" / "CROPPED" if nested else root / f"im_{cls}"
        folder.mkdir(parents=True)
        for g in range(1, clusters + 1):
            for c in range(1, cells + 1):
                stem = f"{g:03d}_{c:02d}"
                Image.fromarray(rng.integers(0, 255, (30, 24, 3), dtype=np.uint8)).save(
                    folder / f"{stem}.bmp")
                if nested:
                    (folder / f"{stem}_cyt.dat").write_text("2,2\n20,2\n20,26\n2,26\n")
                    (folder / f"{stem}_nuc.dat").write_text("8.0 10.0\n14.0 10.0\n14.0 16.0\n")
    return root


@pytest.mark.parametrize("nested", [True, False])
def test_sipakmed_reader_groups_by_cluster_image(tmp_path, nested):
    root = _write_sipakmed(tmp_path / "raw", nested=nested)
    assert data.detect_dataset(root) == "sipakmed"
    recs = data.read_sipakmed(root)
    assert len(recs) == 12
    assert {r.group for r in recs} == {f"{c}/{g:03d}" for c in ("Dyskeratotic", "Parabasal")
                                       for g in (1, 2, 3)}
    assert all((r.nucleus is not None) == nested for r in recs)


def test_three_class_task_maps_sipakmed_folders():
    recs = [data.Record(Path(f"{c}.bmp"), c, "001_01", c) for c in SIPAKMED_COUNTS]
    assert data.apply_task(recs, "sipakmed", "3class") == ["abnormal", "benign", "normal"]
    assert {r.source_class: r.class_name for r in recs}["Koilocytotic"] == "abnormal"


# --- prepare end to end ------------------------------------------------------------------------

def test_prepare_sipakmed_with_contours_and_thesis_split(tmp_path):
    root = _write_sipakmed(tmp_path / "raw", clusters=5, cells=2)
    s = data.prepare("sipakmed", root, tmp_path / "out", size=16, split="thesis", augment=0,
                     workers=1)
    assert s["totals"] == {"train": 12, "val": 4, "test": 4} and s["has_masks"]
    tr = data.load_split(tmp_path / "out", "train")
    assert tr.masks is not None and tr.x.shape == (12, 16, 16, 3)
    assert (tr.masks == 2).any() and (tr.masks == 1).any()
    rows = data.read_manifest(tmp_path / "out")
    assert all((tmp_path / "out" / r["path"]).is_file() and (tmp_path / "out" / r["mask"]).is_file()
               for r in rows)


@requires_herlev
def test_prepare_is_byte_identical_when_repeated(tmp_path):
    outs = []
    for k in range(2):
        data.prepare("herlev", HERLEV, tmp_path / f"o{k}", size=24, augment=0, workers=2,
                     save_images=False)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / f"o{k}").rglob("*"))
                     if p.is_file() and p.suffix in (".npy", ".csv", ".json")})
    assert outs[0].keys() == outs[1].keys() and outs[0] == outs[1]
    info = data.read_info(tmp_path / "o0")
    assert info["group_overlap"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert sum(info["originals"].values()) == 297


# --- bad input through the CLI: one line, exit 2, nothing half-written -------------------------

def _assert_one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr
    # progress lines may come first; the error itself is exactly one (the last) line
    lines = [ln for ln in res.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and res.stderr.strip().splitlines()[-1] == lines[0], res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_missing_empty_and_classless_dirs(tmp_path):
    _assert_one_line_error(cli("prepare", "--dataset", "folders", "--data-dir", tmp_path / "nope",
                               "--out", tmp_path / "o"), "does not exist")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(cli("prepare", "--dataset", "folders", "--data-dir", tmp_path / "empty",
                               "--out", tmp_path / "o"), "empty")
    (tmp_path / "tree" / "classA").mkdir(parents=True)
    (tmp_path / "tree" / "classB").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "tree" / "classA" / "a.png")
    _assert_one_line_error(cli("prepare", "--dataset", "folders", "--data-dir", tmp_path / "tree",
                               "--out", tmp_path / "o"), "classB", "no images")
    assert not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".o.partial-*"))


def test_cli_unknown_task_split_and_existing_out(tmp_path):
    root = _write_sipakmed(tmp_path / "raw", nested=False)
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out",
                               tmp_path / "o", "--task", "9class"), "--task 9class")
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out",
                               tmp_path / "o", "--split", "random"), "--split random")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out",
                               tmp_path / "full"), "--overwrite")
    assert (tmp_path / "full" / "x.txt").read_text() == "keep me"
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out",
                               tmp_path / "o", "--size", "nope"), "--size")


def test_cli_bad_dat_fails_and_bad_images_are_skipped_and_listed(tmp_path):
    root = _write_sipakmed(tmp_path / "raw", clusters=4, cells=2)
    folder = root / "im_Parabasal" / "im_Parabasal" / "CROPPED"
    (folder / "009_01.bmp").write_bytes(b"BM this is not a bitmap")         # corrupt
    good = folder / "001_01.bmp"
    (folder / "009_02.bmp").write_bytes(good.read_bytes()[:60])             # truncated
    Image.new("RGB", (1, 1)).save(folder / "009_03.bmp")                    # 1x1
    Image.new("L", (7000, 6000)).save(folder / "009_04.png")                # 42 Mpx: too large
    res = cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out", tmp_path / "o",
              "--augment", "0", "--split", "thesis", "--size", "16")
    assert res.returncode == 0, res.stderr
    skipped = (tmp_path / "o" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(ln.split("\t")[0]).name for ln in skipped) == [
        "009_01.bmp", "009_02.bmp", "009_03.bmp", "009_04.png"]
    assert json.loads((tmp_path / "o" / "dataset.json").read_text())["skipped"] == 4
    assert "skipped 4" in res.stdout
    (folder / "002_01_nuc.dat").write_text("1,2\nthree,4\n")
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out",
                               tmp_path / "o2", "--augment", "0"), "002_01_nuc.dat")
    assert not (tmp_path / "o2").exists()


# --- review fixes: unique file names, safe --overwrite, final source paths, decompression bombs --

def _tree(root):
    """{relative path: bytes} of every file under root (to show a folder was left untouched)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_write_prepared_prefixes_merged_source_class_and_refuses_duplicate_paths(tmp_path):
    x, y, m = make_blob_cells((2, 1), size=16)
    # Two cells with stem 001_01 from different source classes merged into task class "merged",
    # and one whose source class is its task class (keeps the plain stem, as in the 5-class layout).
    split = dict(x=x, y=np.array([0, 0, 1]), masks=m, stems=["001_01", "001_01", "001_01"],
                 source_classes=["A", "B", "plain"])
    data.write_prepared(tmp_path / "ok", {"train": split}, ["merged", "plain"])
    rows = data.read_manifest(tmp_path / "ok")
    assert [r["path"] for r in rows] == ["images/train/merged/A__001_01.png",
                                         "images/train/merged/B__001_01.png",
                                         "images/train/plain/001_01.png"]
    assert [r["mask"] for r in rows] == [p.replace("images/", "masks/", 1) for p in
                                         (r["path"] for r in rows)]
    assert [r["stem"] for r in rows] == ["001_01"] * 3      # the manifest keeps the source stem
    dup = dict(split, source_classes=["A", "A", "plain"])
    with pytest.raises(data.DataError, match="A__001_01.png"):
        data.write_prepared(tmp_path / "dup", {"train": dup}, ["merged", "plain"])
    assert not (tmp_path / "dup").exists()                 # refused before writing anything


@pytest.mark.parametrize("task", ["2class", "3class"])
def test_prepare_merged_class_task_writes_one_png_per_manifest_row(tmp_path, task):
    out = tmp_path / "o"
    data.prepare("synthetic", None, out, task=task, per_class=12, augment=1, size=16, workers=1)
    rows = data.read_manifest(out)
    # 60 cells: 64 % train (each with 1 augmented copy) -> ~93 rows; before the fix 77 unique.
    assert len(rows) > 80
    assert len({r["path"] for r in rows}) == len(rows)
    assert len({r["mask"] for r in rows}) == len(rows)
    assert len(list((out / "images").rglob("*.png"))) == len(rows)
    assert len(list((out / "masks").rglob("*.png"))) == len(rows)
    for s in data.SPLITS:
        srows = [r for r in rows if r["split"] == s]
        xs = np.load(out / "cache" / f"{s}_x.npy")
        ms = np.load(out / "cache" / f"{s}_masks.npy")
        assert len(srows) == len(xs) > 0
        for r, xi, mi in zip(srows, xs, ms):
            assert r["source_class"] != r["class_name"]
            assert Path(r["path"]).name.startswith(r["source_class"] + "__")
            assert np.array_equal(np.asarray(Image.open(out / r["path"])), xi)
            assert np.array_equal(np.asarray(Image.open(out / r["mask"])), mi)


def test_prepare_overwrite_refuses_a_folder_that_is_not_a_prepared_dataset(tmp_path):
    root = _write_sipakmed(tmp_path / "raw", nested=False)
    docs = _write_sipakmed(tmp_path / "docs", nested=False)       # e.g. another raw dataset
    (docs / "notes.txt").write_text("keep me")
    before = _tree(docs)
    with pytest.raises(data.DataError, match="not a prepared dataset folder.*choose another --out"):
        data.prepare("sipakmed", root, docs, overwrite=True, size=16, split="thesis", augment=0,
                     workers=1)
    assert _tree(docs) == before
    # a file where --out should be is not a prepared dataset either
    (tmp_path / "file.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="not a prepared dataset folder"):
        data.prepare("sipakmed", root, tmp_path / "file.txt", overwrite=True, workers=1)
    assert (tmp_path / "file.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".*.partial-*"))


def test_prepare_refuses_data_dir_inside_or_equal_to_out(tmp_path):
    out = tmp_path / "data"
    root = _write_sipakmed(out / "sipakmed", nested=False)
    (out / "dataset.json").write_text('{"class_names": ["a", "b"]}\n')  # looks prepared
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(data.DataError, match="--data-dir .* is inside --out"):
            data.prepare("sipakmed", root, out, overwrite=overwrite, augment=0, workers=1)
        with pytest.raises(data.DataError, match="--data-dir .* is inside --out"):
            data.prepare("sipakmed", out, out, overwrite=overwrite, augment=0, workers=1)
    assert _tree(out) == before
    # through the CLI: one line, exit code 2, nothing touched or left behind
    _assert_one_line_error(cli("prepare", "--dataset", "sipakmed", "--data-dir", root, "--out", out,
                               "--overwrite"), "--data-dir", "inside --out")
    assert _tree(out) == before
    assert not list(tmp_path.glob(".*.partial-*"))
    # and the reverse: an --out inside the raw folder would be read as data next time
    raw_before = _tree(root)
    with pytest.raises(data.DataError, match="--out .* is inside --data-dir"):
        data.prepare("sipakmed", root, root / "prepared", augment=0, workers=1)
    assert _tree(root) == raw_before


def test_dataset_json_names_final_source_and_rerun_is_byte_identical(tmp_path):
    out = tmp_path / "o"
    kw = dict(task="2class", per_class=12, augment=1, size=16, workers=1, save_images=False)
    data.prepare("synthetic", None, out, **kw)
    first = {n: (out / n).read_bytes() for n in ("dataset.json", "manifest.csv")}
    info = json.loads(first["dataset.json"])
    assert info["source_dir"] == str(out / "raw") == info["generated"]["out_dir"]
    assert ".partial" not in first["dataset.json"].decode()
    assert (out / "raw" / "synthetic.json").is_file()
    assert not list(tmp_path.glob(".*"))                    # no staging or trash folder left
    # dataset.json holds no time-dependent field (no timestamp; versions are library versions),
    # so the whole file must match byte for byte.
    data.prepare("synthetic", None, out, overwrite=True, **kw)
    assert {n: (out / n).read_bytes() for n in first} == first
    assert Path(json.loads((out / "dataset.json").read_text())["source_dir"]).is_dir()


def test_decompression_bomb_is_skipped_and_listed(tmp_path, monkeypatch):
    import PIL.Image

    # PIL raises DecompressionBombError (an Exception, not an OSError) over 2 x MAX_IMAGE_PIXELS;
    # with the limit at 1000 a 60x50 image (3000 px) trips it, the 30x24 cells (720 px) do not.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (60, 50), (10, 20, 30)).save(bomb)
    with pytest.raises(data.DataError, match=r"bomb\.png: .*decompression bomb"):
        data.decode_rgb(bomb)
    root = _write_sipakmed(tmp_path / "raw", nested=False, clusters=4, cells=2)
    Image.new("RGB", (60, 50), (10, 20, 30)).save(root / "im_Parabasal" / "009_01.bmp")
    s = data.prepare("sipakmed", root, tmp_path / "o", size=16, split="thesis", augment=0,
                     workers=1)
    assert s["skipped"] == 1 and sum(s["originals"].values()) == 16
    (line,) = (tmp_path / "o" / "skipped.txt").read_text().splitlines()
    path, reason = line.split("\t")
    assert Path(path) == root / "im_Parabasal" / "009_01.bmp" and "decompression bomb" in reason


def test_prepare_says_when_a_few_cells_without_contours_cost_all_masks(tmp_path):
    root = _write_sipakmed(tmp_path / "raw", clusters=4)
    cropped = root / "im_Parabasal" / "im_Parabasal" / "CROPPED"
    for suffix in ("_nuc.dat", "_cyt.dat"):
        (cropped / f"002_01{suffix}").unlink()
    s = data.prepare("sipakmed", root, tmp_path / "out", augment=0, workers=1, size=16,
                     save_images=False)
    assert s["has_masks"] is False
    assert s["masks_dropped"]["cells_without_masks"] == 1
    assert s["masks_dropped"]["example"].endswith("002_01.bmp")
    assert "1 cells have no contour files" in data.format_summary(s)


def test_synthetic_with_a_manifest_generates_exactly_its_files(tmp_path):
    """--dataset synthetic --split manifest:FILE generates the manifest's stems, so the study's exact
    membership (manifest:thesis) can be rehearsed offline; every row lands in its listed split."""
    import csv

    rows = [("train", "Parabasal", "007_01"), ("train", "Parabasal", "007_02"),
            ("val", "Parabasal", "011_01"), ("test", "Parabasal", "012_03"),
            ("train", "Metaplastic", "101_01"), ("train", "Metaplastic", "102_01"),
            ("val", "Metaplastic", "103_02"), ("test", "Metaplastic", "104_01")]
    spec = tmp_path / "split.csv"
    with open(spec, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "class", "stem"])
        w.writerows(rows)
    out = tmp_path / "out"
    data.prepare("synthetic", None, out, split=f"manifest:{spec}", augment=0, size=16, workers=1,
                 save_images=False)
    got = {(r["split"], r["class_name"], r["stem"]) for r in data.read_manifest(out)}
    assert got == set(rows)


# ------------------------------------------------------------------------------------------------
# The study's preparation, switch by switch (docs/study.md §1-2)
# ------------------------------------------------------------------------------------------------

def _raw_record(tmp_path, image, name="001_01"):
    from PIL import Image

    folder = tmp_path / "im_Parabasal"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{name}.bmp")
    return data.Record(path=folder / f"{name}.bmp", class_name="Parabasal",
                       source_class="Parabasal", group="Parabasal/001", stem=name)


def test_fill_black_leaves_zeros_in_affine_gaps(tmp_path):
    """A uniform grey crop: with --fill black the affine copy's gaps are exactly 0 (the study's
    imgaug default); with --fill border they take the crop's colour, so nothing is darker."""
    img = np.full((40, 30, 3), 200, np.uint8)
    mins = {}
    for fill in ("border", 0):
        lows = []
        for seed in range(8):
            (copy, _, group), = data._augment_job((img, None, 1, [seed, 1], fill, "rgb", 0, None))
            assert group == "affine"
            lows.append(int(copy.min()))
        mins[fill] = lows
    assert min(mins["border"]) == 200                    # border colour = the crop's own grey
    assert min(mins[0]) == 0                             # black gaps appear


def test_augment_at_raw_order_bgr_and_jpeg_are_what_they_claim(tmp_path):
    """Each switch by its definition: raw = augment the decoded crop, then resize every copy;
    bgr = augment the channel-reversed image and reverse back; JPEG = one round trip at the
    given quality after each copy is made."""
    from cervical import augment

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (37, 29, 3), dtype=np.uint8)
    rec = _raw_record(tmp_path, raw)
    entropy = [3, 9]
    got = data._augment_job((rec, None, 3, entropy, "border", "bgr", 90, (16, "stretch", "nearest")))
    ref = augment.augment_copies(raw[..., ::-1].copy(), None, n=3,
                                 seed=np.random.SeedSequence(entropy), fill="border")
    for (img, _, name), (r, _, rname) in zip(got, ref):
        expected = data.jpeg_roundtrip(r[..., ::-1].copy(), 90)
        expected, _ = data.resize_cell(expected, 16, "stretch", "nearest")
        assert name == rname and img.shape == (16, 16, 3)
        np.testing.assert_array_equal(img, expected)
    rgb = data._augment_job((rec, None, 3, entropy, "border", "rgb", 0, (16, "stretch", "nearest")))
    assert not np.array_equal(rgb[1][0], got[1][0])      # clahe_gamma differs in BGR order
    assert not np.array_equal(data.jpeg_roundtrip(raw, 95), raw)


def test_size_analysis_reports_the_studys_swapped_reading():
    """Two clusters of sizes so that the densest bin has different height and width indices:
    ours names the ranges on their own axes, the study printed width_edges[i_h] as 'height' and
    height_edges[i_w] as 'width' (computed here with numpy directly)."""
    widths = [100] * 50 + [60] * 10 + [200]
    heights = [150] * 50 + [60] * 10 + [200]
    sa = data.size_analysis(widths, heights)
    hist, h_edges, w_edges = np.histogram2d(heights, widths, bins=30)
    i_h, i_w = np.unravel_index(int(np.argmax(hist)), hist.shape)
    assert i_h != i_w
    assert sa["densest_bin"]["height_range"][0] == pytest.approx(h_edges[i_h])
    assert sa["densest_bin"]["width_range"][0] == pytest.approx(w_edges[i_w])
    assert sa["study_printed"] == {"height": pytest.approx(w_edges[i_h]),
                                   "width": pytest.approx(h_edges[i_w])}


def test_prepare_variant_thesis_records_the_studys_choices(tmp_path):
    out = data.prepare(dataset="synthetic", out=tmp_path / "p", size=24, augment=1, per_class=6,
                       variant="thesis", split="thesis", save_images=False)
    info = data.read_info(tmp_path / "p")
    assert (info["resize"], info["interpolation"], info["augment_at"], info["fill"],
            info["jpeg_quality"], info["augment_order"], info["variant"]) == (
        "stretch", "nearest", "raw", "black", 95, "bgr", "thesis")
    assert out["split"] == "thesis"
    std = data.prepare(dataset="synthetic", out=tmp_path / "q", size=24, augment=0, per_class=24,
                       save_images=False)
    assert (std["resize"], std["augment_at"], std["fill"], std["jpeg_quality"]) == (
        "pad", "target", "border", 0)
    with pytest.raises(data.DataError, match="--jpeg-quality"):
        data.prepare(dataset="synthetic", out=tmp_path / "r", jpeg_quality=101, per_class=4)


@pytest.mark.parametrize("leak_val", ["grouped", "cells"])
def test_prepare_leak_design_per_fold(tmp_path, leak_val):
    """prepare(leak_cells=1): every fold records its design; a leaked cluster has exactly its one
    moved cell in train and none in val, a held-out cluster none in train or val (its set-aside
    cell is in no split); with leak_val "cells" the validation split shares cluster images with
    train (the study's), with "grouped" it shares none."""
    out = tmp_path / "p"
    data.prepare(dataset="synthetic", out=out, per_class=30, size=16, augment=0, folds=2,
                 leak_cells=1, leak_val=leak_val, save_images=False, seed=3)
    for k in range(2):
        d = out / f"fold_{k}"
        design = data.read_info(d)["leak_design"]
        assert design["validation"] == leak_val and design["moved"] == 1
        rows = data.read_manifest(d)
        by = {}
        for r in rows:
            by.setdefault(r["group"], []).append(r["split"])
        assert design["leaked"] and design["held_out"]
        for g in design["leaked"]:
            assert by[g].count("train") == 1 and "val" not in by[g] and "test" in by[g]
        for g in design["held_out"]:
            assert set(by[g]) == {"test"}
        train_groups = {r["group"] for r in rows if r["split"] == "train"}
        val_groups = {r["group"] for r in rows if r["split"] == "val"}
        assert bool(train_groups & val_groups) == (leak_val == "cells")
        n_all = sum(len(v) for v in by.values())
        assert n_all + design["set_aside_cells"] == 150


def _folders_with_slides(root, n_slides=5, per_slide=3):
    """A folders dataset: classes a and b, each n_slides slides of per_slide cells named
    s<slide>_<cell>.png, and the matching groups.csv (path,group)."""
    from PIL import Image

    rows = ["path,group"]
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for s in range(n_slides):
            for i in range(per_slide):
                name = f"s{s}_{i}.png"
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / name)
                rows.append(f"{c}/{name},slide{s}")
    (root.parent / "groups.csv").write_text("\n".join(rows) + "\n")
    return root.parent / "groups.csv"


def _shared_groups(prepared):
    rows = data.read_manifest(prepared)
    splits = {}
    for r in rows:
        splits.setdefault(r["group"], set()).add(r["split"])
    return sum(1 for s in splits.values() if len(s) > 1)


@pytest.mark.parametrize("how", ["file", "pattern"])
def test_folders_with_groups_split_by_group(tmp_path, how):
    """With --groups FILE.csv (or --group-pattern), no slide is in two splits, dataset.json says
    where the groups came from, and there is no warning."""
    groups = _folders_with_slides(tmp_path / "raw")
    kw = dict(groups=groups) if how == "file" else dict(group_pattern=r"^(s\d+)_")
    s = data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "p", size=16,
                     augment=0, save_images=False, **kw)
    info = data.read_info(tmp_path / "p")
    assert info["groups"] == {"source": how, "n_groups": 10, "n_cells": 30, "cell_level": False}
    assert _shared_groups(tmp_path / "p") == 0
    assert "warnings" not in s


def test_folders_without_groups_warn_that_the_split_is_cell_level(tmp_path):
    _folders_with_slides(tmp_path / "raw")
    s = data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "p", size=16,
                     augment=0, save_images=False)
    assert data.read_info(tmp_path / "p")["groups"]["cell_level"] is True
    assert len(s["warnings"]) == 1 and "cell-level split" in s["warnings"][0]
    assert "warning: no group information" in data.format_summary({**s, "out": "x"})
    from cervical import evaluation

    assert evaluation.protocol_label("grouped", cell_level_groups=True).startswith("cell-level")


def test_groups_file_errors_name_the_file_and_the_fix(tmp_path):
    groups = _folders_with_slides(tmp_path / "raw")
    lines = groups.read_text().splitlines()
    groups.write_text("\n".join(lines[:-1]) + "\n")               # one image unlisted
    with pytest.raises(data.DataError, match="not listed .*give every image a group"):
        data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "p", size=16,
                     augment=0, save_images=False, groups=groups)
    with pytest.raises(data.DataError, match="no match in the file name"):
        data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "q", size=16,
                     augment=0, save_images=False, group_pattern=r"^x(\d)")
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_too_small_for_a_grouped_split_says_what_is_short_and_is_true(tmp_path):
    """2 classes x 6 images: the test split leaves 4 images of a class, too few for the 5-fold
    validation cut; the message names that step, the 4, and the 7 images per class that suffice
    (7 - ceil(7 / 5) = 5 left after the test split). 7 per class then works."""
    from PIL import Image

    for c in "ab":
        (tmp_path / "raw" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(tmp_path / "raw" / c / f"{i}.png")
    with pytest.raises(data.DataError) as err:
        data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "p", size=16,
                     augment=0, save_images=False)
    msg = str(err.value)
    assert "the validation split" in msg and "4 cells in its smallest class" in msg
    assert "at least 7 images per class" in msg
    for c in "ab":
        Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(tmp_path / "raw" / c / "6.png")
    s = data.prepare(dataset="folders", data_dir=tmp_path / "raw", out=tmp_path / "p", size=16,
                     augment=0, save_images=False)
    assert sum(s["totals"].values()) == 14


def test_prepare_says_before_decoding_when_the_disk_will_not_hold_it(tmp_path, monkeypatch):
    """The estimate by hand: 150 cells x 16^2 px x 4 bytes x (1 + 0.64 x 2), once in the row files
    and twice per fold (cache + PNGs; 3 folds), and once per fold without PNGs; with 1 kB free,
    prepare stops in one line naming --out, --size and --augment, and writes nothing."""
    once = 150 * 256 * 4 * (1 + 0.64 * 2)
    assert data.prepare_disk_estimate(150, 16, 2) == pytest.approx(once * 3)
    assert data.prepare_disk_estimate(150, 16, 2, folds=3) == pytest.approx(once * 7)
    assert data.prepare_disk_estimate(150, 16, 2, save_images=False) == pytest.approx(once * 2)
    monkeypatch.setattr(data, "free_disk", lambda folder: 1024.0)
    with pytest.raises(data.DataError, match=r"^--out .*p: preparing 150 cells at --size 16 "
                                             r"--augment 2 writes up to .* GB"):
        data.prepare(dataset="synthetic", out=tmp_path / "p", per_class=30, size=16, augment=2,
                     save_images=False)
    assert not (tmp_path / "p").exists() and not list(tmp_path.iterdir())


def test_prepare_streams_in_windows_with_the_same_bytes_as_one_process(tmp_path):
    """300 cells x 2 copies through two worker processes (windows of 128 jobs, so several
    windows, each queued before the last is drained) give the same cache, manifest and PNGs, byte
    for byte, as one process; the row files of the staging folder are gone afterwards."""
    kw = dict(per_class=60, size=16, augment=2, seed=3)
    data.prepare("synthetic", None, tmp_path / "one", workers=1, **kw)
    data.prepare("synthetic", None, tmp_path / "two", workers=2, **kw)

    def contents(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "dataset.json" and "raw" not in p.parts}

    one, two = contents(tmp_path / "one"), contents(tmp_path / "two")
    assert len(one) > 900 and one.keys() == two.keys() and one == two
    assert not [p for p in (tmp_path / "two").rglob("*.u8")]
    assert data.read_info(tmp_path / "two")["totals"]["train"] == 3 * len(
        [r for r in data.read_manifest(tmp_path / "two")
         if r["split"] == "train" and r["augmented"] == "0"])


