"""Tile intake on its own (appliance.pipeline.intake), with the committed model's patch and input: only tissue
patches are cut, in a fixed order, edge patches padded with glass, patches that straddle tiles read back from the
mosaic once complete, and the focus QC measured on every 2nd patch cut."""

import numpy as np
import pytest

from appliance.model.manifest import read_manifest
from appliance.pipeline.clock import StageClock
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import Thumbnail
from appliance.pipeline.intake import FOCUS_SAMPLE, Intake, focus_sample, tile_crops
from appliance.pipeline.mosaic import GLASS, Mosaic
from appliance.pipeline.qc import CaseQc, laplacian_variance, limits_for
from tests.conftest import MODEL_DIR

MANIFEST = read_manifest(MODEL_DIR)
S = MANIFEST.patch.size
PAD = MANIFEST.input.pad_value
PINK = (180, 90, 160)  # eosin-stained tissue
SLIDE_GLASS = 235  # the scanner's glass: grey, not the model's white padding


def slide(h: int, w: int, tissue: list[tuple[int, int, int, int]], seed: int = 0) -> np.ndarray:
    """Glass with stained tissue (textured, so each patch differs) in the given x, y, w, h boxes."""
    img = np.full((h, w, 3), SLIDE_GLASS, np.uint8)
    noise = np.random.default_rng(seed).integers(-25, 25, (h, w, 3))
    for x, y, bw, bh in tissue:
        img[y:y + bh, x:x + bw] = np.clip(np.array(PINK) + noise[y:y + bh, x:x + bw], 0, 255)
    return img


@pytest.fixture
def make(tmp_path):
    """Intake over a case of the given size (None: unknown), on a fresh QC, grid and mosaic."""
    made = []

    def build(width=None, height=None, batch_size=64) -> Intake:
        grid = PatchGrid(S, MANIFEST.patch.stride, width, height)
        mosaic = Mosaic(tmp_path / f"mosaic{len(made)}")
        made.append(mosaic)
        return Intake(MANIFEST.patch, MANIFEST.input, batch_size, qc=CaseQc(limits_for(MANIFEST)), grid=grid,
                      mosaic=mosaic, thumbnail=Thumbnail(10), clock=StageClock())

    yield build
    for mosaic in made:
        mosaic.remove()


def cut(intake: Intake) -> tuple[np.ndarray, np.ndarray]:
    """Every patch cut so far: (positions, pixels), in cut order."""
    intake.batches.seal()
    ready = intake.batches.take_ready()
    return (np.concatenate([b.positions for b in ready]) if ready else np.zeros((0, 4), np.int64),
            np.concatenate([b.pixels for b in ready]) if ready else np.zeros((0, S, S, 3), np.uint8))


def test_only_tissue_patches_are_cut_row_by_row_from_the_tile(make):
    cells = [(1, 0), (3, 0), (0, 1), (2, 2)]
    img = slide(3 * S, 4 * S, [(gx * S, gy * S, S, S) for gx, gy in cells])
    intake = make(4 * S, 3 * S)
    assert intake.add(0, 0, img) == 12  # every grid patch it completed, glass or not
    pos, pixels = cut(intake)
    assert pos.tolist() == [[gx * S, gy * S, S, S] for gx, gy in cells] and intake.cut == 4
    for (x, y, _, _), px in zip(pos.tolist(), pixels):
        assert np.array_equal(px, img[y:y + S, x:x + S])


def test_a_patch_with_too_little_tissue_is_not_cut(make):
    assert MANIFEST.patch.min_tissue_fraction == 0.25
    img = slide(S, 2 * S, [(0, 0, S, S // 5), (S, 0, S, 2 * S // 5)])  # a fifth, then two fifths tissue
    intake = make(2 * S, S)
    intake.add(0, 0, img)
    assert cut(intake)[0].tolist() == [[S, 0, S, S]]


def test_patches_clipped_by_the_case_edge_are_padded_with_glass(make):
    w, h = 2 * S + S // 2, S + S // 4
    img = slide(h, w, [(0, 0, w, h)])
    intake = make(w, h)
    intake.add(0, 0, img)
    pos, pixels = cut(intake)
    assert pos.tolist() == [[0, 0, S, S], [S, 0, S, S], [2 * S, 0, S // 2, S],
                            [0, S, S, S // 4], [S, S, S, S // 4], [2 * S, S, S // 2, S // 4]]
    for (x, y, pw, ph), px in zip(pos.tolist(), pixels):
        assert px.shape == (S, S, 3)
        assert np.array_equal(px[:ph, :pw], img[y:y + ph, x:x + pw])
        assert (px[ph:] == PAD).all() and (px[:, pw:] == PAD).all()


def test_a_patch_straddling_two_tiles_is_cut_from_the_mosaic_when_the_second_arrives(make):
    half = 3 * S // 2
    img = slide(S, 3 * S, [(0, 0, 3 * S, S)])
    intake = make(3 * S, S)
    assert intake.add(0, 0, np.ascontiguousarray(img[:, :half])) == 1
    assert cut(intake)[0].tolist() == [[0, 0, S, S]]  # the middle patch waits for its other half
    assert intake.add(half, 0, np.ascontiguousarray(img[:, half:])) == 2
    pos, pixels = cut(intake)
    assert pos.tolist() == [[2 * S, 0, S, S], [S, 0, S, S]]  # the new tile's own, then the completed one
    assert np.array_equal(pixels[1], img[:, S:2 * S]) and intake.cut == 3


def test_at_the_end_the_patches_still_waiting_are_read_with_glass_beyond_the_scan(make):
    img = slide(S, 2 * S + 2 * S // 5, [(0, 0, 2 * S + 2 * S // 5, S)])
    intake = make()  # the case's size is unknown: the last column waits for a tile that never comes
    intake.add(0, 0, img)
    assert cut(intake)[0].tolist() == [[0, 0, S, S], [S, 0, S, S]]
    intake.drain()
    pos, pixels = cut(intake)
    assert pos.tolist() == [[2 * S, 0, S, S]]
    edge = 2 * S // 5
    assert np.array_equal(pixels[0][:, :edge], img[:, 2 * S:]) and (pixels[0][:, edge:] == GLASS).all()


def test_focus_is_measured_on_every_second_patch_in_cut_order_across_tiles(make):
    assert FOCUS_SAMPLE == 2
    assert focus_sample(list("abcde"), 0) == ["a", "c", "e"]
    assert focus_sample(list("abcde"), 3) == ["b", "d"]  # cut numbers 4 and 6
    intake = make(9 * S, S)
    for i, n in enumerate((3, 2, 3)):  # tissue patches per tile: cut numbers 0-2, 3-4, 5-7
        intake.add(3 * S * i, 0, slide(S, 3 * S, [(0, 0, n * S, S)], seed=i))
    pos, pixels = cut(intake)
    assert intake.cut == len(pos) == 8
    assert intake.qc.patches_scored == 4  # cut numbers 0, 2, 4, 6
    assert intake.qc.focus_values == laplacian_variance(pixels[::2]).astype(np.float64).tolist()


def test_tile_crops_are_views_into_the_tile_unless_padded():
    tile = slide(2 * S, 2 * S, [(0, 0, 2 * S, 2 * S)])
    xs, ys = np.array([0, S]), np.array([0, S])
    crops = tile_crops(tile, xs, ys, np.array([S, S // 2]), np.array([S, S]), S, PAD)
    assert np.shares_memory(crops[0], tile) and not np.shares_memory(crops[1], tile)
    assert np.array_equal(crops[1][:, :S // 2], tile[S:, S:S + S // 2]) and (crops[1][:, S // 2:] == PAD).all()
