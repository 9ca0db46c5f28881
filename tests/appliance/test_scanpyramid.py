"""The case pyramid at the scan's resolution from spooled tiles (appliance.pipeline.scanpyramid)."""

import io

import cv2
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from appliance.pipeline.scanpyramid import ScanTile, scan_grid, write_scan_pyramid
from appliance.store.spool import read_tile

T = 128


def _tile(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 230, (T // 16, T // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (T, T), interpolation=cv2.INTER_CUBIC)


def _jpeg(px: np.ndarray, subsampling: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(px).save(out, format="JPEG", quality=85, subsampling=subsampling)
    return out.getvalue()


def test_a_mixed_grid_passes_through_what_it_can_and_encodes_the_rest(tmp_path):
    """3 x 2 cells: 4:2:0 JPEGs (passed through), one 4:4:4 JPEG and one raw tile (encoded once), one cell
    never scanned (glass)."""
    pixels = {cell: _tile(i) for i, cell in enumerate([(0, 0), (1, 0), (2, 0), (0, 1), (1, 1)])}
    tiles = []
    for (c, r), px in pixels.items():
        if (c, r) == (1, 1):
            path = tmp_path / f"t{c}{r}.npy"
            np.save(path, px)
        else:
            path = tmp_path / f"t{c}{r}.jpg"
            path.write_bytes(_jpeg(px, 0 if (c, r) == (2, 0) else 2))
        tiles.append(ScanTile(c * T, r * T, path))
    grid = scan_grid(tiles, 3 * T, 2 * T, T, T, 0, 0.5, read_tile)
    out = tmp_path / "case.ome.tif"
    counts = write_scan_pyramid(out, grid, "MIXED")
    assert counts["passed_through"] == 3 and counts["encoded"] == 2

    slide = openslide.OpenSlide(out)
    assert slide.dimensions == (3 * T, 2 * T) and float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    with tifffile.TiffFile(out) as tif:
        page = tif.pages[0]
        tif.filehandle.seek(page.dataoffsets[0])
        assert tif.filehandle.read(page.databytecounts[0]) == (tmp_path / "t00.jpg").read_bytes()
    glass = np.asarray(slide.read_region((2 * T, T), 0, (T, T)).convert("RGB"))
    assert glass.min() >= 250  # the cell never scanned
    raw = np.asarray(slide.read_region((T, T), 0, (T, T)).convert("RGB"), dtype=np.int16)
    assert np.abs(raw - pixels[(1, 1)]).mean() < 3  # encoded once at quality 90
    # level 1: each tile decoded at half size, where the scanner put it
    half = np.asarray(slide.read_region((0, 0), 1, (T // 2, T // 2)).convert("RGB"), dtype=np.int16)
    expected = cv2.resize(pixels[(0, 0)], (T // 2, T // 2), interpolation=cv2.INTER_AREA)
    assert np.abs(half - expected).mean() < 4


@pytest.mark.parametrize("tiles, size, overlap, why", [
    ([ScanTile(0, 0, None), ScanTile(100, 0, None)], 128, 0, "a tile at (100, 0) is off the 128x128 grid"),
    ([ScanTile(0, 0, None)], 100, 0, "tile size 100x100 is not a multiple of 64"),
    ([ScanTile(0, 0, None)], 128, 8, "overlap by 8 px"),
    ([], 128, 0, "no tiles"),
])
def test_a_scan_off_a_regular_grid_says_why(tiles, size, overlap, why):
    reason = scan_grid(tiles, 0, 0, size, size, overlap, 0.25, read_tile)
    assert isinstance(reason, str) and why in reason
