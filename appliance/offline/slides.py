"""Whole-slide files in: SVS, NDPI, MRXS, SCN, Philips and generic tiled TIFF, DICOM WSI, opened with OpenSlide 4
(tiffslide for TIFF-based slides when OpenSlide cannot be loaded), read region by region at the pyramid level
nearest the model's resolution, tissue regions only, so memory follows the tile size and never the slide size.

The resolution comes from the slide's own metadata; a slide that does not state a microscope resolution is
refused unless the caller gives one (``--mpp``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from appliance.errors import InputError
from appliance.offline.sources import SourceTile
from appliance.pipeline.tissue import dilate, tissue_mask

log = logging.getLogger(__name__)

# Formats that are only ever slides; a .tif/.tiff is a slide when a slide reader recognises it (tiled TIFF).
SLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".dcm", ".bif", ".vms", ".vmu", ".svslide"}
TIFF_SUFFIXES = {".tif", ".tiff"}
# µm/px a brightfield slide can have (0.1 at 100x to tens of µm in a macro image). A TIFF's default 72 dpi
# reads as 352.8 µm/px: outside, so such a file is treated as stating no resolution.
MPP_RANGE = (0.05, 50.0)
THUMBNAIL_SIDE = 2048  # the tissue map's longer side, in pixels (a 40,000 px slide: one cell per ~20 px)
THUMBNAIL_MAX_PX = 64_000_000  # the most pixels decoded to make the map (256 MB as RGBA)
LEVEL_TOLERANCE = 1.1  # a level up to 10 % coarser than the model still counts as fine enough


@dataclass(frozen=True)
class SlideInfo:
    """What was read from a slide, for the case summary."""

    reader: str  # "openslide" or "tiffslide"
    vendor: str
    width: int  # level 0, pixels
    height: int
    microns_per_pixel: float  # level 0
    mpp_source: str  # "slide" (its metadata) or "given" (--mpp)
    level: int  # the level read
    downsample: float  # of that level, against level 0
    level_microns_per_pixel: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def is_slide(path: Path) -> bool:
    """Whether ``path`` is read as a slide (region by region) rather than decoded whole as an image."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES or (path.is_dir() and any(path.glob("*.mrxs"))):
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    # A TIFF is a slide when it is a pyramid (or a scanner vendor's TIFF). A single-level generic TIFF, like the
    # bundled demo case, is an image: decoded whole, as any PNG, with every tile streamed.
    osl = _openslide()
    if osl is not None:
        try:
            vendor = osl.OpenSlide.detect_format(str(path))
            if vendor is None:
                return False
            if vendor != "generic-tiff":
                return True
            with osl.OpenSlide(str(path)) as slide:
                return slide.level_count > 1
        except osl.OpenSlideError:
            return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tif.pages[0].is_tiled and (len(tif.series[0].levels) > 1 or tif.is_svs or tif.is_ndpi
                                              or tif.is_philips or tif.is_scn)
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def _openslide():
    """The openslide module, or None when its library cannot be loaded on this machine."""
    try:
        import openslide

        return openslide
    except (ImportError, OSError) as exc:
        log.warning("OpenSlide cannot be loaded (%s); TIFF-based slides are read with tiffslide", exc)
        return None


def pick_level(level_mpps: list[float], target_mpp: float) -> int:
    """The coarsest level still at least as fine as ``target_mpp`` (within LEVEL_TOLERANCE), so the
    pipeline only ever downsamples; level 0 when every level is coarser."""
    fine_enough = [i for i, m in enumerate(level_mpps) if m <= target_mpp * LEVEL_TOLERANCE]
    return max(fine_enough, key=lambda i: level_mpps[i]) if fine_enough else 0


