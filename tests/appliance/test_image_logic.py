"""Pure image and decision logic: tissue, patches, top-k MIL, metrics."""

import numpy as np
import pytest

from appliance.model.metrics import binary_metrics, roc_auc, top_k_mean
from appliance.pipeline.mil import TopKMean
from appliance.pipeline.patches import pad_to
from appliance.pipeline.qc import laplacian_variance
from appliance.pipeline.stain import _OD_LUT, BETA, stained_od, take_rows
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import block_sums
from appliance.pipeline.tissue import (close, dilate, erode, integral, mask_of_subsampled, saturated, saturation,
                                      subsample, tissue_fraction)


def test_saturation_matches_hsv_definition():
    rgb = np.array([[[255, 255, 255], [200, 100, 50], [0, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    expected = [0, int((200 - 50) * 255 / 200), 0, int((30 - 10) * 255 / 30)]
    assert saturation(rgb)[0].tolist() == expected


def test_tissue_fraction_separates_glass_from_stain():
    glass = np.full((100, 100, 3), 240, dtype=np.uint8)
    stained = np.zeros((100, 100, 3), dtype=np.uint8)
    stained[...] = (180, 90, 160)  # eosin-pink
    half = glass.copy()
    half[:, :50] = stained[:, :50]
    assert tissue_fraction(glass) == 0.0
    assert tissue_fraction(stained) == 1.0
    assert tissue_fraction(half) == pytest.approx(0.5)


def test_edge_patches_are_padded_with_glass():
    tile = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = pad_to(tile, 50, 255)
    assert out.shape == (50, 50, 3)
    assert np.array_equal(out[:20, :30], tile)
    assert (out[20:] == 255).all() and (out[:, 30:] == 255).all()
    full = tile[:20, :20]
    assert pad_to(np.ascontiguousarray(np.zeros((50, 50, 3), np.uint8)), 50, 255).max() == 0
    assert pad_to(full, 20, 0) is full


@pytest.mark.parametrize("k", [1, 5, 15])
def test_adding_many_at_once_keeps_the_same_top_k_as_one_by_one(k):
    """The session folds a batch's segment at a time (add_many); the score after each segment must be the one
    adding the same probabilities one by one gives, ties and short segments included."""
    rng = np.random.default_rng(k)
    one, many = TopKMean(k), TopKMean(k)
    values = np.round(rng.random(3000), 2)  # rounded: many ties
    start = 0
    while start < len(values):
        end = start + int(rng.integers(0, 40))
        for p in values[start:end].tolist():
            one.add(p)
        many.add_many(values[start:end])
        assert (many.score, many.count, many.full) == (one.score, one.count, one.full)
        start = end


def test_top_k_mean_never_falls_once_full():
    rng = np.random.default_rng(1)
    agg = TopKMean(15)
    last = None
    for p in rng.random(500):
        agg.add(float(p))
        if agg.full:
            assert last is None or agg.score >= last
            last = agg.score
    probs = np.sort(rng.random(10))
    assert top_k_mean(probs, 3) == pytest.approx(probs[-3:].mean())


def test_auc_against_hand_computed_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # 3 of the 4 (pos, neg) pairs are ordered correctly
    assert roc_auc([0, 1, 0, 1], [0.1, 0.3, 0.4, 0.9]) == 0.75
    assert roc_auc([1, 1], [0.1, 0.2]) is None


def test_binary_metrics_confusion_counts():
    m = binary_metrics(np.array([1, 1, 0, 0, 0]), np.array([0.9, 0.2, 0.7, 0.1, 0.3]), 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 2)
    assert m["sensitivity"] == 0.5 and m["specificity"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.5)


def test_division_free_saturation_test_matches_the_definition():
    rgb = np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    rgb[:3] = 0  # black: saturation 0
    rgb[3:6] = 255  # white: saturation 0
    for t in (0, 1, 19, 20, 21, 128, 254):
        assert np.array_equal(saturated(rgb, t), saturation(rgb) > t), t


def test_morphology_matches_a_padded_reference():
    def reference(m, k, op):
        r = k // 2
        p = np.pad(m, r, mode="edge")
        return np.array([[op(p[i : i + k, j : j + k]) for j in range(m.shape[1])] for i in range(m.shape[0])])

    rng = np.random.default_rng(0)
    for _ in range(10):
        m = rng.random((17, 23)) < 0.5
        for k in (3, 5):
            assert np.array_equal(dilate(m, k), reference(m, k, np.any))
            assert np.array_equal(erode(m, k), reference(m, k, np.all))


def test_the_opencv_tissue_path_gives_the_numpy_definition_bit_for_bit(demo_image):
    """The per-tile mask runs in OpenCV (subsample, threshold, closings); on the demo case's real tiles and on
    random masks it equals the numpy definition exactly, and its booleans are 0/1 bytes."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        m = rng.random((int(rng.integers(5, 60)), int(rng.integers(5, 60)))) < rng.random()
        for k in (3, 5):
            assert np.array_equal(close(m, k), erode(dilate(m, k), k)), k
    h, w = demo_image.shape[:2]
    for y in range(0, h - 450, 450):
        for x in range(0, w - 450, 450):
            tile = np.ascontiguousarray(demo_image[y : y + 450, x : x + 450])
            sub = subsample(tile)
            assert np.array_equal(sub, tile[::2, ::2])
            want = saturated(tile[::2, ::2])  # a strided view: the numpy definition
            for k in (5, 3):
                want = erode(dilate(want, k), k)
            got = mask_of_subsampled(sub)
            assert got.view(np.uint8).max() <= 1
            assert np.array_equal(got, want), (x, y)
    odd = np.ascontiguousarray(demo_image[:451, :449])
    assert np.array_equal(subsample(odd), odd[::2, ::2])  # an odd size takes the slicing


def test_block_sums_and_integral_images_are_exact():
    """The thumbnail's block sums and the tissue fraction's integral image come from OpenCV; both equal plain
    numpy sums exactly, on contiguous images and on views at an offset."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        img = rng.integers(0, 256, (int(rng.integers(20, 200)), int(rng.integers(20, 200)), 3), dtype=np.uint8)
        oy, ox, c = int(rng.integers(0, 10)), int(rng.integers(0, 10)), int(rng.integers(1, 11))
        view = img[oy:, ox:]
        ny, nx = view.shape[0] // c, view.shape[1] // c
        view = view[: ny * c, : nx * c]
        assert np.array_equal(block_sums(view, c), view.reshape(ny, c, nx, c, 3).sum(axis=(1, 3)))
        mask = rng.random(img.shape[:2]) < rng.random()
        ii = integral(mask)
        assert ii.shape == (mask.shape[0] + 1, mask.shape[1] + 1)
        assert np.array_equal(ii[1:, 1:], mask.cumsum(axis=0).cumsum(axis=1))


@pytest.mark.parametrize("width,height", [(None, None), (475, 130)])
def test_patch_extents_at_once_match_one_by_one(width, height):
    grid = PatchGrid(50, 50, width, height)
    keys = [(gx, gy) for gy in range(4) for gx in range(12)]
    assert grid.extents(keys).tolist() == [list(grid.extent(gx, gy)) for gx, gy in keys]


def test_a_thumbnail_from_every_second_pixel_is_the_mean_of_those_pixels(demo_image):
    """The session builds the thumbnail from the tissue mask's half-resolution copy: each 10 px cell is the
    rounded mean of its 25 sampled pixels, close to the mean of all 100, and a tile at an odd position (which
    the half-resolution copy cannot place) is refused, not misdrawn."""
    from appliance.pipeline.heatmap import Thumbnail

    tile = np.ascontiguousarray(demo_image[:450, :440])
    half, whole = Thumbnail(10), Thumbnail(10)
    half.add(20, 40, subsample(tile), 2)
    whole.add(20, 40, tile)
    sampled = tile[::2, ::2].reshape(45, 5, 44, 5, 3).mean(axis=(1, 3))
    got = half.image()[4:, 2:]
    assert got.shape == (45, 44, 3)
    assert np.array_equal(got, np.floor(sampled + 0.5).astype(np.uint8))
    assert np.abs(got.astype(int) - whole.image()[4:, 2:].astype(int)).mean() < 4
    with pytest.raises(ValueError, match="subsampled by 2 at \\(21, 40\\)"):
        half.add(21, 40, subsample(tile), 2)


@pytest.mark.parametrize("k", [3, 5, 10])
def test_block_means_are_the_exact_means_rounded_half_up(k):
    from appliance.pipeline.heatmap import block_means

    rng = np.random.default_rng(k)
    for _ in range(20):
        img = rng.integers(0, 256, (k * int(rng.integers(1, 20)), k * int(rng.integers(1, 20)), 3), dtype=np.uint8)
        ny, nx = img.shape[0] // k, img.shape[1] // k
        exact = img.reshape(ny, k, nx, k, 3).sum(axis=(1, 3)) / (k * k)
        assert np.array_equal(block_means(img, k), np.floor(exact + 0.5).astype(np.uint8))


def test_the_focus_measure_is_the_exact_variance_of_the_laplacian():
    """laplacian_variance (OpenCV's filter, int32 squares summed in int64) equals the variance of the
    4-neighbour Laplacian computed in int64, on random patches, on checkerboards (the largest Laplacian there is,
    4 x 255, squared in every pixel) and on arrays OpenCV is not given (not contiguous)."""
    rng = np.random.default_rng(11)

    def definition(p):
        g = p[..., 1].astype(np.int64)
        lap = (4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:])
        lap = lap.reshape(len(p), -1)
        m = lap.shape[1]
        return ((lap * lap).sum(axis=1) * m - lap.sum(axis=1) ** 2) / (m * m)

    board = np.zeros((3, 50, 50, 3), np.uint8)
    board[:, ::2, ::2] = board[:, 1::2, 1::2] = 255
    for patches in (rng.integers(0, 256, (40, 50, 50, 3), dtype=np.uint8), board, board[:1],
                    rng.integers(0, 256, (5, 50, 50, 3), dtype=np.uint8)[:, :, :, ::-1]):
        assert np.array_equal(laplacian_variance(patches), definition(patches))
    assert laplacian_variance(board).min() > 1e6  # the extreme case really reached the largest squares


def test_the_stain_sample_takes_the_same_pixels_and_densities_as_numpy_indexing():
    """stained_od (OpenCV's tables, 3-byte gathers) gives exactly what boolean row indexing and the float
    table give, for any beta, an empty input and arrays that are not contiguous; take_rows is px[index]."""
    rng = np.random.default_rng(12)
    lut = _OD_LUT

    def definition(rgb, beta):
        px = rgb.reshape(-1, 3)
        keep = (lut[px] >= beta).all(axis=1)
        return lut[px[keep]]

    for shape in [(0, 3), (1, 3), (10_000, 3), (225, 225, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        for beta in (0.0, BETA, 0.6, 10.0):
            got = stained_od(rgb, beta)
            assert got.dtype == np.float32 and np.array_equal(got, definition(rgb, beta)), (shape, beta)
    strided = rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)[::2, ::3]
    assert np.array_equal(stained_od(strided), definition(strided, BETA))
    px = rng.integers(0, 256, (100, 3), dtype=np.uint8)
    index = np.array([99, 0, 0, 42])
    assert np.array_equal(take_rows(px, index), px[index])
    assert np.array_equal(take_rows(px[::2], index[1:]), px[::2][index[1:]])
