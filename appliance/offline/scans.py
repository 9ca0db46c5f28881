"""A core biopsy as a slide scanner would send it, made from a slide at the model's own 4 um/px: each region
upsampled (bicubic) to the scanner's 0.25 um/px (40x) or 0.5 um/px (20x), with a fixed seed of sensor
noise, and cut into the scanner's JPEG tiles. The bench's stand-in for a real 40x scan (bench/jpeg_scale.py):
the upsampled slide has no detail finer than 4 um, so JPEG and reduced-size decoding lose less here than on
a real scan's nuclei; the figures are labelled as such.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

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


def tissue_bands(slide: np.ndarray, band: int, step: int) -> list[tuple[float, int]]:
    """(tissue fraction, top row) of every ``band``-row strip of a slide, ``step`` rows apart, most tissue
    first: where a core's worth of tissue lies."""
    from appliance.pipeline.tissue import tissue_mask

    mask = tissue_mask(slide)
    rows = mask.mean(axis=1)
    per = slide.shape[0] / mask.shape[0]  # slide rows per mask row
    out = [(float(rows[int(y / per):max(int((y + band) / per), int(y / per) + 1)].mean()), y)
           for y in range(0, slide.shape[0] - band + 1, step)]
    return sorted(out, reverse=True)


def core_biopsy(slide: np.ndarray, magnification: str, seed: int, *, cores: int = 3, core_mm: tuple[float, float]
                = (1.0, 8.0), gap_mm: float = 0.5, tile: int = 1024) -> tuple[list[tuple[int, int, bytes]], int, int]:
    """A core-needle biopsy of ``cores`` cores (each ``core_mm`` wide x long, cut from the most tissue-rich
    strips of a 4 um/px slide, chosen with ``seed``) laid one under the other ``gap_mm`` apart, as a scanner
    at ``magnification`` sends it: the JPEG tiles (quality 80) of each core's bounding box on one grid, glass
    between the cores not scanned. Returns ([(x, y, jpeg)], width, height) in scanner pixels."""
    factor = round(MODEL_MPP / SCANNER_MPP[magnification])
    m = tile // factor  # model pixels per scanner tile
    rng = np.random.default_rng(seed)
    band = round(core_mm[0] * 1000 / MODEL_MPP / m) * m  # rows of the slide per core, whole tiles
    length = min(round(core_mm[1] * 1000 / MODEL_MPP / m) * m, slide.shape[1] // m * m)
    gap = -(-round(gap_mm * 1000 / MODEL_MPP) // m) * m
    rich = tissue_bands(slide, band, m)[: 3 * cores]
    picks = sorted(rng.choice(len(rich), size=cores, replace=False))
    jobs, top = [], 0
    for n, pick in enumerate(picks):
        y0 = rich[pick][1]
        x0 = int(rng.integers(0, slide.shape[1] // m * m - length + 1)) // m * m
        for ty in range(band // m):
            for tx in range(length // m):
                region = slide[y0 + ty * m:y0 + (ty + 1) * m, x0 + tx * m:x0 + (tx + 1) * m]
                jobs.append((tx * tile, (top + ty * m) * factor, region,
                             seed * 1_000_003 + n * 10_007 + ty * 1009 + tx))
        top += band + gap

    def made(job) -> tuple[int, int, bytes]:
        x, y, region, tile_seed = job
        return x, y, jpeg(upsampled(region, factor, seed=tile_seed))

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # resize, noise and JPEG release the GIL
        tiles = list(pool.map(made, jobs))
    return tiles, length * factor, (top - gap) * factor
