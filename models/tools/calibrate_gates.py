#!/usr/bin/env python3
"""Set a built model's shift gates from its development slides (idc_build/gates.py): the stain limit in the
QC's own reading, and the out-of-distribution reference (ood_reference.npz) and limit. Writes them into the
manifest (``stain.max_angle_deg``, ``ood``, ``metrics.shift_gates``) and re-renders the model card; every
measured item goes to <model-dir>/work/gates.json (--reuse-measured reads it back instead of measuring again).

Run after the build, before drift_reference.py (the Makefile does):
    python models/tools/calibrate_gates.py --data ../shared/data/idc_breast_histopathology --model-dir models/idc-resnet

FOR RESEARCH AND TRIAGE ONLY, NOT FOR DIAGNOSIS.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from appliance.model.ood import OodReference, case_score, fit_reference
from appliance.pipeline.shifts import SHIFTS
from appliance.pipeline.stain import StainFit
from idc_build.card import write_card
from idc_build.dataset import load_data
from idc_build.deciding import int8_members
from idc_build.export import ov_predict
from idc_build.gates import (FALL, HOLD, MAX_REFUSED_HOLDING, OOD_COMPONENTS, TURNS, feature_model, measure, ood_limit, outcomes,
                             pooled_feature_names, roc, rules_hold, shipped_features, stain_limit)
from idc_build.log import log
from idc_build.stainshift import patient_fits

OOD_FILE = "ood_reference.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="the build's work folder (default <model-dir>/work)")
    ap.add_argument("--reuse-measured", action="store_true", help="decide from work/gates.json, measure nothing")
    args = ap.parse_args()
    t0 = time.time()
    import onnx
    import openvino as ov

    model_dir, work = args.model_dir, args.work or args.model_dir / "work"
    path = model_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    names = pooled_feature_names(onnx.load(str(model_dir / manifest["files"]["onnx"])))
    measured = work / "gates.json"
    if args.reuse_measured:
        saved = json.loads(measured.read_text())
        curves, items, reserved = saved["curves"], saved["items"], saved["reserved_ood"]
        reference = OodReference.from_bytes((model_dir / OOD_FILE).read_bytes())
    else:
        d = load_data(args.data, manifest["training"]["seed"])
        core = ov.Core()
        members = int8_members(work, core)
        compiled = feature_model(core, model_dir / manifest["files"]["openvino"], names)

        def features_of(x):
            return shipped_features(compiled, names, x)

        dev_features = features_of(d.images[d.dev])
        reference = fit_reference(dev_features, OOD_COMPONENTS)
        (model_dir / OOD_FILE).write_bytes(reference.to_bytes())
        log(f"OOD reference: {dev_features.shape[1]} features of {len(dev_features)} development patches, "
            f"{OOD_COMPONENTS} components; development patches' median distance "
            f"{case_score(reference.distances(dev_features))}")
        reserved = {int(p): case_score(reference.distances(features_of(d.images[d.patients == p])))
                    for p in np.unique(d.patients[d.res])}
        stain_ref = StainFit.from_dict(manifest["stain"]["reference"])
        fits, _ = patient_fits(d.images[d.dev], d.patients[d.dev], stain_ref)
        slides = sorted(p for p in d.fold_of if d.complete[p])
        dec = manifest["decision"]
        curves, items = measure(d, slides, lambda k, x: ov_predict(members[k], x), features_of, reference,
                                stain_ref, fits, dec["case_threshold"], dec["top_k"], SHIFTS)
        measured.write_text(json.dumps({"curves": curves, "items": items, "reserved_ood": reserved}) + "\n")

    stain = stain_limit(curves, items)
    ood_max = ood_limit(curves, items, stain["limit_deg"])
    rows = outcomes(curves, items, stain["limit_deg"], ood_max)
    rules = rules_hold(rows)
    gates = {
        "turns_deg": list(TURNS), "shifts": list(curves), "hold": HOLD, "fall": FALL,
        "max_refused_where_holding": round(MAX_REFUSED_HOLDING, 4), "slides": len({i["slide"] for i in items}),
        "curves": curves, "stain_limit": stain, "ood_max_score": ood_max, "ood_components": OOD_COMPONENTS,
        "ood_roc": roc(items, curves), "outcomes": rows, "rules": rules,
        "reserved_patients_ood": {str(k): v for k, v in reserved.items()},
        "what": "complete development slides, out of fold (each slide's case score from the fold member that never "
                "saw it); the QC reads each slide with its patches as tiles; the OOD score from the shipped model",
    }
    manifest["stain"]["max_angle_deg"] = stain["limit_deg"]
    manifest["stain"]["limit_rule"] = (
        f"a QC reading, not a turn: three shifts re-colour every development patient (appliance/pipeline/shifts.py: "
        f"{', '.join(curves)}) at turns of {TURNS[0]}-{TURNS[-1]} deg. For each, the turn where the pooled "
        f"out-of-fold AUC of the fold members first falls by more than {HOLD} (interpolated) is mapped to the median "
        f"largest H/E angle the appliance's QC reads on the complete development slides at that turn; the limit is "
        f"the smallest over the shifts (the safe side), and never beyond the furthest reading validated (a shift that "
        f"never fell: the reading at most 1 slide in 7 exceeds at its last turn); rounded down to 0.5 deg "
        f"(models/tools/calibrate_gates.py)")
    manifest["ood"] = {
        "features": names, "file": OOD_FILE, "max_score": ood_max,
        "rule": f"the median over a case's patches of their Mahalanobis distance to the development patches' pooled "
                f"features ({OOD_COMPONENTS} principal components whitened plus the residual, divided by the feature "
                f"count); the limit is the smallest score that, with the stain and image gates, refuses at most 1 slide in 7 "
                f"at every shift and turn where the out-of-fold AUC holds within {HOLD} (where those gates alone "
                f"refuse more, the OOD score by itself at most 1 in 7; models/tools/calibrate_gates.py)"}
    manifest["sha256"][OOD_FILE] = hashlib.sha256((model_dir / OOD_FILE).read_bytes()).hexdigest()
    manifest.setdefault("metrics", {})["shift_gates"] = gates
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(model_dir)
    for r in rows:
        log(f"{r['shift']:>16} {r['turn_deg']:>2} deg: AUC {r['pooled_auc']:.4f} ({r['class']}), reading "
            f"{r['median_reading_deg']}, OOD {r['median_ood']}, refused {r['refused']}/{r['slides']} {r['refused_by']}, "
            f"called benign {r['tumour_slides_called_benign']}")
    log(f"stain limit {stain}; OOD limit {ood_max}; ROC AUC {gates['ood_roc']['auc']}; rules {rules}; "
        f"reserved patients' OOD {reserved}; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
