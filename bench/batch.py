"""`appliance batch` throughput: the same set of real-tissue cases with 1 and 2 workers of the embedded
LocalCluster, in the same run.

The set: N whole copies of the bundled case (IDC patient 10253, 2,500 x 2,000 px at 4 µm/px), each turned
or flipped so each has its own bytes (and so its own case), written to a temporary folder as TIFF. Each
worker count gets a fresh case store, so nothing is skipped. Prints slides/hour, the scaling efficiency
(slides/hour with 2 workers / (2 x with 1)) and each worker process's peak RSS, and writes JSON.

    python bench/batch.py [--slides 12] [--workers 1,2] [--threads N] [--json bench/results/batch.json]

With --threads 1 every worker has one core, so 1 -> 2 workers is the scaling a lab gets per added core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from report import write_json  # noqa: E402  (bench/ is the script's folder)


def worker_peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--threads", type=int, default=0,
                    help="OpenVINO threads per worker (default: the cores shared out, as appliance batch does)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import tifffile
    from appliance.config import load_settings
    from appliance.offline.batch import BatchInput, connect, run_batch
    from appliance.offline.demo import DEMO_CASE

    image = tifffile.imread(DEMO_CASE)
    turns = [lambda a: a, np.fliplr, np.flipud, lambda a: a[::-1, ::-1]]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        inputs = []
        for i in range(args.slides):
            p = Path(tmp) / f"case{i}.tif"
            pic = turns[i % 4](image)
            if i >= 4:  # beyond the four turns: shift by a few pixels, still the same tissue
                pic = np.roll(pic, 7 * (i // 4), axis=1)
            tifffile.imwrite(p, np.ascontiguousarray(pic))
            inputs.append(BatchInput(p))
        for n in (int(w) for w in args.workers.split(",")):
            settings = load_settings(None, data_dir=Path(tmp) / f"var-{n}")
            with connect(workers=n) as (client, shared):
                threads = args.threads or shared
                print(f"{n} worker(s), {threads} OpenVINO thread(s) each ...", flush=True)
                client.run(lambda: None)  # workers up
                t0 = time.perf_counter()
                rows = run_batch(inputs, settings, client, threads=threads)
                wall = time.perf_counter() - t0
                rss = sorted(client.run(worker_peak_rss_mb).values())
            done = sum(r.status == "done" for r in rows)
            results.append({"workers": n, "threads_per_worker": threads, "slides": done, "wall_s": round(wall, 2),
                            "slides_per_hour": round(done / wall * 3600), "worker_peak_rss_mb": [round(r) for r in rss]})
            print(f"    {done} slides in {wall:.1f} s", flush=True)
    base = results[0]["slides_per_hour"] / results[0]["workers"]
    for r in results:
        r["scaling_efficiency"] = round(r["slides_per_hour"] / (base * r["workers"]), 3)
    print()
    print(f"{args.slides} cases of 2,500 x 2,000 px real tissue (the bundled case, turned)")
    print(f"  {'workers':>7} {'wall s':>7} {'slides/h':>9} {'efficiency':>10}  peak RSS per worker MB")
    for r in results:
        print(f"  {r['workers']:>7} {r['wall_s']:>7} {r['slides_per_hour']:>9} {r['scaling_efficiency']:>10}  "
              f"{', '.join(map(str, r['worker_peak_rss_mb']))}")
    write_json(args.json, {"slides": args.slides, "runs": results, "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
