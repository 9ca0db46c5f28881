"""Slide-file triage against R1, in the same run.

The slide: an Aperio-style SVS pyramid of real tissue, written to a temporary folder, its level 0 made from
  --source r1    R1's own tissue (its 1,197 tiles in their places, 15,750 x 15,750 px at 4 µm/px), so the
                 two runs score the same patches and differ only in where the pixels come from; with the
                 defaults (--upsample 2 --mpp 2 --downsamples 1,2,8) 31,500 x 31,500 px at 2 µm/px;
  --source demo  GRID x GRID copies of the bundled case (flipped in turn), sparse tissue (a quarter of the
                 pixels), the realistic case for glass; use --upsample 4 --mpp 1 --downsamples 1,4,16 for
                 40,000 x 32,000 px at 1 µm/px.
Each pixel is repeated UPSAMPLE times at MPP µm/px; the appliance reads the level at the model's 4 µm/px,
tissue tiles only (found on the lowest level).

In one run, alternating --repeats times (the 2-core VM drifts 10-20 % from minute to minute):
  (s) `appliance triage SLIDE` as the command does it (OpenSlide, the level nearest the model, tissue tiles
      through the streaming session, up to the call), in a child process so its peak RSS is its own;
  (r) R1 from bench/r1.py: the pipeline end to end on its 1,197 tiles (87,000 tissue patches).
Both are scored per tissue patch: the slide's patches/s over R1's patches/s is the ratio reported (the
median pair). Also printed: tiles/s, the time to the first scored patch and peak RSS.

    python bench/slide.py [--source r1|demo] [--grid 4] [--upsample 2] [--mpp 2.0] [--downsamples 1,2,8]
                          [--tile-size 500] [--repeats 3] [--data ../shared/data/idc_breast_histopathology]
                          [--json bench/results/slide.json]

--downsamples 1 writes level 0 only, so every tile is read at level 0 and resampled to the model's 4 µm/px:
the reading and resampling path at its heaviest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.offline.sources import DEFAULT_TILE_SIZE
from r1 import DATA, TILE, TILES, in_child, peak_rss_mb, r1_tiles, run_pipeline  # noqa: E402  (bench/ is the script's folder)
from report import write_json  # noqa: E402


def grid_image(image: np.ndarray, grid: int) -> np.ndarray:
    """``grid`` x ``grid`` copies of ``image``, flipped four ways in turn."""
    flips = (lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1])
    return np.concatenate([np.concatenate([flips[(r * grid + c) % 4](image) for c in range(grid)], axis=1)
                           for r in range(grid)], axis=0)


def r1_image(folder: Path) -> np.ndarray:
    """R1's tiles in their places, glass between."""
    tiles = {}
    for f in folder.glob("r1_x*_y*.npy"):
        x, y = (int(v[1:]) for v in f.stem.split("_")[1:3])
        tiles[(x, y)] = f
    w = max(x for x, _ in tiles) + TILE
    h = max(y for _, y in tiles) + TILE
    image = np.full((h, w, 3), 255, np.uint8)
    for (x, y), f in tiles.items():
        image[y:y + TILE, x:x + TILE] = np.load(f)
    return image


