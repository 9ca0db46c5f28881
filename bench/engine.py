"""Engine benchmark: patches/s for each inference engine on the same real patches, in one run.

Each engine runs in its own process (on 2 cores, OpenVINO, ONNX Runtime and torch thread pools fight
each other when they share one), on the same batch of real H&E patches cut from the bundled demo case.
Prints a table and writes JSON. Speeds are compared as ratios within this run only.

    python bench/engine.py [--json bench/results/engine.json] [--patches 4096] [--batch 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINES = ["openvino-int8", "openvino-int8-latency", "openvino-f32", "onnxruntime-fp32", "torch-eager-fp32"]


def real_patches(n: int):
    """n tissue patches (50x50 uint8 RGB) from the bundled demo case, repeated if needed."""
    import numpy as np
    import tifffile

    from appliance.pipeline.tissue import tissue_fraction

    img = tifffile.imread(ROOT / "appliance" / "offline" / "demo_case" / "idc-10253.tif")
    patches = [img[y:y + 50, x:x + 50] for y in range(0, img.shape[0] - 49, 50)
               for x in range(0, img.shape[1] - 49, 50)]
    patches = [p for p in patches if tissue_fraction(p) >= 0.25]
    reps = -(-n // len(patches))
    return np.ascontiguousarray(np.stack((patches * reps)[:n]))


def worker(engine: str, n: int, batch: int, repeats: int) -> dict:
    import numpy as np

    x = real_patches(n)
    model_dir = ROOT / "models" / "idc-resnet"
    t0 = time.perf_counter()
    if engine.startswith("openvino"):
        import openvino as ov

        from appliance.model.manifest import read_manifest, read_verified

        m = read_manifest(model_dir)
        core = ov.Core()
        if engine == "openvino-f32":
            model = core.read_model(model_dir / m.files.onnx)
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"}
        else:
            xml = read_verified(model_dir, m.files.openvino, m)
            w = read_verified(model_dir, m.files.openvino_weights, m)
            model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(w, dtype=np.uint8)))
            hint = "LATENCY" if engine.endswith("latency") else "THROUGHPUT"
            config = {"PERFORMANCE_HINT": hint}
        compiled = core.compile_model(model, "CPU", config)
        if config["PERFORMANCE_HINT"] == "THROUGHPUT":
            queue = ov.AsyncInferQueue(compiled)
            out = np.zeros(n, dtype=np.float32)

            def done(request, start):
                out[start:start + batch] = request.get_output_tensor(0).data[:, 0]

            queue.set_callback(done)

            def run():
                for s in range(0, n, batch):
                    queue.start_async({0: x[s:s + batch]}, userdata=s)
                queue.wait_all()
                return out
        else:
            req = compiled.create_infer_request()

            def run():
                return np.concatenate([req.infer({0: x[s:s + batch]})[0][:, 0].copy() for s in range(0, n, batch)])
    elif engine == "onnxruntime-fp32":
        from appliance.model.engine import load_engine

        eng = load_engine(model_dir, "onnxruntime")

        def run():
            return np.concatenate([eng.infer(x[s:s + batch]) for s in range(0, n, batch)])
    elif engine == "torch-eager-fp32":
        try:
            import torch
        except ImportError:
            return {"engine": engine, "skipped": "torch is not installed (it is only in the [train] extra)"}
        from idc_build.network import build_model
        meta = json.loads((model_dir / "manifest.json").read_text())["input"]
        ckpt = model_dir / "work" / "model.pt"
        state = torch.load(ckpt, map_location="cpu") if ckpt.exists() else None
        # the same graph as the shipped model: members, and TTA only if the build kept it
        tta = bool(state.get("tta", False)) if isinstance(state, dict) else json.loads(
            (model_dir / "manifest.json").read_text())["training"].get("tta", False)
        net = build_model(meta["mean"], meta["std"], tta=tta).eval()
        weights = "random (speed only)"
        if state is not None:
            try:
                net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
                weights = "trained checkpoint"
            except (RuntimeError, KeyError):
                pass
        torch.set_num_threads(2)

        def run():
            with torch.inference_mode():
                return np.concatenate([net(torch.from_numpy(x[s:s + batch]))[:, 0].numpy()
                                       for s in range(0, n, batch)])
    else:
        raise SystemExit(f"unknown engine {engine}")
    load_s = time.perf_counter() - t0
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        probs = run()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    result = {"engine": engine, "patches": n, "batch": batch, "repeats": repeats, "load_s": round(load_s, 3),
              "median_s": round(med, 4), "patches_per_s": round(n / med, 1),
              "mean_probability": round(float(np.mean(probs)), 5)}
    if engine == "torch-eager-fp32":
        result["weights"] = weights
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    ap.add_argument("--patches", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.patches, args.batch, args.repeats)))
        return
    rows = []
    for engine in args.engines.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", engine, "--patches", str(args.patches),
                               "--batch", str(args.batch), "--repeats", str(args.repeats)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"engine": engine, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["engine"] == "onnxruntime-fp32" and "patches_per_s" in r), None)
    print(f"{'engine':<24}{'patches/s':>11}{'x ORT FP32':>12}{'load s':>8}  note")
    for r in rows:
        if "patches_per_s" not in r:
            print(f"{r['engine']:<24}{'-':>11}{'-':>12}{'-':>8}  {r.get('skipped') or r.get('error')}")
            continue
        ratio = r["patches_per_s"] / ref["patches_per_s"] if ref else None
        r["ratio_vs_onnxruntime_fp32"] = round(ratio, 2) if ratio else None
        print(f"{r['engine']:<24}{r['patches_per_s']:>11.0f}{(f'{ratio:.2f}' if ratio else '-'):>12}"
              f"{r['load_s']:>8.2f}  {r.get('weights', '')}")
    out = {"benchmark": "engine", "machine": {"cpu_count": __import__("os").cpu_count(),
                                              "python": platform.python_version()},
           "patches": args.patches, "batch": args.batch, "results": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
