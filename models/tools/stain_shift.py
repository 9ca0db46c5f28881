"""Out-of-fold AUC against synthetic stain shifts: how far another lab's staining may drift before a model
built by `make model` loses its ranking, measured on development patients it never trained on.

Each development patient's patches are re-coloured as another lab's staining might look: the patient's own
Macenko stain fit (on all its patches; the model's stain reference when a patient has too little stained
tissue to fit) with the haematoxylin vector turned by an angle in the H&E plane, away from eosin, in optical
density, concentrations kept (`appliance.pipeline.stain.turn_haematoxylin`). Every patch is then scored by
the fold member that did not train on its patient (the build's `work/fold<k>.notta.onnx`, OpenVINO, true
FP32), and the pooled out-of-fold patch AUC is reported per angle. The 0 deg row must equal the build's own
out-of-fold AUC: a check that the folds and the scoring are the build's.

    python models/tools/stain_shift.py --data ../shared/data/idc_breast_histopathology \
        --model DIR [--angles 0,5,10,15,20,25,30] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


from appliance.pipeline.stain import StainFit
from idc_build.stainshift import ANGLES, limit_from_curve, own_fit_shift, patient_fits, shift_curve

PATCH, PAD_VALUE = 50, 255


def load_development(data: Path, model: Path):
    """Patches, labels, patient ids and fold of every development patient in the model's split.json."""
    split = json.loads((model / "split.json").read_text())
    fold_of = {int(p): k for k, ps in enumerate(split["folds"]) for p in ps}
    rows = sorted((r for r in csv.DictReader(open(data / "manifest.csv", newline=""))
                   if int(r["patient_id"]) in fold_of), key=lambda r: r["relpath"])
    images = np.full((len(rows), PATCH, PATCH, 3), PAD_VALUE, dtype=np.uint8)
    for i, r in enumerate(rows):
        with Image.open(data / r["relpath"]) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        images[i, : a.shape[0], : a.shape[1]] = a  # edge patches padded with glass, as at run time
    labels = np.array([int(r["label"]) for r in rows])
    patients = np.array([int(r["patient_id"]) for r in rows])
    folds = np.array([fold_of[p] for p in patients])
    return images, labels, patients, folds, len(split["folds"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--model", required=True, type=Path, help="a `make model` output folder with its work/")
    ap.add_argument("--angles", default=",".join(str(a) for a in ANGLES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import openvino as ov

    angles = [float(a) for a in args.angles.split(",")]
    manifest = json.loads((args.model / "manifest.json").read_text())
    reference = StainFit.from_dict(manifest["stain"]["reference"])
    t0 = time.time()
    images, labels, patients, folds, k = load_development(args.data, args.model)
    fits, fallback = patient_fits(images, patients, reference)
    print(f"{len(images)} development patches, {len(fits)} patients ({len(fallback)} fitted with the reference), "
          f"{k} folds; {time.time() - t0:.0f} s", flush=True)
    core = ov.Core()
    members = []
    for f in range(k):
        path = args.model / "work" / f"fold{f}.notta.onnx"
        if not path.exists():
            raise SystemExit(f"{path} missing: run `make model` (or build_idc_model.py --out {args.model}) first")
        members.append(core.compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}))

    def predict(f, x):
        req = members[f].create_infer_request()
        return np.concatenate([np.asarray(req.infer({0: x[i:i + 512]})[members[f].output(0)]).reshape(-1)
                               for i in range(0, len(x), 512)])

    rows = shift_curve(images, labels, patients, folds, predict, own_fit_shift(fits), angles,
                       log=lambda msg: print(msg, flush=True))
    base = rows[0]["pooled_auc"] if rows and rows[0]["angle_deg"] == 0 else None
    built = manifest.get("metrics", {}).get("cross_validation", {}).get("fp32_no_tta", {}).get("pooled", {})
    if base is not None and "auc" in built:
        same = abs(built["auc"] - base) < 5e-4
        print(f"0 deg against the build's own out-of-fold AUC {built['auc']:.4f}: "
              f"{'the same' if same else 'DIFFERENT: not the build these folds came from?'}")
        if not same:
            return 1
    if base is not None:
        limit, crossed = limit_from_curve(rows)
        print(f"limit from this curve: {limit} deg" + ("" if crossed else " (AUC never fell by more than 0.02)"))
    print("\n| H turned (deg) | pooled OOF AUC | change |\n|---:|---:|---:|")
    for r in rows:
        change = f"{r['pooled_auc'] - base:+.4f}" if base is not None else ""
        print(f"| {r['angle_deg']:.0f} | {r['pooled_auc']:.4f} | {change} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "how": __doc__.split("\n\n")[1].replace("\n", " "), "model": str(args.model),
            "model_version": manifest.get("version"), "patients": len(fits),
            "patients_fitted_with_reference": fallback, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
