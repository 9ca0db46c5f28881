"""The out-of-distribution gate's cost on workload R1: the model's pooled features read out beside each
probability, and each patch's distance to the development reference, against inference alone.

R1's tiles (bench/r1.py builds them once) are cut into the model's 50x50 patches on its stride grid and the
tissue ones kept. In one run, alternating, each pass goes over all of them in batches of 128 through the
engine's asynchronous scorer, as the pipeline submits them (min of --repeats):
  (plain) the shipped INT8 model as it is: probabilities only (the engine loaded without the manifest's gate);
  (gate)  the same model as the appliance loads it: the features added as outputs, read with each
          probability, and each patch's distance to the development reference (appliance.model.ood).
The cost is gate over plain; the distances alone (numpy, on the caller's thread) are timed too.

    python bench/ood.py [--json bench/results/ood.json] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
from r1 import DATA, MODEL_DIR, r1_tiles  # noqa: E402  (bench/ is the script's folder)
from report import write_json  # noqa: E402


def r1_patches(folder: Path, size: int = 50, min_tissue: float = 0.25) -> np.ndarray:
    from appliance.pipeline.tissue import tissue_fraction

    out = []
    for p in sorted(folder.glob("*.npy")):
        tile = np.load(p)
        for y in range(0, tile.shape[0] - size + 1, size):
            for x in range(0, tile.shape[1] - size + 1, size):
                patch = tile[y : y + size, x : x + size]
                if tissue_fraction(patch) >= min_tissue:
                    out.append(patch)
    return np.ascontiguousarray(np.stack(out))


def timed(engine, patches, batch: int = 128) -> float:
    scorer = engine.scorer()
    t0 = time.perf_counter()
    for i in range(0, len(patches), batch):
        scorer.submit(patches[i : i + batch], i)
        scorer.done()
    scorer.wait()
    scorer.close()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from appliance.model.engine import OpenVINOEngine, load_engine

    patches = r1_patches(r1_tiles(DATA))
    gate = load_engine(MODEL_DIR, "openvino")
    if not gate.has_ood:
        raise SystemExit(f"{MODEL_DIR} has no OOD gate (manifest 'ood'): nothing to measure")
    plain = OpenVINOEngine(MODEL_DIR, gate.manifest.model_copy(update={"ood": None}))
    runs = {"plain": plain, "gate": gate}
    times: dict[str, list[float]] = {k: [] for k in runs}
    features = np.random.default_rng(0).normal(size=(len(patches), gate.ood_reference.features)).astype(np.float32)
    distances = []
    for _ in range(args.repeats):
        for name, engine in runs.items():
            times[name].append(timed(engine, patches))
        t0 = time.perf_counter()
        for i in range(0, len(features), 128):
            gate.ood_reference.distances(features[i : i + 128])
        distances.append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    cost = best["gate"] / best["plain"] - 1
    m = gate.manifest
    print(f"R1 patches: {len(patches)}; model {m.name} {m.version}; min of {args.repeats}")
    print("| pass | seconds | patches/s | vs plain |\n|---|---:|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.3f} | {len(patches) / v:,.0f} | {v / best['plain'] - 1:+.1%} |")
    print(f"distances alone, in batches of 128: {min(distances):.3f} s ({min(distances) / best['plain']:.1%} of plain)")
    print(f"OOD gate cost: {cost:+.1%} of R1's inference time (target <= 2%)")
    write_json(args.json, {"bench": "ood", "patches": len(patches), "repeats": args.repeats, "seconds": times,
                           "best_seconds": best, "cost_ratio": round(cost, 4), "distances_seconds": distances,
                           "python": platform.python_version(), "model": f"{m.name} {m.version}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
