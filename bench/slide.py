"""Slide-file triage: an Aperio-style SVS pyramid of real tissue (the bundled case, each pixel repeated) written
to a temporary folder, then triaged as `appliance triage` does: OpenSlide, the level nearest the model, tissue
tiles only. Prints tiles/s, patches/s, the time to the first scored patch and peak RSS, and writes JSON.

    python bench/slide.py [--upsample 16] [--mpp 0.25] [--downsamples 1,4,16] [--json bench/results/slide.json]

--downsamples 1 writes level 0 only, so every tile is read at 0.25 um/px and resampled to the model's 4: the
reading and resampling path at its heaviest.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import tifffile

from appliance.config import load_settings
from appliance.model.engine import load_engine
from appliance.offline.demo import DEMO_CASE
from appliance.offline.slides import Slide, write_svs
from appliance.pipeline import TriageSession


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upsample", type=int, default=16)
    ap.add_argument("--mpp", type=float, default=0.25)
    ap.add_argument("--downsamples", default="1,4,16")
    ap.add_argument("--tile-size", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    settings = load_settings(None)
    engine = load_engine(settings.model_dir, settings.engine)
    image = tifffile.imread(DEMO_CASE)
    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        path = Path(tmp) / "bench.svs"
        t0 = time.perf_counter()
        width, height = write_svs(path, image, upsample=args.upsample, mpp=args.mpp,
                                  downsamples=tuple(int(d) for d in args.downsamples.split(",")))
        write_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        t0 = time.perf_counter()
        first_patch = None
        with Slide(path, engine.manifest.input.microns_per_pixel) as slide:
            session = TriageSession(engine, batch_size=settings.batch_size, scanner_mpp=slide.info.level_microns_per_pixel,
                                    width=slide.level_width, height=slide.level_height)
            try:
                for tile in slide.tiles(args.tile_size):
                    session.add_tile(tile.x, tile.y, tile.pixels)
                    if first_patch is None and session.patches_scored:
                        first_patch = time.perf_counter() - t0
                result = session.finish()
            finally:
                session.close()
            info = slide.info
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {
        "slide": {"width": width, "height": height, "mpp": args.mpp, "file_mb": round(size_mb, 1),
                  "write_s": round(write_s, 2), "level_read": info.level, "level_mpp": info.level_microns_per_pixel},
        "tiles": result.tiles, "patches": len(result.patches), "wall_s": round(wall, 2),
        "tiles_per_s": round(result.tiles / wall, 1), "patches_per_s": round(len(result.patches) / wall, 1),
        "first_patch_s": None if first_patch is None else round(first_patch, 3),
        "peak_rss_mb": round(peak_mb, 1), "verdict": result.verdict, "score": result.score,
    }
    print(f"slide {width} x {height} px at {args.mpp} um/px ({size_mb:.0f} MB, written in {write_s:.1f} s); "
          f"read level {info.level} at {info.level_microns_per_pixel:g} um/px, {args.tile_size} px tiles")
    print(f"{'tiles':>6} {'patches':>8} {'wall s':>7} {'tiles/s':>8} {'patches/s':>10} {'1st patch s':>12} "
          f"{'peak RSS MB':>12}  verdict")
    print(f"{res['tiles']:>6} {res['patches']:>8} {res['wall_s']:>7} {res['tiles_per_s']:>8} {res['patches_per_s']:>10} "
          f"{res['first_patch_s']!s:>12} {res['peak_rss_mb']:>12}  {result.verdict} ({result.score:.3f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
