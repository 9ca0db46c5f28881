"""Tile pixel codecs (raw, zlib, png, jpeg) between uint8 HxWxC arrays and TILE payload bytes. Pure, no I/O."""

from __future__ import annotations

import io
import struct
import zlib
from enum import IntEnum

import numpy as np
from PIL import Image, UnidentifiedImageError

from firmware_bridge.errors import TileDecodeError, TileEncodeError

CHANNELS = 3  # v1 carries RGB only
JPEG_QUALITY = 90  # high enough that H&E nuclei keep their edges; ~8x smaller than raw


class TileEncoding(IntEnum):
    """Wire code of a TILE payload's encoding."""

    RAW = 0  # row-major H x W x 3 bytes, R G B
    ZLIB = 1  # the raw bytes as one zlib (RFC 1950) stream
    PNG = 2  # an 8-bit RGB PNG of exactly W x H
    JPEG = 3  # a baseline or progressive 8-bit RGB (YCbCr) JFIF of exactly W x H; lossy

    @classmethod
    def parse(cls, value: TileEncoding | int | str) -> TileEncoding:
        """Accept an enum, its wire code, or its name ("raw", "zlib", "png", "jpeg")."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                names = ", ".join(e.name.lower() for e in cls)
                raise ValueError(f"unknown tile encoding {value!r}; use one of {names}") from None
        return cls(value)


def encode_pixels(pixels: np.ndarray, encoding: TileEncoding | int | str, *, quality: int = JPEG_QUALITY) -> bytes:
    """Turn a uint8 HxWx3 array into payload bytes for the given encoding (quality: jpeg only)."""
    try:
        encoding = TileEncoding.parse(encoding)
    except ValueError as exc:
        raise TileEncodeError(str(exc)) from None
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != CHANNELS:
        raise TileEncodeError(f"pixels must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise TileEncodeError(f"pixels must not be empty, got shape {arr.shape}")
    if encoding == TileEncoding.RAW:
        return np.ascontiguousarray(arr).tobytes()
    if encoding == TileEncoding.ZLIB:
        return zlib.compress(np.ascontiguousarray(arr).tobytes(), 6)
    if encoding == TileEncoding.PNG:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        return buf.getvalue()
    if encoding == TileEncoding.JPEG:
        if not 1 <= quality <= 100:
            raise TileEncodeError(f"jpeg quality {quality} must be between 1 and 100")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    raise TileEncodeError(f"unsupported tile encoding {encoding!r}")


def decode_pixels(
    payload: bytes,
    encoding: TileEncoding | int,
    width: int,
    height: int,
    *,
    channels: int = CHANNELS,
    label: str = "tile",
) -> np.ndarray:
    """Decode payload into a read-only uint8 (height, width, channels) array or raise TileDecodeError.

    label prefixes every message (e.g. "tile 12") so a technician can find the tile.
    """
    if width <= 0 or height <= 0:
        raise TileDecodeError(f"{label}: size {width}x{height} is empty")
    if channels != CHANNELS:
        raise TileDecodeError(f"{label}: {channels} channels requested, v1 carries only RGB (3)")
    expected = width * height * channels
    shape = f"{width}x{height}x{channels}"
    try:
        enc = TileEncoding(encoding)
    except ValueError:
        raise TileDecodeError(f"{label}: unknown encoding code {encoding}") from None

    if enc == TileEncoding.RAW:
        if len(payload) != expected:
            raise TileDecodeError(
                f"{label}: raw payload is {len(payload)} bytes, expected {expected} for {shape}"
            )
        raw = bytes(payload)
    elif enc == TileEncoding.ZLIB:
        raw = _inflate(payload, expected, label, shape)
    else:
        return _decode_image(payload, enc, width, height, label)

    arr = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, channels)
    arr.flags.writeable = False
    return arr


def _inflate(payload: bytes, expected: int, label: str, shape: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        # max_length caps the output, so a hostile or corrupt stream cannot balloon memory.
        raw = inflater.decompress(payload, expected + 1)
    except zlib.error as exc:
        raise TileDecodeError(f"{label}: zlib payload is corrupt: {exc}") from exc
    if len(raw) > expected:
        raise TileDecodeError(f"{label}: zlib payload inflates to more than {expected} bytes ({shape})")
    if not inflater.eof:
        raise TileDecodeError(
            f"{label}: zlib stream is truncated after {len(raw)} bytes, expected {expected} for {shape}"
        )
    if inflater.unused_data:
        raise TileDecodeError(
            f"{label}: {len(inflater.unused_data)} stray bytes after the end of the zlib stream"
        )
    if len(raw) != expected:
        raise TileDecodeError(
            f"{label}: zlib payload inflates to {len(raw)} bytes, expected {expected} for {shape}"
        )
    return raw


def check_jpeg(payload: bytes, width: int, height: int, *, label: str = "tile") -> None:
    """Check that payload is an RGB JPEG of exactly width x height that decodes, or raise TileDecodeError.

    The check decodes at 1/8 of the size (libjpeg's DCT scaling, Pillow's ``draft``): the entropy-coded data
    is still read to its end, so a truncated or damaged stream fails as it does at full size, for about an
    eighth of the work. A JPEG tile is kept as it came (the spool stores its bytes), so this is all the host
    decodes of it before the ACK."""
    if width <= 0 or height <= 0:
        raise TileDecodeError(f"{label}: size {width}x{height} is empty")
    _decode_image(payload, TileEncoding.JPEG, width, height, label, reduce=8)


def _decode_image(payload: bytes, enc: TileEncoding, width: int, height: int, label: str,
                  reduce: int = 1) -> np.ndarray:
    """Decode a PNG or JPEG payload; ``reduce`` (JPEG only) asks libjpeg for 1/reduce of the size."""
    kind = enc.name.lower()
    try:
        with Image.open(io.BytesIO(payload), formats=[enc.name]) as img:
            # Check the header before decoding so a wrong-sized image costs nothing.
            if img.size != (width, height) or img.mode != "RGB":
                raise TileDecodeError(
                    f"{label}: {kind} is {img.mode} {img.size[0]}x{img.size[1]}, "
                    f"expected RGB {width}x{height}"
                )
            if reduce > 1:  # libjpeg picks the scale, at most 1/reduce: the expected size is the one it picked
                img.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
            expected = (img.size[1], img.size[0], CHANNELS)
            img.load()
            arr = np.array(img, dtype=np.uint8)
        if enc == TileEncoding.PNG:
            # load() stops once it has every row: a PNG cut after its pixel data, or damaged in a way the
            # inflater does not notice, decodes without complaint. verify() checks every chunk's CRC to IEND.
            with Image.open(io.BytesIO(payload), formats=["PNG"]) as whole:
                whole.verify()
    except TileDecodeError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        zlib.error,
        Image.DecompressionBombError,
    ) as exc:
        # Pillow reports broken images through all of these depending on where it breaks.
        raise TileDecodeError(f"{label}: {kind} payload cannot be decoded: {exc}") from exc
    if arr.shape != expected:
        raise TileDecodeError(f"{label}: {kind} decoded to {arr.shape}, expected {expected}")
    arr.flags.writeable = False
    return arr
