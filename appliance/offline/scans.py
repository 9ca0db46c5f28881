"""A core biopsy as a slide scanner would send it, made from a slide at the model's own 4 um/px: each region
upsampled (bicubic) to the scanner's 0.25 um/px (40x) or 0.5 um/px (20x), with a fixed seed of sensor
noise, and cut into the scanner's JPEG tiles. The bench's stand-in for a real 40x scan (bench/jpeg_scale.py):
the upsampled slide has no detail finer than 4 um, so JPEG and reduced-size decoding lose less here than on
a real scan's nuclei; the figures are labelled as such.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MODEL_MPP = 4.0
SCANNER_MPP = {"40x": 0.25, "20x": 0.5}
NOISE_SD = 3.0  # sensor noise, grey levels (a scanner's camera at base ISO is about this)


def upsampled(region: np.ndarray, factor: int, seed: int) -> np.ndarray:
    """A (h, w, 3) uint8 region of a 4 um/px slide as a scanner ``factor`` times finer would image it."""
    h, w = region.shape[:2]
    big = np.asarray(Image.fromarray(region).resize((w * factor, h * factor), Image.Resampling.BICUBIC),
                     dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, NOISE_SD, big.shape).astype(np.float32)
    return np.clip(big + noise + 0.5, 0, 255).astype(np.uint8)


def jpeg(tile: np.ndarray, quality: int = 80) -> bytes:
    """A scanner's JPEG tile: baseline, 4:2:0, libjpeg-turbo via Pillow."""
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
