"""Reduced-size JPEG decoding for the model's path (appliance/pipeline/jpegscale.py), measured: how much it
changes the model's input, against how far the current path (full decode, then the area resample) already is
from the truth, and what it saves.

Tiles: windows of the bundled demo slide (IDC patient 10253, 4 um/px) upsampled to 0.25 um/px (40x) and
0.5 um/px (20x) with a fixed seed of sensor noise (appliance/offline/scans.py), cut into 1024-px JPEG tiles
(quality 80, 4:2:0). Truth: the area resample of the same tile before JPEG. Per tile, on the model's pixels:
  current  = full-size decode, then resample_tile      (what the daemon does today)
  reduced  = decode at 1/8 (DCT scaling), then resample_tile the rest of the way
and the error of each against the truth and against each other (grey levels, all channels), and the CPU
time of each (decode + resample, median of --repeats). The upsampled slide has no detail finer than 4 um,
so a real 40x scan's nuclei may lose more to both JPEG and DCT scaling than these tiles do.

    python bench/jpeg_scale.py [--tiles 24] [--repeats 3] [--json bench/results/jpeg_scale.json]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.offline.scans import MODEL_MPP, SCANNER_MPP, jpeg, upsampled  # noqa: E402
from appliance.pipeline.jpegscale import dct_denominator, jpeg_tile_to_model  # noqa: E402
from appliance.pipeline.resample import resample_tile, scale_factor  # noqa: E402
from report import write_json  # noqa: E402

DEMO_CASE = ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif"
TILE = 1024


def windows(slide: np.ndarray, size: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` windows of ``size`` model pixels, mostly tissue, chosen with a fixed seed."""
    rng = np.random.default_rng(seed)
    h, w = slide.shape[:2]
    out = []
    while len(out) < count:
        y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
        if (slide[y:y + size, x:x + size].mean(axis=2) < 200).mean() > 0.5:
            out.append((x, y))
    return out


def cpu(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return float(np.median(times))


def measure(slide: np.ndarray, magnification: str, tiles: int, repeats: int, quality: int) -> dict:
    mpp = SCANNER_MPP[magnification]
    factor = round(MODEL_MPP / mpp)
    scale = scale_factor(mpp, MODEL_MPP)
    size = TILE // factor  # model pixels per scanner tile
    errors = {"current_vs_truth": [], "reduced_vs_truth": [], "reduced_vs_current": []}
    t_full = t_reduced = 0.0
    d = dct_denominator(scale, 0, 0, TILE, TILE)
    for n, (x, y) in enumerate(windows(slide, size, tiles, seed=39)):
        raw = upsampled(slide[y:y + size, x:x + size], factor, seed=n)
        payload = jpeg(raw, quality)
        sx, sy = x * factor, y * factor  # the tile's scanner position
        truth = resample_tile(raw, sx, sy, scale)[2].astype(np.int16)

        def full():
            with Image.open(io.BytesIO(payload)) as img:
                return resample_tile(np.asarray(img.convert("RGB")), sx, sy, scale)

        def reduced():
            return jpeg_tile_to_model(payload, sx, sy, scale)

        a, b = full(), reduced()
        assert a[:2] == b[:2], "the reduced path put the tile elsewhere"
        cur, red = a[2].astype(np.int16), b[2].astype(np.int16)
        errors["current_vs_truth"].append(np.abs(cur - truth).ravel())
        errors["reduced_vs_truth"].append(np.abs(red - truth).ravel())
        errors["reduced_vs_current"].append(np.abs(red - cur).ravel())
        t_full += cpu(full, repeats)
        t_reduced += cpu(reduced, repeats)
    row = {"magnification": magnification, "scanner_mpp": mpp, "tiles": tiles, "tile_px": TILE,
           "jpeg_quality": quality, "dct_denominator": d, "model_px_per_tile": size}
    for k, v in errors.items():
        e = np.concatenate(v)
        row[k] = {"mean": round(float(e.mean()), 3), "p99": float(np.percentile(e, 99)), "max": int(e.max())}
    row["cpu_ms_per_tile"] = {"current": round(1000 * t_full / tiles, 2), "reduced": round(1000 * t_reduced / tiles, 2)}
    row["speedup"] = round(t_full / t_reduced, 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", type=int, default=80)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "jpeg_scale.json")
    args = ap.parse_args()
    slide = tifffile.imread(DEMO_CASE)
    rows = [measure(slide, m, args.tiles, args.repeats, args.quality) for m in SCANNER_MPP]
    print(f"{'scan':<6}{'1/d':>5}{'current vs truth':>22}{'reduced vs truth':>22}{'reduced vs current':>22}"
          f"{'ms/tile current':>17}{'reduced':>9}{'speedup':>9}")
    print(f"{'':<11}{'(mean / p99 / max grey levels, model pixels)':>66}")
    for r in rows:
        cells = "".join(f"{r[k]['mean']:>10.3f} /{r[k]['p99']:>4.0f} /{r[k]['max']:>4d}"
                        for k in ("current_vs_truth", "reduced_vs_truth", "reduced_vs_current"))
        print(f"{r['magnification']:<6}{r['dct_denominator']:>5}{cells}{r['cpu_ms_per_tile']['current']:>17.2f}"
              f"{r['cpu_ms_per_tile']['reduced']:>9.2f}{r['speedup']:>8.1f}x")
    write_json(args.json, {"what": __doc__.split("\n\n")[1], "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
