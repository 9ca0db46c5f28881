"""Durable per-case tile spool: a tile is on disk (fsynced, renamed, directory fsynced) before it is ACKed."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np

from appliance.durable import fsync_path
from appliance.errors import StoreError
from appliance.terms import CASE_ID

_TILE_FILE = re.compile(r"^tile-(\d+)_x(\d+)_y(\d+)\.(npy|jpg)$")
JPEG_SUFFIX = ".jpg"  # a tile kept as the scanner's JPEG bytes; any other encoding is kept decoded, as .npy


def check_case_id(case_id: str) -> str:
    """Case ids become folder names, so only a safe alphabet is allowed."""
    if not CASE_ID.match(case_id) or ".." in case_id:
        raise StoreError(f"case id {case_id!r} is not allowed: use letters, digits, '.', '_' or '-' (max 128)")
    return case_id


def pixel_digest(pixels: np.ndarray) -> str:
    """sha256 of a tile's pixel bytes (C order), as the link computes it on receipt."""
    return hashlib.sha256(np.ascontiguousarray(pixels)).hexdigest()


def write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync it, rename it into place and fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"could not store {path}: {exc.strerror or exc}") from None


class TileSpool:
    """One folder per case holding ``case.json`` and one file per tile: the scanner's JPEG as it came
    (``.jpg``), or the decoded pixels of any other encoding (``.npy``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def case_dir(self, case_id: str) -> Path:
        return self.root / check_case_id(case_id)

    def begin_case(self, case_id: str, info: dict) -> Path:
        d = self.case_dir(case_id)
        d.mkdir(parents=True, exist_ok=True)
        write_durably(d / "case.json", json.dumps(info, sort_keys=True).encode())
        fsync_path(self.root)
        return d

    def store_tile(self, case_id: str, index: int, x: int, y: int, pixels: np.ndarray,
                   sha256: str | None = None) -> tuple[Path, str]:
        """Store one decoded tile durably; returns its path and the sha256 of its pixel bytes (``sha256`` when
        the caller already has it, so a tile is hashed once)."""
        pixels = np.ascontiguousarray(pixels)
        buf = io.BytesIO()
        np.save(buf, pixels, allow_pickle=False)
        path = self.tile_path(case_id, index, x, y)
        write_durably(path, buf.getvalue())
        return path, sha256 or pixel_digest(pixels)

    def store_jpeg(self, case_id: str, index: int, x: int, y: int, jpeg: bytes,
                   sha256: str | None = None) -> tuple[Path, str]:
        """Store one JPEG tile durably, its bytes as they came; returns its path and their sha256."""
        path = self.tile_path(case_id, index, x, y, JPEG_SUFFIX)
        write_durably(path, jpeg)
        return path, sha256 or hashlib.sha256(jpeg).hexdigest()

    def tile_path(self, case_id: str, index: int, x: int, y: int, suffix: str = ".npy") -> Path:
        return self.case_dir(case_id) / f"tile-{index:06d}_x{x}_y{y}{suffix}"

    def tiles(self, case_id: str) -> list[Path]:
        return sorted(f for f in self.case_dir(case_id).glob("tile-*") if _TILE_FILE.match(f.name))

    def stored_tiles(self, case_id: str) -> list[tuple[int, int, int, Path]]:
        """(index, x, y, path) of every tile spooled for a case, in index order."""
        out = []
        for f in self.tiles(case_id):
            m = _TILE_FILE.match(f.name)
            out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), f))
        return sorted(out)

    def case_info(self, case_id: str) -> dict:
        return json.loads((self.case_dir(case_id) / "case.json").read_text())


def read_tile(path: Path) -> np.ndarray | bytes:
    """A spooled tile as stored: the JPEG's bytes, or the decoded pixels. Raises StoreError."""
    try:
        if path.suffix == JPEG_SUFFIX:
            return path.read_bytes()
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"a spooled tile could not be read back from {path}: {exc}") from None


def tile_record(path: Path) -> tuple[int, int, str]:
    """(width, height, sha256) of a spooled tile, as the link logs it on receipt. Raises StoreError."""
    data = read_tile(path)
    if isinstance(data, bytes):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError) as exc:
            raise StoreError(f"the spooled tile {path} is not a readable JPEG: {exc}") from None
        return w, h, hashlib.sha256(data).hexdigest()
    return data.shape[1], data.shape[0], pixel_digest(data)
