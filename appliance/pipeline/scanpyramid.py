"""The case pyramid at the scan's own resolution (issue 39): level 0 is the scan as it arrived.

A scanner at 0.25 or 0.5 um/px sends 16 to 64 times the pixels the model reads at 4 um/px; the pathologist
wants them all. When the scanner's tiles lie on a regular grid (each at a multiple of the tile size, the size
a multiple of 64, no overlap), the pyramid keeps that grid:

- level 0: each scanner JPEG tile's bytes as they came, without decoding (a TIFF tile may be a whole JPEG
  stream; OpenSlide, tifffile and tiffslide read it). A tile that cannot pass through (another encoding, a
  partial edge tile, another chroma subsampling) is encoded once, padded with glass; a grid cell never
  scanned is glass.
- levels 1 and 2: each tile decoded straight at 1/2 and 1/4 (libjpeg's DCT scaling) and encoded, tiles of
  half and a quarter of the scanner's size.
- level 3 on: the tiles decoded at 1/8 and laid into one image in RAM (1/64 of level 0's pixels: 12 MB for
  a 16 mm^2 core at 40x), halved and tiled as appliance.pipeline.pyramid does.

Only the tiles being encoded are in RAM; nothing is decoded at full size unless it has to be re-encoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from appliance import RESEARCH_USE_NOTICE
from appliance.pipeline.jpegscale import decode_reduced
from appliance.pipeline.pyramid import GLASS, JPEG_QUALITY, JPEG_SUBSAMPLING, JPEG_WORKERS, TILE, encoded, \
    jpeg_encoder, level_count, reduce2, tiles_of

GRID_LEVELS = 3  # levels 0, 1, 2 keep the scanner's grid; from 1/8 on, one image in RAM
GRID_MULTIPLE = 16 << (GRID_LEVELS - 1)  # a TIFF tile side is a multiple of 16 at every grid level


@dataclass(frozen=True)
class ScanTile:
    """A spooled scanner tile: its position in scanner pixels and the file holding it."""

    x: int
    y: int
    path: Path


@dataclass(frozen=True)
class ScanGrid:
    """A scan whose tiles lie on a regular grid: what its pyramid is written from."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    mpp: float
    cells: dict[tuple[int, int], ScanTile]  # (column, row) -> the tile there (a later one over it wins)
    read: Callable[[Path], np.ndarray | bytes]  # a tile's file -> its JPEG bytes, or its decoded pixels

    @property
    def columns(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def rows(self) -> int:
        return -(-self.height // self.tile_h)


def scan_grid(tiles: Sequence[ScanTile], width: int, height: int, tile_w: int, tile_h: int, overlap: int,
              mpp: float, read: Callable[[Path], np.ndarray | bytes]) -> ScanGrid | str:
    """The scan's grid, or why its tiles are not on one (then the case pyramid stays at the model's
    resolution). ``read`` gives a tile file's JPEG bytes or decoded pixels (the spool's reader)."""
    if not tiles:
        return "no tiles"
    if overlap:
        return f"the scanner's tiles overlap by {overlap} px"
    if tile_w % GRID_MULTIPLE or tile_h % GRID_MULTIPLE:
        return f"the scanner's tile size {tile_w}x{tile_h} is not a multiple of {GRID_MULTIPLE}"
    if not mpp > 0:
        return "the scan's um/px is not known"
    cells = {}
    for t in tiles:
        if t.x % tile_w or t.y % tile_h:
            return f"a tile at ({t.x}, {t.y}) is off the {tile_w}x{tile_h} grid"
        cells[(t.x // tile_w, t.y // tile_h)] = t
    width = width or max(c * tile_w for c, _ in cells) + tile_w
    height = height or max(r * tile_h for _, r in cells) + tile_h
    return ScanGrid(width, height, tile_w, tile_h, mpp, cells, read)


def jpeg_layout(data: bytes) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """A JPEG's (width, height) and its chroma subsampling as TIFF's YCbCrSubsampling (horizontal,
    vertical), e.g. (2, 2) for 4:2:0, or None for a layout TIFF cannot state (not three YCbCr layers)."""
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
        layers = getattr(img, "layer", None)
        if img.mode != "RGB" or not layers or len(layers) != 3:
            return img.size, None
        (_, h0, v0, _), *chroma = layers
        if any((h, v) != (1, 1) for _, h, v, _ in chroma):
            return img.size, None
        return img.size, (h0, v0)


def _padded(px: np.ndarray, w: int, h: int) -> np.ndarray:
    if px.shape[:2] == (h, w):
        return px
    out = np.full((h, w, 3), GLASS, np.uint8)
    out[: px.shape[0], : px.shape[1]] = px[:h, :w]
    return out


def reduced_tile(data: np.ndarray | bytes, r: int, label: str = "tile") -> np.ndarray:
    """A tile's JPEG bytes or pixels at 1/r of its size (rounded up): a JPEG decoded straight at that size
    where its sides allow, else decoded whole and area-averaged."""
    import cv2

    if isinstance(data, bytes):
        full = []  # the JPEG's own size, read from its header

        def scaling(w: int, h: int) -> int:
            full.append((w, h))
            return r if not (w % r or h % r) else 1

        px = decode_reduced(data, scaling, label=label)
        w, h = full[0]
    else:
        px = data
        h, w = px.shape[:2]
    h, w = -(-h // r), -(-w // r)
    if px.shape[:2] != (h, w):
        px = cv2.resize(np.ascontiguousarray(px), (w, h), interpolation=cv2.INTER_AREA)
    return px


def write_scan_pyramid(path: Path, grid: ScanGrid, name: str) -> dict:
    """Write ``path`` from the scan's tiles; returns what was done: {"levels", "passed_through", "encoded"}
    (level-0 tiles kept as the scanner's bytes, and encoded here)."""
    import tifffile

    n = level_count(grid.width, grid.height)
    order = [(c, r) for r in range(grid.rows) for c in range(grid.columns)]
    first_jpeg = next((d for t in grid.cells.values() if isinstance(d := grid.read(t.path), bytes)), None)
    # the scanner's own subsampling, so its tiles pass through (TIFF states one per level)
    subsampling = (jpeg_layout(first_jpeg)[1] if first_jpeg else None) or JPEG_SUBSAMPLING
    level0_encode = jpeg_encoder(subsampling)
    encode = jpeg_encoder()
    glass0 = level0_encode(np.full((grid.tile_h, grid.tile_w, 3), GLASS, np.uint8))
    counts = {"levels": n, "passed_through": 0, "encoded": 0}

    def level0(cell: tuple[int, int]) -> tuple[bytes, str | None]:
        tile = grid.cells.get(cell)
        if tile is None:
            return glass0, None
        data = grid.read(tile.path)
        if isinstance(data, bytes):
            if jpeg_layout(data) == ((grid.tile_w, grid.tile_h), subsampling):
                return data, "passed_through"
            data = reduced_tile(data, 1, str(tile.path))
        return level0_encode(_padded(data, grid.tile_w, grid.tile_h)), "encoded"

    def counted(items: Iterator[tuple[bytes, str | None]]) -> Iterator[bytes]:
        for data, kind in items:
            if kind:
                counts[kind] += 1
            yield data

    def grid_level(r: int) -> Callable[[tuple[int, int]], bytes]:
        w, h = grid.tile_w // r, grid.tile_h // r
        glass = encode(np.full((h, w, 3), GLASS, np.uint8))

        def one(cell: tuple[int, int]) -> bytes:
            tile = grid.cells.get(cell)
            return glass if tile is None else encode(_padded(reduced_tile(grid.read(tile.path), r, str(tile.path)),
                                                             w, h))
        return one

    def write(tif, tiles: Iterator[bytes], level: int, tile: tuple[int, int], level_subsampling) -> None:
        w, h = -(-grid.width // 2 ** level), -(-grid.height // 2 ** level)
        per_cm = 1e4 / (grid.mpp * 2 ** level)
        tif.write(tiles, shape=(h, w, 3), dtype=np.uint8, tile=tile, photometric="rgb", compression="jpeg",
                  compressionargs={"level": JPEG_QUALITY}, subsampling=level_subsampling,
                  subfiletype=1 if level else 0, metadata=None,
                  description=(f"{name}; {grid.mpp:g} um/px at level 0, the scan as it arrived; "
                               f"{RESEARCH_USE_NOTICE}") if level == 0 else None,
                  resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        write(tif, counted(encoded(order, level0)), 0, (grid.tile_h, grid.tile_w), subsampling)
        for level in range(1, min(GRID_LEVELS, n)):
            r = 2 ** level
            write(tif, encoded(order, grid_level(r)), level, (grid.tile_h // r, grid.tile_w // r),
                  JPEG_SUBSAMPLING)
        if n > GRID_LEVELS:
            image = _reduced_image(grid, 2 ** GRID_LEVELS)
            for level in range(GRID_LEVELS, n):
                h, w = image.shape[:2]
                bands = (image[y:y + TILE] for y in range(0, h, TILE))
                write(tif, encoded(tiles_of(bands, w), encode, JPEG_WORKERS), level, (TILE, TILE), JPEG_SUBSAMPLING)
                image = reduce2(image)
    return counts


def _reduced_image(grid: ScanGrid, r: int) -> np.ndarray:
    """The whole scan at 1/r of its size in RAM, each tile decoded straight at that size (glass elsewhere)."""
    w, h = -(-grid.width // r), -(-grid.height // r)
    image = np.full((h, w, 3), GLASS, np.uint8)
    cells = list(grid.cells.items())
    reduced = encoded(cells, lambda item: reduced_tile(grid.read(item[1].path), r, str(item[1].path)))
    for ((c, row), _tile), px in zip(cells, reduced):
        x, y = c * grid.tile_w // r, row * grid.tile_h // r
        part = px[: h - y, : w - x]
        image[y:y + part.shape[0], x:x + part.shape[1]] = part
    return image
