"""Build the bundled demo case: IDC patient 10253 reassembled into one tiled TIFF.

The IDC dataset ships each slide as 50x50 patches named ``..._x<X>_y<Y>_class<L>.png``.
Patient 10253 is one of the complete slides, so placing every patch at its (X, Y)
rebuilds the tissue. Positions without a patch are glass and are filled white.

Usage: python scripts/build_demo_case.py [--data DIR] [--patient 10253] [--out PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "idc_breast_histopathology"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "appliance" / "offline" / "demo_case" / "idc-10253.tif"
PATCH = 50
TIFF_TILE = 256
GLASS = 255


def build_mosaic(data: Path, patient: str) -> tuple[np.ndarray, dict]:
    rows = [r for r in csv.DictReader(open(data / "manifest.csv")) if r["patient_id"] == patient]
    if not rows:
        raise SystemExit(f"patient {patient} not found in {data / 'manifest.csv'}")
    xs = [int(r["x"]) for r in rows]
    ys = [int(r["y"]) for r in rows]
    x0, y0 = min(xs), min(ys)
    width = max(xs) - x0 + PATCH
    height = max(ys) - y0 + PATCH
    mosaic = np.full((height, width, 3), GLASS, dtype=np.uint8)
    labels = np.zeros((height // PATCH + 1, width // PATCH + 1), dtype=np.int8) - 1
    for r in rows:
        img = np.asarray(Image.open(data / r["relpath"]).convert("RGB"))
        x, y = int(r["x"]) - x0, int(r["y"]) - y0
        h, w = img.shape[:2]
        mosaic[y : y + h, x : x + w] = img
        labels[y // PATCH, x // PATCH] = int(r["label"])
    meta = {
        "source": "IDC breast histopathology (Kaggle 'Breast Histopathology Images'), CC0 1.0",
        "cite": "Cruz-Roa et al. 2014 (doi:10.1117/12.2043872); Janowczyk & Madabhushi 2016 (PMID 27563488)",
        "derived": f"patient {patient}: {len(rows)} 50x50 patches placed at their x/y; glass filled white",
        "patient": patient,
        "origin_in_slide": [x0, y0],
        "microns_per_pixel": 4.0,
        "patches": len(rows),
        "idc_patches": sum(1 for r in rows if r["label"] == "1"),
        "research_use_only": True,
    }
    return mosaic, meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--patient", default="10253")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    mosaic, meta = build_mosaic(args.data.resolve(), args.patient)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(
        args.out,
        mosaic,
        photometric="rgb",
        tile=(TIFF_TILE, TIFF_TILE),
        compression="zlib",
        compressionargs={"level": 9},
        predictor=True,
        description=json.dumps(meta),
        metadata=None,
        resolution=(1e4 / meta["microns_per_pixel"], 1e4 / meta["microns_per_pixel"]),
        resolutionunit="CENTIMETER",
    )
    print(f"wrote {args.out} {mosaic.shape[1]}x{mosaic.shape[0]} px, {args.out.stat().st_size / 1e6:.2f} MB, "
          f"{meta['patches']} patches ({meta['idc_patches']} IDC)")


if __name__ == "__main__":
    main()
