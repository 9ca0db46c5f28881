"""JPEG tiles decoded straight at a reduced size for the model's path (issue 39, item 2).

A scanner at 0.25 um/px sends 16x the model's 4 um/px: decoding every JPEG tile at full size and then
averaging 16x16 pixels away spends most of the work on pixels nobody looks at. libjpeg can run its inverse
DCT at 1/2, 1/4 or 1/8 of the size (its "DCT scaling"; Pillow's ``Image.draft``): the entropy decoding still
reads every coefficient, so a damaged stream is still found, but the pixels come out already reduced. The
area resample (appliance.pipeline.resample) then goes the rest of the way exactly as for any tile.

The reduction is taken only where it keeps the tiles seamless and the pixels no coarser than the model's:
the largest of 8, 4, 2 that divides the tile's position and size and leaves at least one reduced pixel per
model pixel. Then the reduced tile sits at (x / d, y / d) with scale * d model pixels per reduced pixel, and
every model pixel lands where the full-size path puts it (round(x * scale) either way).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from appliance.errors import InputError
from appliance.pipeline.resample import resample_tile

DENOMINATORS = (8, 4, 2)  # libjpeg's DCT scalings Pillow's draft offers, largest first


def dct_denominator(scale: float, x: int, y: int, w: int, h: int) -> int:
    """The reduction (8, 4, 2, or 1 for none) a JPEG tile of w x h at scanner (x, y) may be decoded at, given
    ``scale`` model pixels per scanner pixel."""
    for d in DENOMINATORS:
        if scale * d <= 1.0 + 1e-9 and not (x % d or y % d or w % d or h % d):
            return d
    return 1


def decode_reduced(payload: bytes, d: int | Callable[[int, int], int], *, label: str = "tile") -> np.ndarray:
    """A baseline or progressive RGB JPEG decoded at 1/d of its size: (h/d, w/d, 3) uint8. ``d`` may be a
    function of the image's (w, h), read from its header. Raises InputError naming ``label`` for anything
    else (not a JPEG, not RGB, damaged, or a size d does not divide)."""
    try:
        with Image.open(io.BytesIO(payload), formats=["JPEG"]) as img:
            w, h = img.size
            if img.mode != "RGB":
                raise InputError(f"{label}: jpeg is {img.mode} {w}x{h}, expected RGB")
            d = d(w, h) if callable(d) else d
            if w % d or h % d:
                raise InputError(f"{label}: a {w}x{h} jpeg cannot be decoded at 1/{d}")
            if d > 1:
                img.draft("RGB", (w // d, h // d))
            img.load()
            px = np.asarray(img, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{label}: jpeg payload cannot be decoded: {exc}") from exc
    if px.shape != (h // d, w // d, 3):
        raise InputError(f"{label}: jpeg decoded at 1/{d} to {px.shape}, expected {(h // d, w // d, 3)}")
    return px


def jpeg_tile_to_model(payload: bytes, x: int, y: int, scale: float, *,
                       label: str = "tile") -> tuple[int, int, np.ndarray]:
    """A JPEG tile at scanner (x, y) to the model's resolution: decoded as small as allowed, then resampled
    the rest of the way. Returns its model position and pixels, as resample_tile does for a decoded tile."""
    chosen = []

    def denominator(w: int, h: int) -> int:
        chosen.append(dct_denominator(scale, x, y, w, h))
        return chosen[0]

    px = decode_reduced(payload, denominator, label=label)
    d = chosen[0]
    return resample_tile(px, x // d, y // d, scale * d)
