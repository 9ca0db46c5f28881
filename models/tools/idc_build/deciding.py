"""The steps after the fold members are trained that set how the appliance decides: the context stage
(stacked out of fold, fitted, exported, checked), the case rule and its threshold on out-of-fold bags, the
stain limit from the stain-shift curve, and the shipped context stage on the reserved patients."""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .context import RINGS, apply_context, export_context, fit_context, to_grid
from .data import MICRONS_PER_PIXEL, PATCH, RESERVED
from .errors import BuildCheckError
from .export import ov_predict
from .log import log
from .members import OutOfFold
from .metrics import CASE_MIN_SENSITIVITY, TOP_K, auc, best_balanced_accuracy_threshold, summary

from appliance.model.manifest import DecisionSpec  # noqa: E402
from appliance.pipeline.decision import whole_case_scores  # noqa: E402
from .split import K_FOLDS
from .robustness import shift_table
from .stacking import bag_scores, context_training_set, patient_cells, rule_aucs, slide_dice, stack_out_of_fold
from .corerules import (FINAL, auc_with_ci, choose_final_rule, combined_call, early_rule, operating_table,
                        rule_table, score_cores)
from .cores import CORE_CELLS, DIAGONAL_CELLS, DIRECTIONS, IDC_BINS, MIN_CORE_PATCHES, cut_all
from .stainshift import (ANGLES, MAX_AUC_DROP, judged_angles, limit_from_curve, own_fit_shift, patient_fits,
                         qc_stain_angles, rj_shift, shift_curve)


@dataclass(frozen=True)
class ContextStage:
    """The context stage as context_stage chose and fitted it, with what the later steps score cores and bags
    with: the stage fitted per fold on the other folds (each patient refined only by a stage that never saw it)
    and every patient's patch grid."""
    metrics: dict  # manifest["metrics"]["context_stage"]
    refined_threshold: float  # best balanced accuracy of the pooled out-of-fold refined INT8 probabilities
    refined_oof: np.ndarray  # those probabilities
    fold_params: list  # per fold: the stage fitted on the other folds' out-of-fold outputs
    cell_map: dict  # patient -> (patch indices, gx, gy) on its own grid


def per_fold_auc(d, p):
    return [round(auc(d.labels[d.in_fold(k)], p[d.in_fold(k)]), 4) for k in range(K_FOLDS)]


def _patch_figures(d, p) -> dict:
    dev = d.dev
    per = per_fold_auc(d, p)
    return {"per_fold_auc": per, "auc_mean_sd": summary(per), "pooled_auc": round(auc(d.labels[dev], p[dev]), 4)}


