"""The steps after the fold members are trained that set how the appliance decides: the context stage
(stacked out of fold, fitted, exported, checked), the case rule and its threshold on out-of-fold bags, the
stain limit from the stain-shift curve, and the shipped context stage on the reserved patients."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .context import RINGS, apply_context, export_context, fit_context, to_grid
from .data import RESERVED
from .export import ov_predict
from .log import log
from .metrics import (CASE_MIN_SENSITIVITY, TOP_K, auc, best_balanced_accuracy_threshold, sensitivity_first_threshold,
                      summary)
from .split import K_FOLDS
from .stacking import (MONOTONE_RULES, bag_scores, choose_case_rule, context_training_set, patient_cells, rule_aucs,
                       slide_dice, stack_out_of_fold)
from .stainshift import ANGLES, MAX_AUC_DROP, limit_from_curve, patient_fits, qc_stain_angles, shift_curve


def per_fold_auc(d, p):
    return [round(auc(d.labels[d.in_fold(k)], p[d.in_fold(k)]), 4) for k in range(K_FOLDS)]


def _patch_figures(d, p) -> dict:
    dev = d.dev
    per = per_fold_auc(d, p)
    return {"per_fold_auc": per, "auc_mean_sd": summary(per), "pooled_auc": round(auc(d.labels[dev], p[dev]), 4)}


def context_stage(d, p_oof0, p_oof_int8, thr, out: Path, core) -> dict:
    """Fit, check and export the context stage (idc_build/context.py).

    Out of fold first: for each fold, a stage fitted on the other folds' out-of-fold outputs, applied to the
    held fold; on the FP32 members (for comparing recipes) and on the INT8 members (what ships). Trained on
    complete slides only, or on every development patient, whichever gives the higher pooled out-of-fold AUC
    on INT8. The shipped stage is then fitted on all development patients' out-of-fold INT8 outputs of that
    set and exported (ONNX, OpenVINO IR), and the exported graph is checked against the torch module."""
    import openvino as ov

    t0 = time.time()
    cell_map = patient_cells(d.patients, d.xs, d.ys)
    slides = sorted(p for p in d.fold_of if d.complete[p])
    metrics = {"rings": RINGS, "complete_slides": len(slides)}
    refined = {}
    for name, p in (("fp32", p_oof0), ("int8", p_oof_int8)):
        t1 = best_balanced_accuracy_threshold(d.labels[d.dev], p[d.dev])
        metrics[f"first_stage_{name}"] = {**_patch_figures(d, p), "threshold": t1,
                                          "dice": slide_dice(cell_map, p, d.labels, t1, slides)}
        for train_on in ("complete", "all"):
            q, params = stack_out_of_fold(cell_map, p, d.labels, d.fold_of, d.complete, K_FOLDS, train_on)
            t2 = best_balanced_accuracy_threshold(d.labels[d.dev], q[d.dev])
            metrics[f"context_{train_on}_{name}"] = {**_patch_figures(d, q), "threshold": t2,
                                                     "dice": slide_dice(cell_map, q, d.labels, t2, slides)}
            refined[(name, train_on)] = (q, params, t2)
            log(f"context stage ({name}, trained on {train_on}): pooled OOF AUC "
                f"{metrics[f'first_stage_{name}']['pooled_auc']} -> {metrics[f'context_{train_on}_{name}']['pooled_auc']}, "
                f"Dice {metrics[f'first_stage_{name}']['dice']['mean']} -> "
                f"{metrics[f'context_{train_on}_{name}']['dice']['mean']}")
    train_on = max(("complete", "all"), key=lambda t: (metrics[f"context_{t}_int8"]["pooled_auc"], t == "complete"))
    q, fold_params, patch_thr = refined[("int8", train_on)]
    pids = [p for p in sorted(d.fold_of) if train_on == "all" or d.complete[p]]
    params = fit_context(*context_training_set(cell_map, p_oof_int8, d.labels, pids))
    export_context(params, out / "context.onnx")
    ov.save_model(ov.convert_model(str(out / "context.onnx")), str(out / "context.xml"), compress_to_fp16=False)
    compiled = core.compile_model(core.read_model(str(out / "context.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    worst = 0.0
    for p in slides[:5]:
        idx, gx, gy = cell_map[p]
        ov_out = np.asarray(compiled({0: to_grid(gx, gy, p_oof_int8[idx])})[0])[0, 0][gy, gx]
        worst = max(worst, float(np.abs(ov_out - apply_context(params, gx, gy, p_oof_int8[idx])).max()))
    assert worst < 1e-4, f"exported context stage differs from the torch module by {worst}"
    metrics.update({
        "trained_on": train_on,
        "rule": "trained on the complete slides' out-of-fold first-stage outputs, unless training on every "
                "development patient gives a higher pooled out-of-fold AUC (INT8): chose " + train_on,
        "shipped_weights": {"mu": np.round(params[0], 6).tolist(), "sd": np.round(params[1], 6).tolist(),
                            "weight": np.round(params[2], 6).tolist(), "bias": round(params[3], 6)},
        "max_abs_diff_openvino_vs_torch": float(f"{worst:.2e}"), "seconds": round(time.time() - t0, 1)})
    return {"metrics": metrics, "patch_threshold": patch_thr, "refined_oof": q, "fold_params": fold_params,
            "cell_map": cell_map}


def reserved_context_check(d, out: Path, core, context, rule, case_thr, region_thr) -> dict:
    """The shipped graph (INT8) and context stage on the reserved patients (never trained on): patch AUC and
    Dice before and after the context stage, and the case score under the chosen rule."""
    from appliance.pipeline.mil import case_score

    int8_c = core.compile_model(core.read_model(str(out / "model.int8.xml")), "CPU")
    ctx_c = core.compile_model(core.read_model(str(out / "context.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = {}
    for pid in RESERVED:
        idx, gx, gy = context["cell_map"][pid]
        p1 = ov_predict(int8_c, d.images[idx]).astype(np.float64)
        p2 = np.asarray(ctx_c({0: to_grid(gx, gy, p1)})[0])[0, 0][gy, gx].astype(np.float64)
        y = d.labels[idx]

        def dice(p, t):
            pred, truth = p >= t, y == 1
            return round(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())), 4)

        score = case_score(rule["case_rule"], rule["top_k"], region_thr, gx, gy, p1)
        res[str(pid)] = {"patches": int(len(idx)), "idc_patches": int(y.sum()),
                         "auc_first_stage": round(auc(y, p1), 4), "auc_refined": round(auc(y, p2), 4),
                         "dice_first_stage": dice(p1, region_thr), "dice_refined": dice(p2, context["patch_threshold"]),
                         "case_score": round(score, 4), "flagged": bool(score >= case_thr)}
    log(f"reserved patients, shipped graph + context stage: {res}")
    return res


def case_rule_step(d, context: dict, p_oof_int8, region_thr):
    """Bag AUC of every case rule on out-of-fold INT8 probabilities; the chosen rule and its threshold."""
    patients = sorted(d.fold_of)
    yb, scores = bag_scores(context["cell_map"], p_oof_int8, d.labels, patients, d.fold_of, context["fold_params"],
                            region_thr, context["patch_threshold"], k=TOP_K)
    (manifest_rule, k), key, t, chosen = choose_case_rule(yb, scores, CASE_MIN_SENSITIVITY)
    aucs = rule_aucs(yb, scores)
    log(f"bag AUC per rule ({len(yb)} bags, {int(yb.sum())} positive): {aucs}; chose {manifest_rule}, threshold {t} "
        f"(sensitivity {chosen['sensitivity']}, specificity {chosen['specificity']})")
    top = scores["top15"]
    t_top = sensitivity_first_threshold(top, yb, CASE_MIN_SENSITIVITY)
    rule = {"bag_auc": aucs, "bags": int(len(yb)), "positive_bags": int(yb.sum()),
            "monotone_rules": sorted(MONOTONE_RULES), "choice": key, "case_rule": manifest_rule,
            "top_k": k or TOP_K,
            "chosen": chosen,
            "top15_at_same_sensitivity_rule": {"threshold": t_top,
                                               "sensitivity": round(float((top[yb == 1] >= t_top).mean()), 4),
                                               "specificity": round(float((top[yb == 0] < t_top).mean()), 4)}}
    return rule, t, chosen


def stain_limit_step(d, work: Path, core, stain_ref) -> dict:
    """The stain-shift curve of the fold members (FP32, no TTA) and the stain-out-of-range limit from it; then
    every development patient through the appliance's QC with that limit (none may be refused)."""
    t0 = time.time()
    dev = d.dev
    images, labels, patients, folds = d.images[dev], d.labels[dev], d.patients[dev], d.fold[dev]
    members = [core.compile_model(core.read_model(str(work / f"fold{k}.notta.onnx")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"}) for k in range(K_FOLDS)]
    fits, fallback = patient_fits(images, patients, stain_ref)
    rows = shift_curve(images, labels, patients, folds, lambda k, x: ov_predict(members[k], x), fits, ANGLES, log)
    limit, crossed = limit_from_curve(rows)
    angles = qc_stain_angles(d.images, d.patients, sorted(d.fold_of), stain_ref)
    judged = {p: a for p, a in angles.items() if a is not None}
    refused = sorted(p for p, a in judged.items() if max(a) > limit)
    worst = max((max(a) for a in judged.values()), default=0.0)
    log(f"stain limit {limit} deg ({'AUC fell by more than' if crossed else 'AUC never fell by'} {MAX_AUC_DROP}); "
        f"{len(judged)} development patients judged by the QC, worst {worst:.1f} deg, refused {refused}")
    return {"limit_deg": limit, "crossed": crossed, "max_auc_drop": MAX_AUC_DROP, "curve": rows,
            "rule": f"the haematoxylin vector of each development patient turned in the H&E plane away from eosin "
                    f"(models/tools/idc_build/stainshift.py); limit = the angle where the pooled out-of-fold AUC "
                    f"of the fold members falls by more than {MAX_AUC_DROP} from the unturned data (linear "
                    f"interpolation, rounded down to 0.5 deg)" + ("" if crossed else
                    f"; it did not fall that far up to {ANGLES[-1]} deg, so the limit is the largest angle measured"),
            "development_patients_judged": len(judged), "development_patients_refused": refused,
            "development_worst_angle_deg": round(worst, 2), "patients_fitted_with_reference": fallback,
            "seconds": round(time.time() - t0, 1)}
