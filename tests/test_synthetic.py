"""Known-answer tests for the synthetic SIPaKMeD-like generator (cervical.synthetic).

Expected values are derived by hand from the generator's specification (formulas in the
docstrings, class ranges in CLASS_SPECS), never copied from a run.
"""

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cervical import synthetic as S

STEM = re.compile(r"^(\d{3})_(\d{2})$")
DAT_LINE = re.compile(r"^-?\d+\.\d{2},-?\d+\.\d{2}$")


def shoelace(poly):
    """Polygon area, plain NumPy reference: 0.5 |sum x_i y_{i+1} - x_{i+1} y_i|."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def cropped(root, cls):
    return Path(root) / f"im_{cls}" / f"im_{cls}" / "CROPPED"


def tree_digest(root):
    """{relative path: sha256} of every file under root."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """12 cells per class with the default cluster counts."""
    out = tmp_path_factory.mktemp("syn") / "sipakmed"
    return out, S.generate(out, per_class=12, seed=0)


# ------------------------------------------------------------------------------------------------
# Layout, naming, file formats
# ------------------------------------------------------------------------------------------------

def test_layout_and_naming(small):
    out, summary = small
    # default_clusters: round(12 * FULL_CLUSTERS / FULL_COUNTS), at least 3, by hand:
    # 12*223/813 = 3.29 -> 3, 12*238/825 = 3.46 -> 3, 12*271/793 = 4.10 -> 4,
    # 12*108/787 = 1.65 -> 2 -> 3, 12*126/831 = 1.82 -> 2 -> 3.
    expected_clusters = {"Dyskeratotic": 3, "Koilocytotic": 3, "Metaplastic": 4, "Parabasal": 3,
                         "Superficial-Intermediate": 3}
    assert summary["counts"] == {c: 12 for c in S.CLASSES}
    assert summary["clusters"] == expected_clusters
    assert summary["n_cells"] == 60 and summary["n_clusters"] == 16
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"im_{c}" for c in S.CLASSES] + ["synthetic.json"])
    for cls in S.CLASSES:
        folder = cropped(out, cls)
        bmps = sorted(folder.glob("*.bmp"))
        assert len(bmps) == 12
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{b.stem}{suffix}" for b in bmps for suffix in (".bmp", "_nuc.dat", "_cyt.dat"))
        per_cluster = {}
        for b in bmps:
            m = STEM.match(b.stem)
            assert m, b.name
            per_cluster.setdefault(int(m.group(1)), []).append(int(m.group(2)))
        # Clusters numbered 1..k, cells within each numbered 1..m, as in SIPaKMeD.
        assert sorted(per_cluster) == list(range(1, expected_clusters[cls] + 1))
        for cells in per_cluster.values():
            assert sorted(cells) == list(range(1, len(cells) + 1))


def test_bmp_is_24bit_rgb_within_size_range(small):
    out, _ = small
    for cls in S.CLASSES:
        for b in cropped(out, cls).glob("*.bmp"):
            raw = b.read_bytes()
            assert raw[:2] == b"BM"
            assert int.from_bytes(raw[28:30], "little") == 24       # bits per pixel
            with Image.open(b) as im:
                assert im.mode == "RGB"
                # The longer side is drawn within size_range (60, 160) and rendered exactly.
                assert 60 <= max(im.size) <= 160


def test_dat_files_parse_and_lie_within_the_crop(small):
    out, _ = small
    for cls in S.CLASSES:
        for b in cropped(out, cls).glob("*.bmp"):
            w, h = Image.open(b).size
            for kind in ("nuc", "cyt"):
                path = b.with_name(f"{b.stem}_{kind}.dat")
                lines = path.read_text().splitlines()
                assert all(DAT_LINE.match(line) for line in lines), path
                poly = np.loadtxt(path, delimiter=",", ndmin=2)
                assert poly.shape[1] == 2 and poly.shape[0] >= 3
                assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= w - 1
                assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= h - 1


def test_format_dat_known_text():
    assert S.format_dat(np.array([[45.5, 12.25], [3.0, 0.125]])) == "45.50,12.25\n3.00,0.12\n"


def test_reader_reads_the_output(small):
    out, summary = small
    from cervical import data

    records = data.read_sipakmed(out)
    assert len(records) == summary["n_cells"]
    assert len({r.group for r in records}) == summary["n_clusters"]
    assert all(r.nucleus is not None and r.cytoplasm is not None for r in records)


# ------------------------------------------------------------------------------------------------
# Morphology
# ------------------------------------------------------------------------------------------------

def test_nucleus_inside_cell_and_smaller(small):
    from skimage.measure import points_in_poly

    out, _ = small
    for cls in S.CLASSES:
        for b in cropped(out, cls).glob("*.bmp"):
            nuc = np.loadtxt(b.with_name(f"{b.stem}_nuc.dat"), delimiter=",")
            cyt = np.loadtxt(b.with_name(f"{b.stem}_cyt.dat"), delimiter=",")
            assert shoelace(nuc) < shoelace(cyt)
            assert np.all(nuc.min(0) >= cyt.min(0)) and np.all(nuc.max(0) <= cyt.max(0))
            # Stronger: every nucleus vertex inside the cell outline.
            assert points_in_poly(nuc, cyt).all(), b.name


def test_nucleus_cytoplasm_ratio_orders_classes(small):
    out, _ = small
    ratio = {}
    for cls in S.CLASSES:
        r = [shoelace(np.loadtxt(b.with_name(f"{b.stem}_nuc.dat"), delimiter=","))
             / shoelace(np.loadtxt(b.with_name(f"{b.stem}_cyt.dat"), delimiter=","))
             for b in cropped(out, cls).glob("*.bmp")]
        ratio[cls] = float(np.mean(r))
    assert max(ratio, key=ratio.get) == "Parabasal"
    assert min(ratio, key=ratio.get) == "Superficial-Intermediate"
    # Parabasal nc_ratio (equal-area radius ratio) is drawn in [0.39, 0.50] and multiplied by the
    # cluster's nucleus_scale in [0.93, 1.07], so the area ratio lies in
    # [(0.39 * 0.93)^2, (0.50 * 1.07)^2] = [0.132, 0.286] (lower only if a nucleus had to shrink).
    assert 0.12 <= ratio["Parabasal"] <= 0.286
    # Superficial-intermediate: at most (0.15 * 1.07)^2 = 0.0258.
    assert ratio["Superficial-Intermediate"] <= 0.0258


# ------------------------------------------------------------------------------------------------
# Determinism and cluster structure
# ------------------------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    counts = {"Parabasal": 3, "Koilocytotic": 2}
    a = tree_digest(S.generate(tmp_path / "a", per_class=counts, seed=7)["out_dir"])
    b = tree_digest(S.generate(tmp_path / "b", per_class=counts, seed=7)["out_dir"])
    c = tree_digest(S.generate(tmp_path / "c", per_class=counts, seed=8)["out_dir"])
    assert a == b
    assert len(a) == 3 * 5 + 1
    assert set(c) == set(a)                    # one cluster per class either way: same names
    assert all(a[k] != c[k] for k in a if k.endswith(".bmp"))


def test_a_cell_depends_only_on_seed_class_cluster_cell(tmp_path):
    """Asking for more cells or more classes keeps the bytes of every existing NNN_MM file."""
    first = S.generate(tmp_path / "a", per_class={"Metaplastic": 4}, clusters_per_class=1)
    more = S.generate(tmp_path / "b", per_class={"Metaplastic": 7, "Dyskeratotic": 3},
                      clusters_per_class={"Metaplastic": 1})
    a, b = tree_digest(first["out_dir"]), tree_digest(more["out_dir"])
    shared = [k for k in a if k.startswith("im_")]
    assert len(shared) == 4 * 3
    assert all(a[k] == b[k] for k in shared)


def test_cells_of_a_cluster_share_stain(tmp_path):
    """Background colour varies much less within a cluster image than between cluster images.

    By construction the illumination differs between clusters by a tint of sd 5 % per channel and a
    brightness factor uniform in [0.8, 1.0] (sd 5.8 %), and within a cluster only by a 1.5 % jitter:
    the variance ratio is about (0.05^2 + 0.058^2) / 0.015^2 = 26, so 4 is a safe bound.
    """
    from skimage.draw import polygon

    stems = {"Superficial-Intermediate": [f"{i:03d}_{j:02d}" for i in range(1, 7)
                                          for j in range(1, 5)]}
    out = Path(S.generate(tmp_path / "s", stems=stems, seed=3)["out_dir"])
    means = {}
    for b in sorted(cropped(out, "Superficial-Intermediate").glob("*.bmp")):
        img = np.asarray(Image.open(b), dtype=np.float64)
        cyt = np.loadtxt(b.with_name(f"{b.stem}_cyt.dat"), delimiter=",")
        inside = np.zeros(img.shape[:2], bool)
        rr, cc = polygon(cyt[:, 1], cyt[:, 0], inside.shape)
        inside[rr, cc] = True
        means.setdefault(b.stem[:3], []).append(np.median(img[~inside], axis=0))
    groups = [np.array(v) for v in means.values()]
    assert len(groups) == 6 and all(len(g) == 4 for g in groups)
    within = np.mean([g.var(axis=0, ddof=1).sum() for g in groups])
    between = np.array([g.mean(axis=0) for g in groups]).var(axis=0, ddof=1).sum()
    assert within * 4 < between


def test_stems_reproduce_exact_file_names(tmp_path):
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("split,class,stem\ntrain,Parabasal,002_03\ntest,Parabasal,002_01\n"
                        "val,Dyskeratotic,010_01\n")
    stems = S.stems_from_csv(csv_path)
    assert stems == {"Parabasal": ["002_03", "002_01"], "Dyskeratotic": ["010_01"]}
    out = Path(S.generate(tmp_path / "o", stems=stems)["out_dir"])
    assert sorted(p.name for p in cropped(out, "Parabasal").glob("*.bmp")) == ["002_01.bmp",
                                                                              "002_03.bmp"]
    assert [p.name for p in cropped(out, "Dyskeratotic").glob("*.bmp")] == ["010_01.bmp"]


def test_stems_of_the_study_split_give_the_real_sipakmed_structure():
    """The shipped study split lists every SIPaKMeD cell: 4049 stems in 966 cluster images."""
    csv_path = Path(__file__).resolve().parents[1] / "data" / "splits" / "thesis_split.csv"
    layout = S.plan_layout(stems=S.stems_from_csv(csv_path))
    assert {c: len(v) for c, v in layout.items()} == dict(S.FULL_COUNTS)
    assert {c: len({nnn for nnn, _ in v}) for c, v in layout.items()} == dict(S.FULL_CLUSTERS)


# ------------------------------------------------------------------------------------------------
# Counts
# ------------------------------------------------------------------------------------------------

def test_full_counts_and_default_clusters():
    assert sum(S.FULL_COUNTS.values()) == 4049
    assert sum(S.FULL_CLUSTERS.values()) == 966
    # k = round(n * K/N) with n = N gives K exactly.
    assert {c: S.default_clusters(S.FULL_COUNTS[c], c) for c in S.CLASSES} == S.FULL_CLUSTERS
    # Small classes: at least 3 clusters when there are 3 cells, never more clusters than cells.
    assert [S.default_clusters(n, "Parabasal") for n in (1, 2, 3, 10)] == [1, 2, 3, 3]


def test_full_counts_scaled_down(tmp_path):
    counts = {c: n // 50 for c, n in S.FULL_COUNTS.items()}       # 16, 16, 15, 15, 16
    summary = S.generate(tmp_path / "f", per_class=counts, seed=1, size_range=(24, 40))
    assert summary["counts"] == {"Dyskeratotic": 16, "Koilocytotic": 16, "Metaplastic": 15,
                                 "Parabasal": 15, "Superficial-Intermediate": 16}
    # By hand: 16*223/813 = 4.39 -> 4, 16*238/825 = 4.62 -> 5, 15*271/793 = 5.13 -> 5,
    # 15*108/787 = 2.06 -> 2 -> 3 (the minimum), 16*126/831 = 2.43 -> 2 -> 3.
    assert summary["clusters"] == {"Dyskeratotic": 4, "Koilocytotic": 5, "Metaplastic": 5,
                                   "Parabasal": 3, "Superficial-Intermediate": 3}
    out = Path(summary["out_dir"])
    for cls, n in counts.items():
        files = list(cropped(out, cls).glob("*.bmp"))
        assert len(files) == n
        assert len({f.stem[:3] for f in files}) == summary["clusters"][cls]
        assert all(24 <= max(Image.open(f).size) <= 40 for f in files)


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (787, 108), (40, 5)])
def test_cluster_sizes_partition(n, k):
    sizes = S.cluster_sizes(n, k, np.random.default_rng(0))
    cap = max(8, math.ceil(2 * n / k))
    assert sizes.shape == (k,) and sizes.sum() == n
    assert sizes.min() >= 1 and sizes.max() <= cap


def test_cluster_sizes_impossible():
    with pytest.raises(S.SyntheticError, match="clusters_per_class"):
        S.cluster_sizes(3, 4, np.random.default_rng(0))
    with pytest.raises(S.SyntheticError, match="clusters_per_class"):
        S.cluster_sizes(20, 2, np.random.default_rng(0), max_per_cluster=8)


# ------------------------------------------------------------------------------------------------
# Geometry helpers (known answers)
# ------------------------------------------------------------------------------------------------

def test_ellipse_radii_axes():
    r = S.ellipse_radii(0.5, 0.0)
    quarter = S.N_ANGLES // 4
    assert r[0] == pytest.approx(1.0) and r[quarter] == pytest.approx(0.5)
    assert r[2 * quarter] == pytest.approx(1.0)


@pytest.mark.parametrize("make", [
    lambda rng: S.smooth_radii(rng, 0.7, 0.1),
    lambda rng: S.polygon_radii(rng, 0.7, 0.15),
    lambda rng: S.add_processes(rng, S.smooth_radii(rng, 0.9, 0.05), 2),
])
def test_shapes_have_unit_equal_area_radius(make):
    # Area pi * r_eq^2 with r_eq = 1; the 256-gon through the outline loses < 0.5 %.
    shape = S.Shape(0.0, 0.0, make(np.random.default_rng(5)))
    assert shoelace(shape.vertices()) == pytest.approx(math.pi, rel=5e-3)


def test_signed_distance_of_a_circle():
    circle = S.Shape(10.0, 20.0, np.full(S.N_ANGLES, 5.0))
    x, y = np.array([10.0, 13.0, 10.0, 30.0]), np.array([20.0, 20.0, 26.0, 20.0])
    d = circle.signed_distance(x, y)
    np.testing.assert_allclose(d, [5.0, 2.0, -1.0, -15.0])


def test_outline_of_a_disc_and_of_a_cut_disc():
    y, x = np.mgrid[0:40, 0:50].astype(float)
    poly = S.outline(S.Shape(25.0, 20.0, np.full(S.N_ANGLES, 10.0)).signed_distance(x, y))
    assert shoelace(poly) == pytest.approx(math.pi * 100, rel=0.02)
    assert np.hypot(poly[:, 0] - 25, poly[:, 1] - 20) == pytest.approx(10.0, abs=0.1)
    # A disc centred on the left edge: the contour closes along x = 0, half the area remains.
    cut = S.outline(S.Shape(0.0, 20.0, np.full(S.N_ANGLES, 10.0)).signed_distance(x, y))
    assert cut[:, 0].min() == 0.0
    assert shoelace(cut) == pytest.approx(math.pi * 50, rel=0.05)


def test_render_cell_is_pure():
    stain = S.sample_stain(np.random.default_rng(1))
    a = S.render_cell("Koilocytotic", np.random.default_rng(2), stain, 90)
    b = S.render_cell("Koilocytotic", np.random.default_rng(2), stain, 90)
    assert a[0].dtype == np.uint8 and a[0].ndim == 3 and max(a[0].shape[:2]) == 90
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# ------------------------------------------------------------------------------------------------
# Bad input, atomic writes, progress
# ------------------------------------------------------------------------------------------------

def test_refuses_non_empty_out_dir_and_overwrites_on_request(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(S.SyntheticError, match="overwrite") as err:
        S.generate(out, per_class=1)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]       # no staging leftovers
    S.generate(out, per_class={"Parabasal": 1}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["im_Parabasal", "synthetic.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_existing_empty_out_dir_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    S.generate(out, per_class={"Metaplastic": 1})
    assert (cropped(out, "Metaplastic") / "001_01.bmp").is_file()


@pytest.mark.parametrize("kwargs,flag", [
    (dict(per_class=0), "per_class"),
    (dict(per_class=-1), "per_class"),
    (dict(per_class={"Normal": 3}), "per_class"),
    (dict(per_class=2.5), "per_class"),
    (dict(per_class=5, clusters_per_class=6), "clusters_per_class"),
    (dict(per_class=5, seed=-1), "seed"),
    (dict(per_class=5, size_range=(4, 10)), "size_range"),
    (dict(per_class=5, size_range=(100, 50)), "size_range"),
    (dict(stems={"Parabasal": ["1-2"]}), "stems"),
])
def test_bad_arguments(tmp_path, kwargs, flag):
    with pytest.raises(S.SyntheticError, match=flag):
        S.generate(tmp_path / "bad", **kwargs)
    assert not any(tmp_path.iterdir())


def test_progress_callable(tmp_path):
    calls = []
    S.generate(tmp_path / "p", per_class={"Parabasal": 3},
               progress=lambda step, done, total: calls.append((done, total)))
    assert calls[-1] == (3, 3) and all(t == 3 for _, t in calls)


def test_phenotype_spec_known_sub_ranges():
    """nc_ratio (0.2, 0.4), share 0.6: width 0.2, sub-width 0.08; u = 0 gives (0.2, 0.28), u = 1
    gives (0.32, 0.4), u = 0.5 the middle (0.26, 0.34). Ranges not named stay as they were."""
    spec = S.CLASS_SPECS["Parabasal"]
    spec = __import__("dataclasses").replace(spec, nc_ratio=(0.2, 0.4))
    for u, want in ((0.0, (0.2, 0.28)), (1.0, (0.32, 0.4)), (0.5, (0.26, 0.34))):
        out = S.phenotype_spec(spec, S.Phenotype({"nc_ratio": u}), 0.6)
        assert out.nc_ratio == pytest.approx(want)
        assert out.nuc_density == spec.nuc_density


def test_phenotype_only_in_the_hard_setting_and_per_cluster():
    """default and hard-uniform draw none; hard draws one position per morphology range and,
    with probability p_atypical, one neighbouring class for the whole cluster image."""
    rng = np.random.default_rng(0)
    for name in ("default", "hard-uniform"):
        assert S.sample_phenotype(rng, "Koilocytotic", S.DIFFICULTIES[name]) is None
    hard = S.DIFFICULTIES["hard"]
    draws = [S.sample_phenotype(np.random.default_rng([1, i]), "Koilocytotic", hard)
             for i in range(400)]
    assert all(set(d.position) == set(S._RANGE_LIMITS) for d in draws)
    atypical = [d.atypical_as for d in draws if d.atypical_as]
    assert set(atypical) <= set(S.NEIGHBOURS["Koilocytotic"])
    assert abs(len(atypical) / 400 - hard.p_atypical) < 0.06      # 3 binomial sd at n = 400