def context_stage(d, oof: OutOfFold, out: Path, core) -> ContextStage:
    """Fit, check and export the context stage (idc_build/context.py) on the members' out-of-fold probabilities.

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
    for name, p in (("fp32", oof.fp32), ("int8", oof.int8)):
        first_stage_threshold = best_balanced_accuracy_threshold(d.labels[d.dev], p[d.dev])
        metrics[f"first_stage_{name}"] = {**_patch_figures(d, p), "threshold": first_stage_threshold,
                                          "dice": slide_dice(cell_map, p, d.labels, first_stage_threshold, slides)}
        for train_on in ("complete", "all"):
            q, params = stack_out_of_fold(cell_map, p, d.labels, d.fold_of, d.complete, K_FOLDS, train_on)
            refined_threshold = best_balanced_accuracy_threshold(d.labels[d.dev], q[d.dev])
            metrics[f"context_{train_on}_{name}"] = {**_patch_figures(d, q), "threshold": refined_threshold,
                                                     "dice": slide_dice(cell_map, q, d.labels, refined_threshold,
                                                                        slides)}
            refined[(name, train_on)] = (q, params, refined_threshold)
            log(f"context stage ({name}, trained on {train_on}): pooled OOF AUC "
                f"{metrics[f'first_stage_{name}']['pooled_auc']} -> {metrics[f'context_{train_on}_{name}']['pooled_auc']}, "
                f"Dice {metrics[f'first_stage_{name}']['dice']['mean']} -> "
                f"{metrics[f'context_{train_on}_{name}']['dice']['mean']}")
    train_on = max(("complete", "all"), key=lambda t: (metrics[f"context_{t}_int8"]["pooled_auc"], t == "complete"))
    q, fold_params, refined_threshold = refined[("int8", train_on)]
    pids = [p for p in sorted(d.fold_of) if train_on == "all" or d.complete[p]]
    params = fit_context(*context_training_set(cell_map, oof.int8, d.labels, pids))
    export_context(params, out / "context.onnx")
    ov.save_model(ov.convert_model(str(out / "context.onnx")), str(out / "context.xml"), compress_to_fp16=False)
    compiled = core.compile_model(core.read_model(str(out / "context.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    worst = 0.0
    for p in slides[:5]:
        idx, gx, gy = cell_map[p]
        ov_out = np.asarray(compiled({0: to_grid(gx, gy, oof.int8[idx])})[0])[0, 0][gy, gx]
        worst = max(worst, float(np.abs(ov_out - apply_context(params, gx, gy, oof.int8[idx])).max()))
    if not worst < 1e-4:
        raise BuildCheckError(f"the exported context stage ({out / 'context.xml'}) differs from the torch module by "
                              f"{worst} (at most 1e-4 allowed)")
    metrics.update({
        "trained_on": train_on,
        "rule": "trained on the complete slides' out-of-fold first-stage outputs, unless training on every "
                "development patient gives a higher pooled out-of-fold AUC (INT8): chose " + train_on,
        "shipped_weights": {"mu": np.round(params[0], 6).tolist(), "sd": np.round(params[1], 6).tolist(),
                            "weight": np.round(params[2], 6).tolist(), "bias": round(params[3], 6)},
        "max_abs_diff_openvino_vs_torch": float(f"{worst:.2e}"), "seconds": round(time.time() - t0, 1)})
    return ContextStage(metrics=metrics, refined_threshold=refined_threshold, refined_oof=q, fold_params=fold_params,
                        cell_map=cell_map)


def grid_positions(cell_map, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every patch's grid cell (gx, gy) in its patient's grid, as arrays over all n patches."""
    gx_all, gy_all = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for idx, gx, gy in cell_map.values():
        gx_all[idx], gy_all[idx] = gx, gy
    return gx_all, gy_all


def reserved_context_check(d, out: Path, core, context: ContextStage, decision: dict,
                           first_stage_threshold: float) -> dict:
    """The shipped graph (INT8) and context stage on the reserved patients (never trained on): patch AUC and
    Dice before and after the context stage, the case's call under the shipped decision, and for the reserved
    complete slide (the demo case) the call on each of its virtual cores."""
    int8_c = core.compile_model(core.read_model(str(out / "model.int8.xml")), "CPU")
    ctx_c = core.compile_model(core.read_model(str(out / "context.xml")), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def refine(gx, gy, p1):
        return np.asarray(ctx_c({0: to_grid(gx - gx.min(), gy - gy.min(), p1)})[0])[0, 0][
            gy - gy.min(), gx - gx.min()].astype(np.float64)

    spec = DecisionSpec(patch_threshold=context.refined_threshold, region_threshold=first_stage_threshold, **decision)
    gx_all, gy_all = grid_positions(context.cell_map, len(d.labels))

    def called(gx, gy, p1, p2):
        """(final score, early score, suspicious) as the appliance's decision makes them."""
        final, early = whole_case_scores(spec, gx, gy, p1, p2)
        return final, early, bool(early >= spec.early_rule.threshold or final >= spec.case_threshold)

    res = {}
    for pid in RESERVED:
        idx, gx, gy = context.cell_map[pid]
        p1 = ov_predict(int8_c, d.images[idx]).astype(np.float64)
        p2 = refine(gx, gy, p1)
        y = d.labels[idx]

        def dice(p, t):
            pred, truth = p >= t, y == 1
            return round(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())), 4)

        final, early, flag = called(gx, gy, p1, p2)
        res[str(pid)] = {"patches": int(len(idx)), "idc_patches": int(y.sum()),
                         "auc_first_stage": round(auc(y, p1), 4), "auc_refined": round(auc(y, p2), 4),
                         "dice_first_stage": dice(p1, first_stage_threshold),
                         "dice_refined": dice(p2, context.refined_threshold),
                         "case_score": round(final, 4), "early_score": round(early, 4), "flagged": flag}
        if d.complete[pid]:
            cores, counts = cut_all([pid], context.cell_map, d.labels)
            p_all = np.full(len(d.labels), np.nan)
            p_all[idx] = p1
            calls = []
            for c in cores:
                cgx, cgy, q1 = gx_all[c.idx], gy_all[c.idx], p_all[c.idx]
                calls.append((c.label, called(cgx, cgy, q1, refine(cgx, cgy, q1))[2]))
            tp = sum(1 for lab, f in calls if lab and f)
            tn = sum(1 for lab, f in calls if not lab and not f)
            res[str(pid)]["virtual_cores"] = {**counts, "true_positive": tp, "true_negative": tn}
    log(f"reserved patients, shipped graph + context stage: {res}")
    return res


