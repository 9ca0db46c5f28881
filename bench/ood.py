"""The out-of-distribution gate's cost on workload R1: the model's pooled features read out beside each
probability, and each patch's distance to the development reference, against inference alone.

R1's tiles (bench/r1.py builds them once) are cut into the model's 50x50 patches on its stride grid, the
tissue ones kept, and in one run, alternating, each pass over all of them in batches of 128 (min of
--repeats):
  (0) plain: the shipped INT8 IR as it is, compiled as the appliance compiles it, probabilities only;
  (1) features: the same IR with the features added as outputs (what the appliance compiles when the model
      has the gate), probabilities only read;
  (2) gate: the appliance's engine.score: probabilities, features and distances (appliance.model.ood).
The cost is (2) over (0).

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


def timed(fn, patches, batch: int = 128) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(patches), 8 * batch):  # the engine splits a call over its requests, 128 patches each
        fn(patches[i : i + 8 * batch])
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import openvino as ov

    from appliance.model.engine import load_engine

    patches = r1_patches(r1_tiles(DATA))
    engine = load_engine(MODEL_DIR, "openvino")
    if not engine.has_ood:
        raise SystemExit(f"{MODEL_DIR} has no OOD gate (manifest 'ood'): nothing to measure")
    core = ov.Core()
    plain = core.compile_model(core.read_model(str(MODEL_DIR / engine.manifest.files.openvino)), "CPU",
                               {"PERFORMANCE_HINT": "THROUGHPUT"})
    requests = [plain.create_infer_request() for _ in range(engine.jobs)]

    def run_plain(batch):
        chunks = [batch[i : i + 128] for i in range(0, len(batch), 128)]
        for start in range(0, len(chunks), len(requests)):
            group = list(zip(requests, chunks[start : start + len(requests)]))
            for req, chunk in group:
                req.start_async({0: chunk})
            for req, _ in group:
                req.wait()
                req.get_output_tensor(0).data.copy()

    runs = {"plain": run_plain, "features": engine.infer, "gate": engine.score}
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, patches))
    best = {k: min(v) for k, v in times.items()}
    cost = best["gate"] / best["plain"] - 1
    print(f"R1 patches: {len(patches)}; model {engine.manifest.name} {engine.manifest.version}; min of {args.repeats}")
    print(f"| pass | seconds | patches/s | vs plain |\n|---|---:|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:.3f} | {len(patches) / v:,.0f} | {v / best['plain'] - 1:+.1%} |")
    print(f"OOD gate cost: {cost:+.1%} of R1's inference time (target <= 2%)")
    write_json(args.json, {"bench": "ood", "patches": len(patches), "repeats": args.repeats, "seconds": times,
                           "best_seconds": best, "cost_ratio": round(cost, 4), "python": platform.python_version(),
                           "model": f"{engine.manifest.name} {engine.manifest.version}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
