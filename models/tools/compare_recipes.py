"""Compare two builds' recipes on the same patient folds: the 0.3.0 recipe (first stage, top-15 mean) and a
build with a context stage and a case rule. Writes the JSON the model card quotes (recipe_comparison.json).

Both builds' out-of-fold FP32 probabilities (work/ablation-default-fold<k>.npz) go through
evaluate_aggregation.evaluate, so each figure is computed the same way for both; "shipped" is what each recipe
ships: for the old one the first stage and top-15 mean, for the new one the context stage as its build chose
it (trained on complete slides or on all patients) and the case rule in its manifest. The stain-shift curve of
each build's fold members is measured here (idc_build/stainshift.py), unless --no-stain.

    .venv-train/bin/python models/tools/compare_recipes.py --data ../shared/data/idc_breast_histopathology \
        --old /tmp/baseline --new models/idc-resnet --json models/tools/recipe_comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

from evaluate_aggregation import evaluate


def rule_key(decision: dict) -> str:
    """The bag-score key (idc_build.stacking.bag_scores) of a manifest's case rule."""
    rule = decision.get("case_rule", "top-k-mean")
    if rule == "top-k-mean":
        return f"top{decision['top_k']}"
    return {"largest-region-area": "region_area", "largest-region-mass": "region_mass"}[rule]


def shipped_figures(res: dict, manifest: dict) -> dict:
    ctx = manifest.get("metrics", {}).get("context_stage")
    rule = rule_key(manifest["decision"])
    block = res[f"context_{ctx['trained_on']}"] if ctx else res["first_stage"]
    return {"stage": f"context ({ctx['trained_on']})" if ctx else "first stage", "case_rule": rule,
            "pooled_auc": block["pooled_auc"], "auc_mean": block["auc_mean_sd"]["mean"],
            "auc_sd": block["auc_mean_sd"]["sd"], "per_fold_auc": block["per_fold_auc"],
            "dice_mean": block["dice"]["mean"], "dice_slides": block["dice"]["slides"],
            "bag_auc": res["bags"]["auc"][rule]}


def stain_curve(data: Path, model: Path) -> list[dict]:
    import openvino as ov

    from appliance.pipeline.stain import StainFit
    from idc_build.stainshift import ANGLES, own_fit_shift, patient_fits, shift_curve
    from stain_shift import load_development

    manifest = json.loads((model / "manifest.json").read_text())
    images, labels, patients, folds, k = load_development(data, model)
    fits, _ = patient_fits(images, patients, StainFit.from_dict(manifest["stain"]["reference"]))
    core = ov.Core()
    members = [core.compile_model(core.read_model(str(model / "work" / f"fold{f}.notta.onnx")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"}) for f in range(k)]

    def predict(f, x):
        req = members[f].create_infer_request()
        return np.concatenate([np.asarray(req.infer({0: x[i:i + 512]})[members[f].output(0)]).reshape(-1)
                               for i in range(0, len(x), 512)])

    return shift_curve(images, labels, patients, folds, predict, own_fit_shift(fits), ANGLES, log=lambda m: print(m, flush=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--old", type=Path, required=True, help="a build of the 0.3.0 recipe (with its work/)")
    ap.add_argument("--new", type=Path, required=True, help="a build with a context stage (with its work/)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-stain", action="store_true")
    ap.add_argument("--old-stain", type=Path, default=None,
                    help="the old build's curve from stain_shift.py --json (else measured here); the new build's "
                         "is taken from its manifest when it has one")
    args = ap.parse_args(argv)
    out = {"how": "Out-of-fold on the same patient folds (split.json of both builds must match), FP32 members "
                  "without TTA (OpenVINO): patch AUC, region Dice on complete development slides (threshold = "
                  "best balanced accuracy of the same probabilities) and bag AUC (each development patient, and "
                  "each patient with IDC again without its IDC patches); models/tools/compare_recipes.py"}
    for name, model in (("old", args.old), ("new", args.new)):
        res = evaluate(args.data, model)
        manifest = json.loads((model / "manifest.json").read_text())
        out[name] = {"model": str(model), "version": manifest["version"],
                     "first_stage": {"pooled_auc": res["first_stage"]["pooled_auc"],
                                     "per_fold_auc": res["first_stage"]["per_fold_auc"],
                                     "dice_mean": res["first_stage"]["dice"]["mean"]},
                     "shipped": shipped_figures(res, manifest), "bag_auc_all_rules": res["bags"]["auc"],
                     "context_complete": res["context_complete"]["pooled_auc"],
                     "context_all": res["context_all"]["pooled_auc"]}
    a, b = (json.loads((m / "split.json").read_text())["folds"] for m in (args.old, args.new))
    if a != b:
        raise SystemExit("the two builds have different folds: not comparable")
    if not args.no_stain:
        old = (json.loads(args.old_stain.read_text())["rows"] if args.old_stain else stain_curve(args.data, args.old))
        new_manifest = json.loads((args.new / "manifest.json").read_text())
        new = new_manifest.get("metrics", {}).get("stain_shift", {}).get("curve") or stain_curve(args.data, args.new)
        if [r["angle_deg"] for r in old] != [r["angle_deg"] for r in new]:
            raise SystemExit("the two stain-shift curves were measured at different angles")
        out["stain_shift"] = {"old": old, "new": new}
    o, n = out["old"], out["new"]
    print(f"{'':<44}{'old':>8}{'new':>8}")
    print(f"{'pooled OOF patch AUC, first stage':<44}{o['first_stage']['pooled_auc']:>8.4f}{n['first_stage']['pooled_auc']:>8.4f}")
    for key in ("pooled_auc", "auc_mean", "dice_mean", "bag_auc"):
        print(f"{'shipped ' + key:<44}{o['shipped'][key]:>8.4f}{n['shipped'][key]:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