def case_rule_step(d, context: ContextStage, oof: OutOfFold, first_stage_threshold: float, decision: dict):
    """The bag proxy (idc_build/stacking.py), a second figure beside the virtual cores: bag AUC of every rule on
    out-of-fold INT8 probabilities, and the shipped decision's sensitivity and specificity on the bags."""
    patients = sorted(d.fold_of)
    yb, scores = bag_scores(context.cell_map, oof.int8, d.labels, patients, d.fold_of, context.fold_params,
                            first_stage_threshold, context.refined_threshold, k=TOP_K)
    aucs = rule_aucs(yb, scores)
    key = f"top{decision['top_k']}" + ("_refined" if decision["case_rule"] == "top-k-mean-refined" else "")
    early_key = f"top{decision['early']['top_k']}"
    flagged = (scores[key] >= decision["case_threshold"]) | (scores[early_key] >= decision["early"]["threshold"])
    shipped = {"rule": key, "bag_auc": aucs.get(key), "threshold": decision["case_threshold"],
               "sensitivity": round(float(flagged[yb == 1].mean()), 4),
               "specificity": round(float((~flagged[yb == 0]).mean()), 4),
               "positive_bags": int(yb.sum()), "negative_bags": int((yb == 0).sum())}
    log(f"bag proxy ({len(yb)} bags, {int(yb.sum())} positive): bag AUC per rule {aucs}; shipped decision {shipped}")
    rule = {"bag_auc": aucs, "bags": int(len(yb)), "positive_bags": int(yb.sum()), "shipped": shipped}
    return rule, shipped


