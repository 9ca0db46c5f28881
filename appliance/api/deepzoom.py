"""Deep-zoom tiles of a case's pyramids (case.ome.tif, heatmap.ome.tif) for the browser viewer, by OpenSlide's
DeepZoomGenerator: the DZI descriptor and JPEG tiles. Open slides are kept (a few, least recently used
first out) so that a tile costs a read and an encode, not an open."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

TILE_SIZE, OVERLAP, QUALITY = 254, 1, 80
KEPT = 8


class DeepZoom:
    def __init__(self, kept: int = KEPT):
        self.kept = kept
        self._open: OrderedDict[tuple[str, float], tuple] = OrderedDict()  # (OpenSlide, DeepZoomGenerator)
        self._lock = threading.Lock()

    def _generator(self, path: Path):
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        key = (str(path), path.stat().st_mtime)  # a file made again (after a power cut) is opened again
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        slide = openslide.OpenSlide(path)
        opened = (slide, DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False))
        with self._lock:
            self._open[key] = opened
            while len(self._open) > self.kept:
                self._open.popitem(last=False)
        return opened

    def dzi(self, path: Path) -> str:
        return self._generator(path)[1].get_dzi("jpeg")

    def size(self, path: Path) -> tuple[int, int]:
        return self._generator(path)[1].level_dimensions[-1]

    def mpp(self, path: Path) -> float | None:
        """Level 0's microns per pixel, as OpenSlide reads it from the file; None when the file does not say."""
        import openslide

        value = self._generator(path)[0].properties.get(openslide.PROPERTY_NAME_MPP_X)
        try:
            return float(value) if value else None
        except ValueError:
            return None

    def region_png(self, path: Path, x: int, y: int, w: int, h: int) -> bytes:
        """A full-resolution crop (a patch of the gallery) as PNG."""
        image = self._generator(path)[0].read_region((x, y), 0, (w, h))
        out = io.BytesIO()
        image.convert("RGB").save(out, "PNG")
        return out.getvalue()

    def tile(self, path: Path, level: int, col: int, row: int) -> bytes:
        """A JPEG tile; ValueError if the level or address is outside the pyramid."""
        image = self._generator(path)[1].get_tile(level, (col, row))
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=QUALITY)
        return out.getvalue()
