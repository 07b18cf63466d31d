"""Known-answer tests for cervical.augment (offline augmentation, issue 2 item 6)."""

import math

import numpy as np
import pytest

from cervical import augment as A

# ---------------------------------------------------------------------------------------------
# Fixtures: a synthetic "cell" and a bright square
# ---------------------------------------------------------------------------------------------


def _cell(height=48, width=40, seed=0):
    """Light background, pink cytoplasm ellipse, dark nucleus; mask 0/1/2."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    cyto = ((yy - height / 2) / (0.35 * height)) ** 2 + ((xx - width / 2) / (0.35 * width)) ** 2 < 1
    nuc = np.hypot(yy - height / 2, xx - width / 2) < 0.12 * min(height, width)
    img = np.empty((height, width, 3))
    img[:] = (215, 205, 220)
    img[cyto] = (190, 120, 170)
    img[nuc] = (70, 40, 110)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    mask = cyto.astype(np.uint8) + nuc.astype(np.uint8)
    return img, mask


def _square(size=64, lo=20, hi=220, half=14):
    img = np.full((size, size, 3), lo, np.uint8)
    c = size // 2
    img[c - half : c + half, c - half : c + half] = hi
    mask = (img[..., 0] == hi).astype(np.uint8)
    return img, mask


# ---------------------------------------------------------------------------------------------
# API: groups, copies, seeding
# ---------------------------------------------------------------------------------------------


def test_group_names_and_study_order():
    study = ("affine", "clahe_gamma", "edge_blend", "canny_blend", "color", "contrast_multiply")
    assert A.GROUPS[:6] == study
    assert A.GROUPS[6:] == ("noise", "brightness")
    img, mask = _cell()
    names = [g for _, _, g in A.augment_copies(img, mask, n=6, seed=1)]
    assert names == list(A.STUDY_GROUPS)  # one copy per study group, as the study did
    names = [g for _, _, g in A.augment_copies(img, mask, n=10, seed=1)]
    assert names == list(A.GROUPS) + ["affine", "clahe_gamma"]
    names = [g for _, _, g in A.augment_copies(img, None, n=3, seed=1, groups=("color", "noise"))]
    assert names == ["color", "noise", "color"]
    assert A.augment_copies(img, mask, n=0, seed=1) == []


def test_seeded_determinism_and_independence():
    img, mask = _cell()
    a = A.augment_copies(img, mask, n=8, seed=123)
    b = A.augment_copies(img, mask, n=8, seed=123)
    c = A.augment_copies(img, mask, n=8, seed=124)
    for (ia, ma, ga), (ib, mb, gb) in zip(a, b):
        assert ga == gb
        assert np.array_equal(ia, ib) and np.array_equal(ma, mb)
    differs = [not np.array_equal(x[0], y[0]) for x, y in zip(a, c)]
    assert sum(differs) >= 6  # different seed, different copies
    # copy i does not depend on how many copies are made
    short = A.augment_copies(img, mask, n=3, seed=123)
    for (i1, m1, _), (i2, m2, _) in zip(short, a):
        assert np.array_equal(i1, i2) and np.array_equal(m1, m2)
    # a tuple seed and a SeedSequence work, and a passed SeedSequence is not consumed
    ss = np.random.SeedSequence([42, 7])
    first = A.augment_copies(img, mask, n=2, seed=ss)
    second = A.augment_copies(img, mask, n=2, seed=ss)
    via_tuple = A.augment_copies(img, mask, n=2, seed=(42, 7))
    for x, y, z in zip(first, second, via_tuple):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[0], z[0])
    # augment() with equal generators is equal, an int seed is accepted as rng, inputs are untouched
    img_before, mask_before = img.copy(), mask.copy()
    for g in A.GROUPS:
        o1, _ = A.augment(img, mask, g, np.random.default_rng(5))
        o2, _ = A.augment(img, mask, g, 5)
        assert np.array_equal(o1, o2)
    assert np.array_equal(img, img_before) and np.array_equal(mask, mask_before)


@pytest.mark.parametrize("group", A.GROUPS)
def test_every_group_keeps_dtype_and_shape(group):
    img, mask = _cell(height=37, width=52)  # non-square, odd size
    for seed in range(6):
        out, out_mask = A.augment(img, mask, group, np.random.default_rng(seed))
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert out_mask.dtype == mask.dtype and out_mask.shape == mask.shape
        assert set(np.unique(out_mask)) <= {0, 1, 2}
        out2, none_mask = A.augment(img, None, group, np.random.default_rng(seed))
        assert none_mask is None and np.array_equal(out, out2)


@pytest.mark.parametrize("group", [g for g in A.GROUPS if g not in A.GEOMETRIC_GROUPS])
def test_photometric_groups_leave_mask_identical(group):
    img, mask = _cell()
    before = mask.copy()
    for seed in range(5):
        _, out_mask = A.augment(img, mask, group, np.random.default_rng(seed))
        assert np.array_equal(out_mask, before)
        assert out_mask is not mask  # a copy, so callers may modify it
    assert np.array_equal(mask, before)


def test_affine_keeps_mask_aligned_with_image():
    img, mask = _square()
    changed = 0
    for seed in range(25):
        out, out_mask = A.augment(img, mask, "affine", np.random.default_rng(seed))
        bright = out[..., 0] > 120
        inter = np.logical_and(bright, out_mask == 1).sum()
        union = np.logical_or(bright, out_mask == 1).sum()
        assert inter / union > 0.9, f"seed {seed}: IoU {inter / union:.3f}"
        changed += not np.array_equal(out_mask, mask)
        # border fill: the background colour (20) fills the uncovered area, never black
        assert out.min() >= 19
    assert changed >= 15  # the transform actually moved things


def test_affine_matrix_known_points():
    shape = (9, 9)  # centre (4, 4)
    m = A.affine_matrix(shape, scale=(0.5, 0.5))
    assert np.allclose(m @ [0, 0, 1], [2, 2, 1])
    m = A.affine_matrix(shape, rotate=90)  # clockwise on screen: top-right -> bottom-right
    assert np.allclose(m @ [8, 0, 1], [8, 8, 1])
    m = A.affine_matrix(shape, translate=(0.1, -0.2))  # fractions of W, H
    assert np.allclose(m @ [3, 3, 1], [3.9, 1.2, 1])
    m = A.affine_matrix(shape, shear=45)  # x' = x + tan(45) (y - cy)
    assert np.allclose(m @ [4, 8, 1], [8, 8, 1])
    m = A.affine_matrix((5, 7), fliplr=True, flipud=True)
    assert np.allclose(m @ [0, 0, 1], [6, 4, 1])


def test_flips_and_right_angle_rotations_are_exact():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    lab = rng.integers(0, 3, (12, 17), dtype=np.uint8)
    lr = A.affine_matrix(img.shape, fliplr=True)
    ud = A.affine_matrix(img.shape, flipud=True)
    assert np.array_equal(A.warp_affine(img, lr), np.fliplr(img))
    assert np.array_equal(A.warp_affine(lab, lr, order=0), np.fliplr(lab))
    assert np.array_equal(A.warp_affine(img, ud), np.flipud(img))
    assert np.array_equal(A.warp_affine(img, lr @ ud), img[::-1, ::-1])
    sq = rng.integers(0, 256, (15, 15, 3), dtype=np.uint8)
    assert np.array_equal(A.warp_affine(sq, A.affine_matrix(sq.shape, rotate=90)), np.rot90(sq, k=-1))
    assert np.array_equal(A.warp_affine(sq, A.affine_matrix(sq.shape, rotate=-90)), np.rot90(sq, k=1))


def test_rotation_by_90_via_interpolation_matches_rot90():
    # 90 degrees plus a hair: the general bilinear path, equal to rot90 up to rounding
    sq = np.random.default_rng(1).integers(0, 256, (21, 21, 3), dtype=np.uint8)
    out = A.warp_affine(sq, A.affine_matrix(sq.shape, rotate=90.0001))
    diff = np.abs(out.astype(int) - np.rot90(sq, k=-1).astype(int))
    assert diff[1:-1, 1:-1].max() <= 1


def test_bilinear_half_pixel_shift_of_a_ramp():
    width = 16
    ramp = np.tile((10 * np.arange(width)).astype(np.uint8)[None, :, None], (5, 1, 3))
    m = A.affine_matrix(ramp.shape, translate=(0.5 / width, 0.0))  # +0.5 px to the right
    out = A.warp_affine(ramp, m, order=1, fill=0)
    expected = 10 * np.arange(1, width) - 5  # I(x - 0.5), by hand
    assert np.array_equal(out[:, 1:, 0], np.tile(expected, (5, 1)))


def test_fill_modes():
    img, mask = _cell(height=30, width=30)
    m = A.affine_matrix(img.shape, scale=(0.5, 0.5))
    border = A.border_colour(img)
    out = A.warp_affine(img, m, fill="border")
    assert np.array_equal(out[0, 0], np.rint(border).astype(np.uint8))
    out = A.warp_affine(img, m, fill=(1, 2, 3))
    assert np.array_equal(out[0, 0], [1, 2, 3])
    assert A.warp_affine(mask, m, order=0, fill="border")[0, 0] == 0  # background label
    for fill in [(255, 255, 255), 7, "edge", "reflect"]:  # any image fill; labels stay labels
        out, out_mask = A.augment(img, mask, "affine", np.random.default_rng(3), fill=fill)
        assert set(np.unique(out_mask)) <= {0, 1, 2}
    uncovered = 0
    for seed in range(10):  # the red fill of the image and the 0 fill of the labels coincide
        out, out_mask = A.augment(np.full_like(img, 40), np.ones_like(mask), "affine", seed, fill=(255, 0, 0))
        reddish = (out[..., 0] > 147) & (out[..., 1] < 20)
        assert np.mean(reddish == (out_mask == 0)) > 0.95
        uncovered += int((out_mask == 0).sum())
    assert uncovered > 0
    ones = np.ones((30, 30), np.uint8)
    assert A.warp_affine(ones, m, order=0, fill="reflect").min() == 1  # mirrored, no fill
    assert A.warp_affine(ones, m, order=0, fill="border")[0].max() == 0


@pytest.mark.parametrize("mode", ["reflect", "symmetric", "wrap", "edge"])
def test_index_folding_matches_numpy_pad(mode):
    n = 5
    idx = np.arange(-12, 17)
    padded = np.pad(np.arange(n), 12, mode=mode)
    assert np.array_equal(A._fold_index(idx, n, mode), padded[idx + 12])


def test_border_colour_is_median_of_outer_ring():
    img = np.zeros((4, 5, 3), np.uint8)
    img[1:3, 1:4] = 250  # interior does not count
    img[0, :] = 10
    img[-1, :] = 30
    img[1:3, 0] = 10
    img[1:3, -1] = 30  # ring: 7 x 10 and 7 x 30 -> median 20
    assert np.array_equal(A.border_colour(img), [20.0, 20.0, 20.0])


# ---------------------------------------------------------------------------------------------
# Contrast
# ---------------------------------------------------------------------------------------------


def test_gamma_known_values():
    img = np.array([[[0, 128, 255]]], np.uint8)
    assert np.array_equal(A.gamma_contrast(img, 1.0), img)
    assert np.array_equal(A.gamma_contrast(img, 2.0), [[[0, 64, 255]]])  # 128^2/255 = 64.25


def test_clahe_constant_image_hand_computed():
    # one tile, N = 256 pixels of value 100, clip 4: limit L = 4, excess E = 252 -> r = 252, s = 1,
    # cdf(100) = 4 + min(252, 101) = 105, m(100) = round(105 * 255 / 256) = 105
    img = np.full((16, 16, 3), 100, np.uint8)
    out = A.clahe(img, clip_limit=4.0, tiles=(1, 1), on="all")
    assert np.all(out == 105)


def test_clahe_without_clipping_is_histogram_equalisation():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = A.clahe(img, clip_limit=0.0, tiles=(1, 1), on="all")
    for c in range(3):
        flat = img[..., c].ravel().astype(int)
        below = (flat[None, :] <= flat[:, None]).sum(axis=1)  # cdf at each pixel's value
        expected = np.rint(np.float32(below) * np.float32(255.0 / flat.size)).astype(np.uint8)
        assert np.array_equal(out[..., c].ravel(), expected)


def _clahe_reference(channel, clip_limit, tiles):
    """Plain-loop CLAHE with OpenCV's rules, written independently of the vectorised version."""
    h, w = channel.shape
    ty, tx = tiles
    ph, pw = h + (-h) % ty, w + (-w) % tx
    padded = np.pad(channel, ((0, ph - h), (0, pw - w)), mode="reflect")
    th, tw = ph // ty, pw // tx
    n = th * tw
    luts = np.zeros((ty, tx, 256))
    for i in range(ty):
        for j in range(tx):
            hist = np.bincount(padded[i * th : (i + 1) * th, j * tw : (j + 1) * tw].ravel(), minlength=256)
            if clip_limit > 0:
                limit = max(int(clip_limit * n / 256), 1)
                excess = int(np.maximum(hist - limit, 0).sum())
                hist = np.minimum(hist, limit) + excess // 256
                residual = excess % 256
                step = max(256 // residual, 1) if residual else 1
                k = 0
                while k < 256 and residual > 0:
                    hist[k] += 1
                    k += step
                    residual -= 1
            luts[i, j] = np.rint(np.float32(np.cumsum(hist)) * np.float32(255.0 / n))
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        fy = y / th - 0.5
        y0 = math.floor(fy)
        ay = fy - y0
        y1, y0 = min(y0 + 1, ty - 1), max(y0, 0)
        for x in range(w):
            fx = x / tw - 0.5
            x0 = math.floor(fx)
            ax = fx - x0
            x1, x0 = min(x0 + 1, tx - 1), max(x0, 0)
            v = channel[y, x]
            top = luts[y0, x0, v] * (1 - ax) + luts[y0, x1, v] * ax
            bot = luts[y1, x0, v] * (1 - ax) + luts[y1, x1, v] * ax
            out[y, x] = np.clip(np.rint(top * (1 - ay) + bot * ay), 0, 255)
    return out


@pytest.mark.parametrize("clip_limit, tiles", [(2.0, (3, 2)), (8.0, (4, 5)), (0.1, (7, 3)), (40.0, (2, 2))])
def test_clahe_matches_plain_loop_reference(clip_limit, tiles):
    rng = np.random.default_rng(7)
    ch = np.clip(rng.normal(120, 40, (23, 19)), 0, 255).astype(np.uint8)
    img = np.repeat(ch[..., None], 3, axis=-1)
    out = A.clahe(img, clip_limit, tiles, on="all")
    assert np.array_equal(out[..., 0], _clahe_reference(ch, clip_limit, tiles))


def test_clahe_luminance_keeps_gray_gray_and_raises_contrast():
    rng = np.random.default_rng(2)
    ch = np.clip(rng.normal(128, 10, (40, 40)), 0, 255).astype(np.uint8)
    img = np.repeat(ch[..., None], 3, axis=-1)
    out = A.clahe(img, 4.0, (4, 4), on="luminance")
    spread = out.astype(int).max(axis=-1) - out.astype(int).min(axis=-1)
    assert spread.max() <= 1  # no chroma introduced
    assert out[..., 0].std() > 1.5 * ch.std()


def test_linear_contrast_and_multiply_known_values():
    img = np.array([[[0, 100, 200]]], np.uint8)
    assert np.array_equal(A.linear_contrast(img, 1.0), img)
    assert np.array_equal(A.linear_contrast(img, 0.0), [[[128, 128, 128]]])  # rint(127.5) = 128
    assert np.array_equal(A.linear_contrast(img, 1.5), [[[0, 86, 236]]])  # 127.5 + 1.5 (I - 127.5)
    assert np.array_equal(A.multiply(img, 2.0), [[[0, 200, 255]]])
    assert np.array_equal(A.multiply(img, [1.0, 0.5, 0.25]), [[[0, 50, 50]]])


def test_noise_and_brightness():
    img, _ = _cell()
    rng = np.random.default_rng(0)
    assert np.array_equal(A.gaussian_noise(img, 0.0, rng), img)
    mid = np.full((64, 64, 3), 128, np.uint8)
    noisy = A.gaussian_noise(mid, 10.0, rng).astype(float)
    assert abs(noisy.mean() - 128) < 0.5 and 9.0 < noisy.std() < 11.0
    assert np.array_equal(A.add_brightness(np.array([[[10, 100, 250]]], np.uint8), 30), [[[40, 130, 255]]])


# ---------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------


def test_edge_kernels_known_values():
    assert np.array_equal(A.edge_kernel(0.0), A._IDENTITY3)
    assert np.allclose(A.edge_kernel(1.0), [[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    # direction 0 (up), alpha 1: neighbour weights (1 - angle/180deg)^4 = 1 (top), 0.75^4 (top
    # corners), 0.5^4 (sides), 0.25^4 (bottom corners), 0 (bottom); normalised and negated.
    w = {"t": 1.0, "tc": 0.75**4, "s": 0.5**4, "bc": 0.25**4}
    total = w["t"] + 2 * (w["tc"] + w["s"] + w["bc"])
    expected = -np.array([[w["tc"], w["t"], w["tc"]], [w["s"], 0, w["s"]], [w["bc"], 0, w["bc"]]]) / total
    expected[1, 1] = 1.0
    assert np.allclose(A.directed_edge_kernel(1.0, 0.0), expected)
    # strongest (most negative) neighbour follows the direction, clockwise from the top
    for direction, cell in [(0.0, (0, 1)), (0.25, (1, 2)), (0.5, (2, 1)), (0.75, (1, 0))]:
        k = A.directed_edge_kernel(1.0, direction)
        assert np.unravel_index(np.argmin(k), k.shape) == cell
        assert math.isclose(k.sum(), 0.0, abs_tol=1e-12)
    assert math.isclose(A.directed_edge_kernel(0.3, 0.1).sum(), 0.7)


def test_correlate3x3_impulse_and_flat():
    img = np.zeros((7, 7, 3), np.uint8)
    img[3, 3] = 10
    kernel = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    out = A.correlate3x3(img, kernel)
    # correlation of an impulse is the kernel flipped in both axes, times the impulse value
    assert np.array_equal(out[2:5, 2:5, 0], 10 * kernel[::-1, ::-1])
    assert out[0, 0, 0] == 0
    flat = np.full((6, 6, 3), 90, np.uint8)
    assert np.all(A.correlate3x3(flat, A.edge_kernel(1.0)) == 0)  # Laplacian of a constant
    assert np.all(A.correlate3x3(flat, A.edge_kernel(0.5)) == 45)  # (1 - alpha) * I on flat areas
    assert np.array_equal(A.correlate3x3(flat, A.edge_kernel(0.0)), flat)


@pytest.mark.parametrize("sobel", [3, 5, 7])
def test_canny_finds_the_square_outline(sobel):
    img, mask = _square(size=48, half=12)
    edges = A.canny_edges(img, 100, 200, sobel)
    inner = mask.astype(bool)
    # outline = pixels of the square touching the outside, or outside touching the square
    grown = np.zeros_like(inner)
    grown[1:-1, 1:-1] = inner[:-2, 1:-1] | inner[2:, 1:-1] | inner[1:-1, :-2] | inner[1:-1, 2:]
    shrunk = inner.copy()
    shrunk[1:-1, 1:-1] = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    outline = (grown | inner) & ~shrunk
    near = outline.copy()
    near[1:-1, 1:-1] |= outline[:-2, 1:-1] | outline[2:, 1:-1] | outline[1:-1, :-2] | outline[1:-1, 2:]
    assert edges.any()
    assert not np.any(edges & ~near)  # no edge away from the outline
    assert edges[12:36, 11:14].any(axis=1).mean() > 0.9  # the left side is traced along its length


def test_blend_known_values():
    bg = np.full((2, 2, 3), 100, np.uint8)
    assert np.all(A.blend(np.full((2, 2, 3), 200), bg, 0.25) == 125)
    assert np.array_equal(A.blend(np.zeros((2, 2, 3)), bg, 0.0), bg)


# ---------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------


def test_grayscale_equal_channels_and_bt601_values():
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    out = A.grayscale(img)
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])
    # 0.299 * 255 = 76.2, 0.587 * 255 = 149.7, 0.114 * 255 = 29.1, 2.99 + 11.74 + 3.42 = 18.15
    assert np.array_equal(out[0, :, 0], [76, 150, 29, 18])


def test_channel_shuffle_is_a_permutation():
    img, _ = _cell()
    out = A.channel_shuffle(img, [2, 0, 1])
    assert np.array_equal(out, img[..., [2, 0, 1]])
    assert np.array_equal(np.sort(out, axis=-1), np.sort(img, axis=-1))
    with pytest.raises(A.AugmentationError, match="permutation"):
        A.channel_shuffle(img, [0, 0, 1])


def test_hue_and_saturation_known_values():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 255
    # imgaug units: 255 = one full turn, so 85 = 120 degrees: red -> green
    assert np.array_equal(A.add_hue_saturation(red, 85, 0)[0, 0], [0, 255, 0])
    assert np.array_equal(A.add_hue_saturation(red, 255, 0), red)  # full turn
    gray = A.add_hue_saturation(red, 0, -255)  # saturation removed: V stays, all channels = 255
    assert np.all(gray == 255)
    img, _ = _cell()
    assert np.abs(A.multiply_hue_saturation(img, 1.0, 1.0).astype(int) - img).max() <= 1
    assert np.abs(A.add_hue_saturation(img, 0, 0).astype(int) - img).max() <= 1
    desat = A.multiply_hue_saturation(img, 1.0, 0.0)
    assert np.all(desat.max(axis=-1) == desat.min(axis=-1))


@pytest.mark.parametrize("k", [4, 9, 16])
def test_kmeans_quantisation_at_most_k_colours(k):
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = A.kmeans_quantize(img, k, np.random.default_rng(1))
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= k
    # every pixel takes its nearest palette colour: no pixel is closer to another palette colour
    palette = np.unique(out.reshape(-1, 3), axis=0).astype(float)
    d = ((img.reshape(-1, 1, 3).astype(float) - palette[None]) ** 2).sum(-1)
    own = ((img.reshape(-1, 3).astype(float) - out.reshape(-1, 3)) ** 2).sum(-1)
    assert np.all(own <= d.min(axis=1))


def test_kmeans_recovers_three_flat_colours_exactly():
    img = np.zeros((30, 30, 3), np.uint8)
    img[:, :10] = (200, 30, 40)
    img[:, 10:20] = (20, 180, 60)
    img[:, 20:] = (90, 90, 250)
    out = A.kmeans_quantize(img, 3, np.random.default_rng(0))
    assert np.array_equal(out, img)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_one_line_value_errors():
    img, mask = _cell()
    rng = np.random.default_rng(0)
    cases = [
        (lambda: A.augment(img.astype(float), None, "affine", rng), "image"),
        (lambda: A.augment(img[..., 0], None, "affine", rng), "image"),
        (lambda: A.augment(img, mask[:-1], "affine", rng), "mask"),
        (lambda: A.augment(img, mask.astype(float), "affine", rng), "mask"),
        (lambda: A.augment(img, mask, "sharpen", rng), "group"),
        (lambda: A.augment(img, mask, 99, rng), "group"),
        (lambda: A.augment(img, mask, "affine", None), "rng"),
        (lambda: A.augment(img, mask, "affine", rng, fill="nope"), "fill"),
        (lambda: A.augment(img, mask, "affine", rng, fill=(1, 2)), "fill"),
        (lambda: A.augment_copies(img, mask, n=-1), "n must"),
        (lambda: A.augment_copies(img, mask, n=2, seed=-3), "seed"),
        (lambda: A.augment_copies(img, mask, n=2, seed="abc"), "seed"),
        (lambda: A.augment_copies(img, mask, n=2, groups=()), "groups"),
        (lambda: A.canny_edges(img, 10, 20, 4), "sobel_size"),
        (lambda: A.clahe(img, 2.0, (0, 3)), "tiles"),
        (lambda: A.warp_affine(img, np.eye(3), order=3), "order"),
        (lambda: A.warp_affine(img, np.zeros((3, 3))), "matrix"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert isinstance(info.value, A.AugmentationError)
        message = str(info.value)
        assert word in message and "\n" not in message
