"""Case inputs from disk: one slide image (TIFF/PNG/JPEG) or a folder of tiles named ``..._x<X>_y<Y>...``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from appliance.errors import InputError

TILE_NAME = re.compile(r"_x(\d+)_y(\d+)")
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy"}
DEFAULT_TILE_SIZE = 200


@dataclass(frozen=True)
class SourceTile:
    x: int
    y: int
    pixels: np.ndarray  # (h, w, 3) uint8
    name: str


@dataclass(frozen=True)
class Skipped:
    """A file that could not be used, and why; reported, never silently dropped."""

    name: str
    reason: str


def read_image(path: Path) -> np.ndarray:
    """Read an image file as (h, w, 3) uint8 RGB, with a specific error for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":  # raw tiles, e.g. a case's spool folder (var/spool/<case id>)
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise InputError(f"{path}: not a readable .npy tile ({exc})") from None
        elif suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        else:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(path) as im:
                    im.load()
                    if im.mode in ("I;16", "I;16B", "I", "F"):
                        raise InputError(f"{path}: {im.mode} images are not supported; expected 8-bit RGB")
                    arr = np.asarray(im.convert("RGB"))
            except UnidentifiedImageError:
                raise InputError(f"{path}: not a readable image file") from None
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{path}: cannot decode image ({exc})") from None
    return as_rgb8(arr, str(path))


def as_rgb8(arr: np.ndarray, name: str) -> np.ndarray:
    """Normalise a decoded array to (h, w, 3) uint8, refusing what cannot be converted without guessing."""
    if arr.dtype != np.uint8:
        raise InputError(f"{name}: pixel type {arr.dtype} is not supported; expected 8-bit (uint8) RGB")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(f"{name}: image shape {arr.shape} is not (height, width, 3)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"{name}: image is empty")
    return np.ascontiguousarray(arr[:, :, :3])


def tiles_from_image(image: np.ndarray, tile_size: int = DEFAULT_TILE_SIZE, name: str = "") -> Iterator[SourceTile]:
    """Cut a whole image into scanner-style tiles in raster order (edge tiles are smaller)."""
    h, w = image.shape[:2]
    for y in range(0, h, tile_size):
        for x in range(0, w, tile_size):
            yield SourceTile(x, y, image[y : y + tile_size, x : x + tile_size], f"{name}@x{x}_y{y}")


def walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, following symlinked folders (datasets are often linked in)."""
    out = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=True):
        out.extend(Path(dirpath) / f for f in files)
    return sorted(out)


def tile_files(folder: Path) -> list[tuple[int, int, Path]]:
    """Image files under ``folder`` (recursively) whose names carry a position, in raster order."""
    found = []
    for p in walk_files(folder):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            m = TILE_NAME.search(p.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), p))
    found.sort(key=lambda t: (t[1], t[0], str(t[2])))
    return found


@dataclass(frozen=True)
class TileFolder:
    """A folder of position-named tiles, listed once (its extent, count and tiles all come from the one list)."""

    path: Path
    files: list[tuple[int, int, Path]]

    @classmethod
    def scan(cls, path: Path) -> "TileFolder":
        return cls(Path(path), tile_files(path))

    def extent(self) -> tuple[int, int, int | None, int | None]:
        """(origin x, origin y, width, height): the box around the tiles, its top-left tile position the origin;
        width/height None when no tile's size can be read."""
        if not self.files:
            return 0, 0, None, None
        ox, oy = min(f[0] for f in self.files), min(f[1] for f in self.files)
        w = h = 0
        for x, y, f in self.files:
            size = image_size(f)
            if size:
                w, h = max(w, x - ox + size[0]), max(h, y - oy + size[1])
        return ox, oy, (w or None), (h or None)

    def tiles(self, skipped: list[Skipped] | None = None) -> Iterator[SourceTile]:
        """The tiles in raster order; unreadable files go to ``skipped`` with the reason (without it: an error)."""
        if not self.files:
            raise InputError(f"{self.path}: no tile images named like '..._x<X>_y<Y>.png' in this folder")
        for x, y, f in self.files:
            try:
                yield SourceTile(x, y, read_image(f), str(f))
            except InputError as exc:
                if skipped is None:
                    raise
                skipped.append(Skipped(str(f), str(exc)))


def iter_case_tiles(
    path: Path, tile_size: int = DEFAULT_TILE_SIZE, skipped: list[Skipped] | None = None
) -> Iterator[SourceTile]:
    """Tiles of a case from a single image or a tile folder.

    Unreadable tile files in a folder are appended to ``skipped`` (with the reason) and the rest go on;
    an unreadable single image is an error.
    """
    path = Path(path)
    if path.is_dir():
        yield from TileFolder.scan(path).tiles(skipped)
    elif path.is_file():
        yield from tiles_from_image(read_image(path), tile_size, str(path))
    else:
        raise InputError(f"{path}: no such file or folder")


def count_case_tiles(path: Path, tile_size: int = DEFAULT_TILE_SIZE) -> int | None:
    """How many tiles ``iter_case_tiles`` will yield, when it is cheap to know."""
    path = Path(path)
    if path.is_dir():
        return len(tile_files(path))
    return None


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header without decoding it; None if unreadable."""
    try:
        if path.suffix.lower() == ".npy":  # the header alone (a memory map of the file costs 5x as much)
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            return int(shape[1]), int(shape[0])
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.series[0].shape
                return int(shape[1]), int(shape[0])
        from PIL import Image

        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - any unreadable header just means "size unknown"; reading reports it
        return None


def case_extent(path: Path) -> tuple[int, int, int | None, int | None]:
    """(origin x, origin y, width, height) of a case in pixels: the image, or the box around a folder's tiles
    (its top-left tile position is the origin). Width/height are None when unknown."""
    path = Path(path)
    if path.is_file():
        size = image_size(path)
        return (0, 0, *size) if size else (0, 0, None, None)
    if path.is_dir():
        return TileFolder.scan(path).extent()
    return 0, 0, None, None