def _slide_child(path: str, tile_size: int, q) -> None:
    from appliance.config import load_settings
    from appliance.model.engine import load_engine
    from appliance.offline.slides import Slide
    from appliance.pipeline import TriageSession

    settings = load_settings(None)
    engine = load_engine(settings.model_dir, settings.engine)
    t0 = time.perf_counter()
    first_patch = None
    with Slide(Path(path), engine.manifest.input.microns_per_pixel) as slide:
        session = TriageSession(engine, batch_size=settings.batch_size,
                                scanner_mpp=slide.info.level_microns_per_pixel, width=slide.level_width,
                                height=slide.level_height)
        try:
            for tile in slide.tiles(tile_size):
                session.add_tile(tile.x, tile.y, tile.pixels)
                if first_patch is None and session.patches_scored:
                    first_patch = time.perf_counter() - t0
            result = session.finish()
        finally:
            session.close()
        info = slide.info
    wall = time.perf_counter() - t0
    q.put({"tiles": result.tiles, "patches": len(result.patches), "wall_s": wall, "first_patch_s": first_patch,
           "peak_rss_mb": peak_rss_mb(), "verdict": result.verdict, "score": result.score, "level": info.level,
           "level_mpp": info.level_microns_per_pixel, "level_size": [slide.level_width, slide.level_height]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=("r1", "demo"), default="r1")
    ap.add_argument("--grid", type=int, default=4, help="copies of the bundled case each way (--source demo)")
    ap.add_argument("--upsample", type=int, default=2)
    ap.add_argument("--mpp", type=float, default=2.0)
    ap.add_argument("--downsamples", default="1,2,8")
    ap.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    ap.add_argument("--repeats", type=int, default=1, help="alternating (s)/(r) pairs; the median ratio is reported")
    ap.add_argument("--data", type=Path, default=DATA, help="the IDC data, to build R1's tiles if not cached")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import tifffile

    from appliance.offline.demo import DEMO_CASE
    from appliance.offline.slides import write_svs

    folder = r1_tiles(args.data)
    image = r1_image(folder) if args.source == "r1" else grid_image(tifffile.imread(DEMO_CASE), args.grid)
    with tempfile.TemporaryDirectory(prefix="bench-slide-") as tmp:
        path = Path(tmp) / "bench.svs"
        t0 = time.perf_counter()
        width, height = write_svs(path, image, upsample=args.upsample, mpp=args.mpp,
                                  downsamples=tuple(int(d) for d in args.downsamples.split(",")))
        write_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        del image
        print(f"slide {width} x {height} px at {args.mpp:g} um/px, {size_mb:.0f} MB, written in {write_s:.1f} s",
              flush=True)
        pairs = []
        for r in range(args.repeats):
            print(f"[{r + 1}/{args.repeats}] (s) the slide, as `appliance triage` reads it ...", flush=True)
            s = in_child(_slide_child, str(path), args.tile_size)
            print(f"    {s['wall_s']:.1f} s, {s['patches']} tissue patches, {s['patches'] / s['wall_s']:.0f} patches/s",
                  flush=True)
            print(f"[{r + 1}/{args.repeats}] (r) R1 end to end ...", flush=True)
            a = run_pipeline(folder, False)
            rp = len(a["patches"]) / a["wall_s"]
            print(f"    {a['wall_s']:.1f} s, {len(a['patches'])} tissue patches, {rp:.0f} patches/s", flush=True)
            pairs.append((s, a))

    def ratio(pair) -> float:
        s, a = pair
        return (s["patches"] / s["wall_s"]) / (len(a["patches"]) / a["wall_s"])

    ratios = [ratio(p) for p in pairs]
    s, a = sorted(pairs, key=ratio)[len(pairs) // 2]
    r1_pps = len(a["patches"]) / a["wall_s"]
    res = {
        "slide": {"source": args.source, "width": width, "height": height, "mpp": args.mpp,
                  "file_mb": round(size_mb, 1), "write_s": round(write_s, 2), "upsample": args.upsample,
                  "grid": args.grid if args.source == "demo" else None,
                  "level_read": s["level"], "level_mpp": s["level_mpp"], "level_size": s["level_size"]},
        "tiles": s["tiles"], "patches": s["patches"], "wall_s": round(s["wall_s"], 2),
        "tiles_per_s": round(s["tiles"] / s["wall_s"], 1), "patches_per_s": round(s["patches"] / s["wall_s"], 1),
        "first_patch_s": None if s["first_patch_s"] is None else round(s["first_patch_s"], 3),
        "peak_rss_mb": round(s["peak_rss_mb"], 1), "verdict": s["verdict"], "score": s["score"],
        "r1": {"tiles": TILES, "patches": len(a["patches"]), "wall_s": round(a["wall_s"], 2),
               "patches_per_s": round(r1_pps, 1)},
        "ratio_to_r1": round(ratio((s, a)), 3), "ratios_all": [round(x, 3) for x in ratios],
    }
    print()
    print(f"read level {s['level']} at {s['level_mpp']:g} um/px ({s['level_size'][0]} x {s['level_size'][1]} px), "
          f"{args.tile_size} px tiles")
    print(f"  {'':<22} {'tiles':>6} {'patches':>8} {'wall s':>7} {'tiles/s':>8} {'patches/s':>10} "
          f"{'1st patch s':>12} {'peak RSS MB':>12}")
    print(f"  {'(s) slide':<22} {s['tiles']:>6} {s['patches']:>8} {res['wall_s']:>7} {res['tiles_per_s']:>8} "
          f"{res['patches_per_s']:>10} {res['first_patch_s']!s:>12} {res['peak_rss_mb']:>12}")
    print(f"  {'(r) R1':<22} {TILES:>6} {len(a['patches']):>8} {a['wall_s']:>7.2f} {TILES / a['wall_s']:>8.1f} "
          f"{r1_pps:>10.1f} {'':>12} {a['peak_rss_mb']:>12.1f}")
    print(f"  slide patches/s over R1's: {res['ratio_to_r1']:.3f}   target >= 0.8   "
          f"(median of {len(pairs)} back-to-back pairs: {', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"  verdict {s['verdict']} ({s['score']:.3f})")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