class Slide:
    """One open slide file. Use as a context manager; ``tiles`` yields the tissue tiles of the chosen level."""

    def __init__(self, path: Path, target_mpp: float, mpp: float | None = None):
        self.path = Path(path)
        self._slide, self.reader = self._open()
        props = self._slide.properties
        self.vendor = props.get(f"{self.reader}.vendor") or "unknown"
        self.width, self.height = (int(v) for v in self._slide.level_dimensions[0])
        if mpp is not None:
            self.mpp, source = float(mpp), "given"
        else:
            self.mpp, source = self._declared_mpp(props), "slide"
        downsamples = [float(d) for d in self._slide.level_downsamples]
        self.level = pick_level([self.mpp * d for d in downsamples], target_mpp)
        self.downsample = downsamples[self.level]
        self.level_width, self.level_height = (int(v) for v in self._slide.level_dimensions[self.level])
        self.info = SlideInfo(self.reader, self.vendor, self.width, self.height, self.mpp, source, self.level,
                              self.downsample, self.mpp * self.downsample)

    def _open(self):
        osl = _openslide()
        if osl is not None:
            try:
                return osl.OpenSlide(str(self.path)), "openslide"
            except osl.OpenSlideUnsupportedFormatError:
                raise InputError(f"{self.path}: not a slide OpenSlide can read, an unknown format or a damaged file "
                                 f"(it reads SVS, NDPI, MRXS, SCN, Philips or generic tiled TIFF, DICOM WSI)") from None
            except osl.OpenSlideError as exc:
                raise InputError(f"{self.path}: the slide file is damaged or incomplete ({exc})") from None
        if self.path.suffix.lower() not in TIFF_SUFFIXES | {".svs"}:
            raise InputError(f"{self.path}: reading this format needs OpenSlide, which cannot be loaded here; "
                             f"reinstall the appliance (`pip install -e .`)")
        import tiffslide

        try:
            return tiffslide.TiffSlide(self.path), "tiffslide"
        except Exception as exc:  # noqa: BLE001 - tiffslide raises the decoder's own errors; name the file
            raise InputError(f"{self.path}: the slide file cannot be read ({type(exc).__name__}: {exc})") from None

    def _declared_mpp(self, props) -> float:
        raw = props.get(f"{self.reader}.mpp-x")
        if raw is None:
            raise InputError(f"{self.path}: the slide does not state its resolution (no µm/px in its metadata); "
                             f"give it with --mpp")
        mpp = float(raw)
        if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]) or not math.isfinite(mpp):
            raise InputError(f"{self.path}: the slide states {mpp:g} µm/px, which is no microscope resolution "
                             f"(a TIFF's default 72 dpi reads as 352.8); give the real one with --mpp")
        return mpp

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._slide.close()

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 of the chosen level at level pixels x, y (w x h); transparent parts (outside the scanned
        area) come out white, as glass."""
        d = self.downsample
        try:
            region = self._slide.read_region((round(x * d), round(y * d)), self.level, (w, h))
        except Exception as exc:  # noqa: BLE001 - the readers raise their decoders' own errors; name the place
            raise InputError(f"{self.path}: cannot read the region at level {self.level} ({x}, {y}, {w} x {h}): "
                             f"{exc}") from None
        rgba = np.asarray(region)
        if rgba[:, :, 3].min() == 255:  # all scanned (the usual case): nothing to composite
            return np.ascontiguousarray(rgba[:, :, :3])
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        rgb = (rgba[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(rgb.astype(np.uint8))

    def tissue_map(self) -> tuple[np.ndarray, float] | None:
        """A tissue mask of the whole slide from a thumbnail, and the chosen level's pixels per mask cell; None
        when the slide has no level coarse enough to make one cheaply (every tile is then read, and the
        pipeline's own tissue mask sorts them)."""
        scale = max(self.level_width, self.level_height) / THUMBNAIL_SIDE
        if scale <= 1:
            thumb = self.read(0, 0, self.level_width, self.level_height)
            scale = 1.0
        else:
            # a thumbnail is made from the level nearest its size: refuse to decode more than THUMBNAIL_MAX_PX
            # (a slide with level 0 only would otherwise be read whole, GBs of RAM)
            best = self._slide.get_best_level_for_downsample(scale * self.downsample)
            bw, bh = self._slide.level_dimensions[best]
            if bw * bh > THUMBNAIL_MAX_PX:
                log.info("%s: no level small enough for a tissue map (%d x %d); reading every tile", self.path,
                         bw, bh)
                return None
            size = (max(1, round(self.level_width / scale)), max(1, round(self.level_height / scale)))
            thumb = np.asarray(self._slide.get_thumbnail(size).convert("RGB"))
        mask = tissue_mask(thumb, step=1)
        return dilate(mask, 3), scale  # a margin, so a patch at the tissue's edge is read whole

    def tile_boxes(self, tile_size: int) -> Iterator[tuple[int, int, int, int]]:
        """(x, y, w, h) of the chosen level's tiles in raster order, only those that touch tissue on the tissue
        map (all of them when there is no map); nothing is read but the map."""
        tissue = self.tissue_map()
        for y in range(0, self.level_height, tile_size):
            for x in range(0, self.level_width, tile_size):
                w, h = min(tile_size, self.level_width - x), min(tile_size, self.level_height - y)
                if tissue is not None:
                    mask, scale = tissue
                    y0, x0 = int(y / scale), int(x / scale)
                    y1, x1 = max(y0 + 1, math.ceil((y + h) / scale)), max(x0 + 1, math.ceil((x + w) / scale))
                    if not mask[y0:y1, x0:x1].any():
                        continue
                yield x, y, w, h

    def tiles(self, tile_size: int) -> Iterator[SourceTile]:
        """The tissue tiles (``tile_boxes``), read one by one."""
        for x, y, w, h in self.tile_boxes(tile_size):
            yield SourceTile(x, y, self.read(x, y, w, h), f"{self.path.name}@L{self.level}x{x}_y{y}")

    def count_tiles(self, tile_size: int) -> int:
        """All tiles of the chosen level (an upper bound on what ``tiles`` yields)."""
        return math.ceil(self.level_width / tile_size) * math.ceil(self.level_height / tile_size)


def write_svs(path: Path, image: np.ndarray, *, upsample: int, mpp: float, downsamples: tuple[int, ...] = (1, 4, 16),
              tile: int = 256, quality: int = 90) -> tuple[int, int]:
    """An Aperio-style SVS pyramid made from ``image`` (for tests, benchmarks and demonstrations): level 0 is
    the image with each pixel repeated ``upsample`` times each way, at ``mpp`` µm/px; each further level is
    reduced by its downsample (a divisor of ``upsample``). Written tile by tile as JPEG, never whole in
    memory, so a 40,000 px slide costs a few MB of RAM. A downsample beyond ``upsample`` (a multiple of it) is
    ``image`` itself reduced by a box filter, as a scanner's low-resolution levels are. Returns level 0's
    (width, height)."""
    import tifffile
    from PIL import Image

    h0, w0 = image.shape[0] * upsample, image.shape[1] * upsample

    def tiles(image: np.ndarray, factor: int, height: int, width: int):
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                src = image[y // factor:-(-(y + tile) // factor), x // factor:-(-(x + tile) // factor)]
                block = np.repeat(np.repeat(src, factor, axis=0), factor, axis=1)
                block = block[y % factor:y % factor + tile, x % factor:x % factor + tile]
                out = np.full((tile, tile, 3), 255, np.uint8)
                out[:block.shape[0], :block.shape[1]] = block[:min(tile, height - y), :min(tile, width - x)]
                yield out

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, d in enumerate(downsamples):
            if upsample % d and d % upsample:
                raise ValueError(f"downsample {d} neither divides the upsampling {upsample} nor is a multiple of it")
            height, width = -(-h0 // d), -(-w0 // d)
            source, factor = image, upsample // d
            if d > upsample:
                source, factor = np.asarray(Image.fromarray(image).reduce(d // upsample)), 1
            description = (f"Aperio Image Library v12.0.0\n{w0}x{h0} ({tile}x{tile}) JPEG Q={quality}"
                           f"|AppMag = {40 * 0.25 / mpp:g}|MPP = {mpp}" if i == 0 else "")
            tw.write(tiles(source, factor, height, width), shape=(height, width, 3), dtype=np.uint8,
                     tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                     photometric="rgb", metadata=None, description=description or None,
                     subfiletype=1 if i else 0)
    return w0, h0