def core_step(d, context: ContextStage, oof: OutOfFold, first_stage_threshold: float,
              work: Path | None = None) -> tuple[dict, dict]:
    """Virtual core biopsies of the complete development slides (idc_build/cores.py), scored out of fold on the
    fold members' INT8 probabilities: every rule's core AUC and specificity at its sensitivity-first threshold;
    the final rule (the best specificity there), its threshold, the early rule when the final rule is refined,
    the operating table and the shipped call, with patient-bootstrap CIs; every core with its label, IDC patch
    count and scores in work/virtual_cores.csv. Returns (metrics, decision)."""
    t0 = time.time()
    cell_map = context.cell_map
    slides = sorted(p for p in d.fold_of if d.complete[p])
    cores, counts = cut_all(slides, cell_map, d.labels)
    gx_all, gy_all = grid_positions(cell_map, len(d.labels))
    y = np.array([c.label for c in cores])
    patients = np.array([c.patient for c in cores])
    scores = score_cores(cores, gx_all, gy_all, oof.int8, d.fold_of, context.fold_params, first_stage_threshold,
                         context.refined_threshold)
    table = rule_table(scores, y, CASE_MIN_SENSITIVITY)
    final = choose_final_rule(table)
    case_rule, top_k = FINAL[final]
    case_thr = table[final]["threshold"]
    if case_rule == "top-k-mean":  # a first-stage rule never falls: the early positive is the rule itself
        early = {"rule": final, "case_rule": case_rule, "top_k": top_k, "threshold": case_thr,
                 "note": "the final rule is a first-stage top-k mean, which never falls as tiles arrive, so the "
                         "early positive is the same rule at the same threshold"}
    else:
        early = early_rule(scores, y)
    s_final, s_early = scores[final], scores[early["rule"]]
    if work is not None:
        with open(work / "virtual_cores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["core", "patient", "direction", "band", "patches", "label", "idc_patches", *scores])
            for i, c in enumerate(cores):
                w.writerow([c.name, c.patient, c.direction, c.band, len(c.idx), c.label, c.idc_patches,
                            *(f"{s[i]:.6g}" for s in scores.values())])
    shipped = combined_call(s_final, s_early, y, patients, case_thr, early["threshold"])
    by_bin = {name: round(float((s_final[[c.idc_bin == name for c in cores]] >= case_thr).mean()), 4)
              for *_, name in IDC_BINS if any(c.idc_bin == name for c in cores)}
    by_direction = {}
    for direction in DIRECTIONS:
        m = np.array([c.direction == direction for c in cores])
        by_direction[direction] = {"cores": int(m.sum()), "auc": round(auc(y[m], s_final[m]), 4)}
    metrics = {
        "what": f"strips 1 mm wide ({CORE_CELLS} cells of {PATCH} px at {MICRONS_PER_PIXEL:g} um/px; "
                f"{DIAGONAL_CELLS} steps along a diagonal) cut every 1 mm across each complete development slide, "
                f"horizontally, vertically and along both diagonals, kept with >= {MIN_CORE_PATCHES} tissue patches; "
                "positive when a strip holds an IDC patch, negative when neither it nor a one-cell margin on both "
                "sides does (the rest left out); scored out of fold (the fold member that never saw the patient, "
                "INT8; refined rules through the context stage of the patient's fold run on the core's own cells); "
                "CIs by bootstrap over patients",
        **counts,
        "rules": table,
        "final_rule": final,
        "final_rule_choice": "of the rules the appliance can run at the end of a case (first-stage and refined "
                             "top-k means), the highest out-of-fold specificity at its own highest threshold with "
                             f"sensitivity >= {CASE_MIN_SENSITIVITY} on positive cores, then the higher core AUC",
        "final": {**auc_with_ci(s_final, y, patients), "threshold": case_thr},
        "early": early,
        "shipped_call": shipped,
        "operating_table": operating_table(s_final, y, patients),
        "sensitivity_by_idc_patches": by_bin,
        "by_direction": by_direction,
        "seconds": round(time.time() - t0, 1),
    }
    log(f"virtual cores: {counts['cores']} ({counts['positive']} positive) from {len(slides)} slides; final rule "
        f"{final} AUC {metrics['final']['auc']} {metrics['final']['auc_ci95']}, threshold {case_thr}: "
        f"sensitivity {shipped['sensitivity']} {shipped['sensitivity_ci95']}, specificity {shipped['specificity']} "
        f"{shipped['specificity_ci95']}; early {early['rule']} >= {early['threshold']}")
    decision = {"case_rule": case_rule, "top_k": top_k, "case_threshold": case_thr,
                "early": {"rule": early["case_rule"], "top_k": early["top_k"], "threshold": early["threshold"]}}
    return metrics, decision


JUDGED_ANGLES = (0, 10, 20, 30)


def int8_members(work: Path, core) -> list:
    """The fold members as the appliance runs them (INT8, saved by members.fold_members_int8), compiled."""
    return [core.compile_model(core.read_model(str(work / f"fold{k}.int8.xml")), "CPU") for k in range(K_FOLDS)]


def stain_limit_step(d, work: Path, core, stain_ref) -> dict:
    """The stain-shift curves of the fold members (INT8, no TTA) under two transforms: each patient's own
    Macenko fit with H turned (the kind of shift training augments with), and a fixed Ruifrok-Johnston basis
    with H turned (which training never sees). The stain-out-of-range limit is the smaller of the two angles
    where a curve falls by more than MAX_AUC_DROP. Then what the appliance's QC reads on the complete slides under
    each transform, and every development patient through the QC with that limit."""
    t0 = time.time()
    dev = d.dev
    images, labels, patients, folds = d.images[dev], d.labels[dev], d.patients[dev], d.fold[dev]
    members = int8_members(work, core)
    fits, fallback = patient_fits(images, patients, stain_ref)

    def predict(k, x):
        return ov_predict(members[k], x)

    transforms = {"own_fit": own_fit_shift(fits), "ruifrok_johnston": rj_shift}
    curves, limits = {}, {}
    for name, shift in transforms.items():
        curves[name] = shift_curve(images, labels, patients, folds, predict, shift, ANGLES, log, name)
        limits[name] = limit_from_curve(curves[name])
    name = min(limits, key=lambda n: (limits[n][0], n))
    limit, crossed = limits[name]
    slides = sorted(p for p in d.fold_of if d.complete[p])
    judged = {n: judged_angles(d.images, d.patients, slides, stain_ref, shift, JUDGED_ANGLES)
              for n, shift in transforms.items()}
    angles = qc_stain_angles(d.images, d.patients, sorted(d.fold_of), stain_ref)
    judged_dev = {p: a for p, a in angles.items() if a is not None}
    refused = sorted(p for p, a in judged_dev.items() if max(a) > limit)
    worst = max((max(a) for a in judged_dev.values()), default=0.0)
    log(f"stain limits {limits}; limit {limit} deg from {name}; {len(judged_dev)} development patients judged by the "
        f"QC, worst {worst:.1f} deg, refused {refused}")
    return {"limit_deg": limit, "limit_from": name, "crossed": crossed, "max_auc_drop": MAX_AUC_DROP,
            "curve": curves["own_fit"], "curves": curves,
            "limits_deg": {n: v[0] for n, v in limits.items()},
            "qc_judged_on_complete_slides": judged,
            "rule": f"two transforms re-colour every development patient: (own_fit) the patient's own Macenko fit "
                    f"with the haematoxylin vector turned in its H&E plane away from eosin, the kind of shift "
                    f"training augments with; (ruifrok_johnston) skimage.color's fixed Ruifrok-Johnston H, E, DAB "
                    f"basis with H turned in the H&E plane, which training never sees "
                    f"(models/tools/idc_build/stainshift.py). For each, the angle where the pooled out-of-fold AUC "
                    f"of the fold members falls by more than {MAX_AUC_DROP} from the unturned data (linear "
                    f"interpolation, rounded down to 0.5 deg; the largest angle measured if it never does); the limit "
                    f"is the smaller of the two",
            "development_patients_judged": len(judged_dev), "development_patients_refused": refused,
            "development_worst_angle_deg": round(worst, 2), "patients_fitted_with_reference": fallback,
            "seconds": round(time.time() - t0, 1)}


def robustness_step(d, work: Path, core) -> dict:
    """Out-of-fold AUC of the fold members (INT8, no TTA) under fixed scale, blur, JPEG, brightness, contrast
    and gamma shifts (idc_build/robustness.py)."""
    t0 = time.time()
    dev = d.dev
    members = int8_members(work, core)
    table = shift_table(d.images[dev], d.labels[dev], d.fold[dev], lambda k, x: ov_predict(members[k], x), log)
    return {**table, "seconds": round(time.time() - t0, 1)}
