"""Do the calls change when a 40x scan's JPEG tiles are decoded at 1/8 for the model (issue 39)?

For the bundled demo case and every complete development slide (reassembled from ../shared/data, as
bench/r1.py does), at the model's own 4 um/px and as a scanner at 0.25 um/px would send it (each 64 x 64
model-pixel window upsampled with a fixed seed of sensor noise to a 1024-px tile, JPEG quality 80;
appliance/offline/scans.py), three calls through TriageSession with the shipped model:
  4um      the slide's own pixels in 450-px tiles (what the demo streams)
  full     the 40x JPEG tiles decoded at full size, then resampled (the path before issue 39)
  reduced  the same JPEG tiles decoded at 1/8 by libjpeg's DCT scaling, then resampled (the daemon's path now)
and whether the call (verdict and reasons) and the score agree. "reduced vs full" is what the reduced decode
changes; "40x vs 4um" is what JPEG and the upsampling change, for scale.

    python bench/scan_calls.py [--limit N] [--json bench/results/scan_calls.json]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.model.engine import load_engine  # noqa: E402
from appliance.offline.demo import DEMO_CASE  # noqa: E402
from appliance.offline.scans import MODEL_MPP, SCANNER_MPP, jpeg, upsampled  # noqa: E402
from appliance.pipeline import TriageSession  # noqa: E402
from r1 import DATA, MODEL_DIR, complete_slides  # noqa: E402
from report import write_json  # noqa: E402

TILE = 1024


def scanned(slide: np.ndarray, seed: int) -> tuple[list[tuple[int, int, bytes]], int, int]:
    """The slide as 40x JPEG tiles: (x, y, jpeg) in scanner pixels, and the scan's width and height."""
    factor = round(MODEL_MPP / SCANNER_MPP["40x"])
    m = TILE // factor
    h, w = slide.shape[:2]
    jobs = [(x, y) for y in range(0, h, m) for x in range(0, w, m)]

    def one(job):
        x, y = job
        region = slide[y:y + m, x:x + m]
        return x * factor, y * factor, jpeg(upsampled(region, factor, seed=seed * 100_003 + y * 1009 + x))

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, jobs)), w * factor, h * factor


def call(engine, tiles, mpp: float, width: int, height: int, add) -> dict:
    session = TriageSession(engine, batch_size=32, scanner_mpp=mpp, width=width, height=height)
    try:
        for x, y, data in tiles:
            add(session, x, y, data)
        r = session.finish()
    finally:
        session.close()
    return {"verdict": str(r.verdict), "score": round(r.score, 4), "reasons": sorted(x.code for x in r.reasons),
            "patches": len(r.patches)}


def full_decode(session, x, y, data):
    session.add_tile(x, y, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=0, help="only the first N development slides")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scan_calls.json")
    args = ap.parse_args(argv)
    engine = load_engine(MODEL_DIR, "openvino")
    slides = [("demo (10253)", tifffile.imread(DEMO_CASE))]
    for n, (pid, img) in enumerate(complete_slides(DATA)):
        if args.limit and n >= args.limit:
            break
        slides.append((pid, img))
    rows = []
    print(f"{'slide':<14}{'4um':>22}{'40x full':>22}{'40x reduced':>22}  same call", flush=True)
    for i, (name, img) in enumerate(slides):
        t = time.perf_counter()
        h, w = img.shape[:2]
        own = [(x, y, np.ascontiguousarray(img[y:y + 450, x:x + 450])) for y in range(0, h, 450)
               for x in range(0, w, 450)]
        at4 = call(engine, own, MODEL_MPP, w, h, lambda s, x, y, px: s.add_tile(x, y, px))
        tiles, sw, sh = scanned(img, seed=i)
        full = call(engine, tiles, SCANNER_MPP["40x"], sw, sh, full_decode)
        reduced = call(engine, tiles, SCANNER_MPP["40x"], sw, sh, lambda s, x, y, d: s.add_jpeg(x, y, d))
        same = (reduced["verdict"], reduced["reasons"]) == (full["verdict"], full["reasons"])
        rows.append({"slide": name, "4um": at4, "full": full, "reduced": reduced, "reduced_same_call_as_full": same,
                     "reduced_minus_full": round(reduced["score"] - full["score"], 4),
                     "reduced_same_call_as_4um": (reduced["verdict"], reduced["reasons"]) == (at4["verdict"],
                                                                                             at4["reasons"])})

        def cell(c):
            return f"{c['verdict'][:10]} {c['score']:.3f}{'*' if c['reasons'] else ''}"

        print(f"{name:<14}{cell(at4):>22}{cell(full):>22}{cell(reduced):>22}  {'yes' if same else 'NO'}"
              f"   ({len(tiles)} tiles, {time.perf_counter() - t:.0f} s)", flush=True)
    diffs = [abs(r["reduced_minus_full"]) for r in rows]
    res = {"slides": len(rows), "reduced_same_call_as_full": sum(r["reduced_same_call_as_full"] for r in rows),
           "reduced_same_call_as_4um": sum(r["reduced_same_call_as_4um"] for r in rows),
           "max_abs_score_change": max(diffs), "mean_abs_score_change": round(float(np.mean(diffs)), 4),
           "rows": rows, "note": "* = with a cannot-call or QC reason; scores are the case rule's"}
    print(f"\nreduced vs full decode: same call on {res['reduced_same_call_as_full']}/{len(rows)} slides; score change "
          f"max {res['max_abs_score_change']:.4f}, mean {res['mean_abs_score_change']:.4f}. "
          f"40x (reduced) vs 4 um: same call on {res['reduced_same_call_as_4um']}/{len(rows)}")
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
