"""A tiled, pyramidal TIFF written in one pass over level 0, in full-width bands.

Laid out for OpenSlide's generic-tiff reader, which tifffile, tiffslide and QuPath also read: every level is
an ordinary tiled IFD (level 0 first, each reduced level its own page with NewSubfileType 1), TILE px JPEG
tiles (quality JPEG_QUALITY, 4:4:4, encoded on JPEG_WORKERS threads) and XResolution/YResolution in pixels
per centimetre, so ``openslide.mpp-x`` (and tifffile's ``get_resolution``) give the µm/px back at level 0.
No OME-XML: tifffile writes one OME Image per top-level page, so tifffile and tiffslide would see four
one-level images instead of a pyramid, and OME's own pyramid layout (SubIFDs) is invisible to OpenSlide.

Level 0 arrives as bands of BAND rows (the caller reads them from wherever the image lives, e.g. the case
mosaic on disk). Each band is halved (2 x 2 box, odd edges padded with glass) into the next level's band
and so on down the pyramid before its own tiles are encoded, and each reduced band is appended to that
level's raw file in the work folder; the reduced levels are then encoded from those files, band by band.
RAM stays at a few bands whatever the image size, and level 0 is read once.

The tiles are JPEG-encoded here, on JPEG_WORKERS threads kept fed with up to ENCODE_AHEAD tiles in flight,
and tifffile writes the encoded bytes as they are (with the same encoder and arguments its own JPEG path
uses, so the file is the same byte for byte). tifffile's own path encodes in batches: it gathers a batch on
the writing thread while the encoders wait, then waits for the whole batch, so its encoders stand idle for
much of the time (docs/performance.md, "Why the code is shaped so").
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from appliance import RESEARCH_USE_NOTICE

TILE = 256  # px, the tile side
BAND = TILE  # rows of level 0 per band; BAND >> level stays even for every level that is halved again
JPEG_QUALITY = 90
# No chroma subsampling: on the demo case's tissue 4:4:4 at quality 90 is 31.8 dB PSNR (4:2:0: 29.5 dB) for
# a third of zlib's bytes; the stain colours are what a reader looks at.
JPEG_SUBSAMPLING = (1, 1)
JPEG_WORKERS = 2  # threads encoding tiles (the bench PC has 2 cores)
ENCODE_AHEAD = 32  # tiles submitted to the JPEG threads and not yet written (6 MB of raw tiles)
MIN_LEVEL_SIDE = 256  # keep halving until the smaller side is below this (at least 3 levels)
MAX_LEVELS = 8
GLASS = 255


def level_count(width: int, height: int) -> int:
    n = 1
    while min(width, height) >> n >= MIN_LEVEL_SIDE // 2 and n < MAX_LEVELS:
        n += 1
    return max(n, 3)


def reduce2(band: np.ndarray, fill: int = GLASS) -> np.ndarray:
    """Half size by a 2 x 2 box filter, rounding half up; an odd last row or column is padded with ``fill``.

    OpenCV's INTER_AREA at exactly half an even size is that filter, (a+b+c+d+2) >> 2, as PIL's reduce(2) is,
    without PIL's unpacking of RGB to RGBX and back; every band of every level goes through it
    (docs/performance.md, "Why the code is shaped so")."""
    import cv2

    h, w = band.shape[:2]
    if h & 1 or w & 1:
        band = np.pad(band, ((0, h & 1), (0, w & 1), (0, 0)), constant_values=fill)
    return cv2.resize(band, (band.shape[1] // 2, band.shape[0] // 2), interpolation=cv2.INTER_AREA)


def tiles_of(bands: Iterable[np.ndarray], width: int, fill: int = GLASS) -> Iterator[np.ndarray]:
    """TILE x TILE tiles in raster order from full-width bands of TILE rows (the last may be shorter): views
    into the band (the encoder copies what it needs, on its own thread); edge tiles are padded with ``fill``.
    Only an edge tile is padded, so a band whose width is not a multiple of TILE is never copied whole into a
    padded band (a second copy of level 0 on the thread feeding the encoders)."""
    for band in bands:
        for x in range(0, width, TILE):
            tile = band[:, x : x + TILE]
            if tile.shape[:2] != (TILE, TILE):
                tile = np.pad(tile, ((0, TILE - tile.shape[0]), (0, TILE - tile.shape[1]), (0, 0)),
                              constant_values=fill)
            yield tile


def jpeg_encoder(subsampling: tuple[int, int] = JPEG_SUBSAMPLING):
    """tifffile's own JPEG encoder and the arguments its JPEG path passes for RGB tiles stored as YCbCr (so the
    tiles encoded here are the bytes tifffile would write); ``subsampling`` as TIFF's YCbCrSubsampling."""
    import tifffile

    encode = tifffile.TIFF.COMPRESSORS[7]  # COMPRESSION.JPEG
    args = {"level": JPEG_QUALITY, "subsampling": subsampling, "colorspace": "RGB", "outcolorspace": "YCBCR"}
    return lambda tile: encode(np.ascontiguousarray(tile), **args)


def encoded(tiles: Iterable[np.ndarray], encode, workers: int = JPEG_WORKERS,
            ahead: int = ENCODE_AHEAD) -> Iterator[bytes]:
    """``encode`` of each tile, in order, computed on ``workers`` threads with up to ``ahead`` tiles in flight:
    a tile is submitted as soon as one is written, so the encoders never wait for a batch to be gathered."""
    with ThreadPoolExecutor(workers, thread_name_prefix="pyramid-jpeg") as pool:
        pending: deque = deque()
        try:
            for tile in tiles:
                pending.append(pool.submit(encode, tile))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the writer stopped early (an error): what has not started never will
            for job in pending:
                job.cancel()


class _Level:
    """One reduced level as a dense raw raster in the work folder: appended band by band, read back in bands."""

    def __init__(self, path: Path, width: int, height: int):
        self.path, self.width, self.height = path, width, height
        self._file = open(path, "wb")

    def append(self, band: np.ndarray) -> None:
        assert band.shape[1] == self.width, (band.shape, self.width)
        self._file.write(memoryview(np.ascontiguousarray(band)).cast("B"))

    def bands(self) -> Iterator[np.ndarray]:
        self._file.close()
        row = self.width * 3
        with open(self.path, "rb") as f:
            for y in range(0, self.height, BAND):
                rows = min(BAND, self.height - y)
                band = np.empty((rows, self.width, 3), dtype=np.uint8)
                if f.readinto(memoryview(band).cast("B")) != rows * row:
                    raise OSError(f"{self.path} is shorter than its level ({self.width} x {self.height})")
                yield band

    def remove(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _cascade(bands: Iterable[np.ndarray], reduced: list[_Level]) -> Iterator[np.ndarray]:
    """Pass level 0's bands through, first halving each into every reduced level."""
    for band in bands:
        half = band
        for level in reduced:
            half = reduce2(half)
            level.append(half)
        yield band


class _Ahead:
    """Iterate ``items`` on a thread of its own, up to ``depth`` items ahead of the consumer: level 0's bands
    are read and halved while the JPEG threads encode the tiles before them."""

    _END = object()

    def __init__(self, items: Iterable, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(items),), name="pyramid-bands", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        try:
            while (item := self._queue.get()) is not self._END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def write_pyramid(path: Path, width: int, height: int, bands: Iterable[np.ndarray], mpp: float, workdir: Path,
                  name: str) -> int:
    """Write ``path`` from level 0 given as ``bands`` (full width, BAND rows, the last may be shorter);
    ``mpp`` is level 0's µm/px (0: unknown, no resolution recorded). Returns the number of levels."""
    import tifffile

    n = level_count(width, height)
    assert BAND >> (n - 2) >= 2, "a band must halve evenly down to the last level"
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [(width, height)]
    for _ in range(1, n):
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    reduced: list[_Level] = []
    encode = jpeg_encoder()
    try:
        for i, (w, h) in enumerate(sizes[1:], start=1):
            reduced.append(_Level(workdir / f".pyramid-{os.getpid()}-{id(reduced)}-level{i}.raw", w, h))
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            sources = [_cascade(bands, reduced)] + [lv.bands() for lv in reduced]
            for i, ((w, h), source) in enumerate(zip(sizes, sources)):
                ahead = _Ahead(source, depth=2)
                per_cm = 1e4 / (mpp * 2 ** i) if mpp > 0 else None
                try:
                    tif.write(
                        encoded(tiles_of(ahead, w), encode), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                        photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                        subsampling=JPEG_SUBSAMPLING, subfiletype=1 if i else 0, metadata=None,
                        description=f"{name}; {mpp:g} um/px at level 0; {RESEARCH_USE_NOTICE}" if i == 0 else None,
                        resolution=(per_cm, per_cm) if per_cm else None,
                        resolutionunit="CENTIMETER" if per_cm else None)
                finally:
                    ahead.close()
    finally:
        for level in reduced:
            level.remove()
    return n
