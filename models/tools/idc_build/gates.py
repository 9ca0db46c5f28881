"""The shift gates, measured and set on the development slides: the stain limit in the QC's own reading, and
the out-of-distribution (OOD) score's reference and limit.

Every development patch is re-coloured under three independent shifts (appliance.pipeline.shifts: the
slide's own stain basis turned, a fixed Ruifrok-Johnston basis turned, a scanner colour profile turned) at
turns of 0-40 deg. Per shift and turn:
- the pooled out-of-fold AUC of the fold members (INT8; each patch scored by the member that never saw its
  patient);
- per complete development slide: its out-of-fold case score under the shipped rule (the call it would get),
  what the appliance's QC reads (each patch a tile: the stain fit's largest H/E angle to the reference,
  whether the stain could be assessed, exposure and focus), and its OOD score (the shipped model's own
  features, appliance.model.ood).

The stain limit is a QC reading: for each shift, the turn where the AUC first falls by more than HOLD
(interpolated), mapped to the slides' median reading at that turn; the smallest over the shifts (the safe
side). The OOD limit is the smallest score that, with the stain and image gates, refuses at most one slide
in 7 at every turn where the AUC holds within HOLD.
"""
from __future__ import annotations

import time

import numpy as np

from .log import log
from .metrics import auc

TURNS = (0, 5, 10, 15, 20, 25, 30, 35, 40)
HOLD = 0.02  # AUC within this of the unshifted: the model still reads the slides
FALL = 0.05  # AUC fallen by more than this: every slide must be refused
MAX_REFUSED_HOLDING = 1 / 7  # where the AUC holds, at most this fraction of the slides refused
OOD_COMPONENTS = 32


def pooled_feature_names(onnx_model) -> list[str]:
    """The first stage's pooled penultimate features: each member's global-average-pool output that feeds its
    linear head, in graph order."""
    graph = onnx_model.graph
    pooled = {n.output[0] for n in graph.node if n.op_type in ("ReduceMean", "GlobalAveragePool")}
    names = [n.input[0] for n in graph.node if n.op_type == "Gemm" and n.input[0] in pooled]
    if not names:
        raise ValueError("no global average pool feeding a linear head: the model has no pooled features")
    return names


def feature_model(core, xml_path, names):
    """The shipped INT8 model compiled with its pooled features as extra outputs (as the appliance compiles it)."""
    model = core.read_model(str(xml_path))
    model.add_outputs(names)
    return core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})


def shipped_features(compiled, names, images, batch=512) -> np.ndarray:
    """(N, F) float32: the shipped model's pooled features (every member's, concatenated)."""
    out = []
    for i in range(0, len(images), batch):
        r = compiled({0: np.ascontiguousarray(images[i:i + batch])})
        out.append(np.concatenate([np.asarray(r[compiled.output(k + 1)]).reshape(len(images[i:i + batch]), -1)
                                   for k in range(len(names))], axis=1))
    return np.concatenate(out).astype(np.float32)


def slide_qc(patches, reference) -> dict:
    """One slide through the appliance's QC, each patch a tile in order (every 2nd patch focus-checked, as the
    session samples them): the stain reading and the other reasons it would give."""
    from appliance.pipeline.qc import CaseQc, laplacian_variance
    from appliance.pipeline.tissue import mask_of_subsampled, subsample
    from appliance.terms import ReasonCode

    qc = CaseQc(reference=reference)
    for patch in patches:
        sub = subsample(np.ascontiguousarray(patch))
        qc.add_tile(sub, mask_of_subsampled(sub))
    qc.add_patches(laplacian_variance(np.ascontiguousarray(patches[::2])))
    qc.finish()
    angles = qc.stain_angles()
    problem = qc.stain_problem()
    out_of_plane = qc.h_out_of_plane()
    return {"reading": None if problem is not None or angles is None else round(max(angles), 2),
            "h_deg": None if angles is None else round(angles[0], 2),
            "e_deg": None if angles is None else round(angles[1], 2),
            "h_out_of_plane_deg": None if out_of_plane is None else round(out_of_plane, 2),
            "fit_disagreement_deg": round(qc.fit_disagreement(), 2),
            "stain_problem": problem,
            "other": sorted(r.code for r in qc.reasons()
                            if r.code not in (ReasonCode.STAIN_OUT_OF_RANGE, ReasonCode.STAIN_NOT_ASSESSABLE))}


def measure(d, slides, predict_member, features_of, ood_ref, reference, fits, threshold, top_k,
            shifts, turns=TURNS) -> tuple[dict, list[dict]]:
    """Curves {shift: [{turn, pooled_auc}]} and one item per (shift, turn, slide)."""
    from appliance.model.ood import case_score
    from appliance.pipeline.shifts import shifted

    dev = d.dev
    images, labels, patients, folds = d.images[dev], d.labels[dev], d.patients[dev], d.fold[dev]
    curves, items = {}, []
    for shift in shifts:
        curves[shift] = []
        for turn in turns:
            t0 = time.time()
            x = images.copy()
            if turn:
                for pid in np.unique(patients):
                    m = patients == pid
                    x[m] = shifted(images[m], shift, turn, fits.get(int(pid)))
            p = np.full(len(x), np.nan)
            for k in range(int(folds.max()) + 1):
                p[folds == k] = predict_member(k, x[folds == k])
            curves[shift].append({"turn_deg": turn, "pooled_auc": round(auc(labels, p), 4)})
            for pid in slides:
                m = patients == pid
                qc = slide_qc(x[m], reference)
                score = float(np.sort(p[m])[-top_k:].mean())
                items.append({"shift": shift, "turn_deg": turn, "slide": int(pid), "idc_patches": int(labels[m].sum()),
                              "score": round(score, 4), "called": "suspicious" if score >= threshold else "benign",
                              "ood": case_score(ood_ref.distances(features_of(x[m]))), **qc})
            log(f"gates: {shift} turned {turn:>2} deg: pooled OOF AUC {curves[shift][-1]['pooled_auc']:.4f} "
                f"({time.time() - t0:.0f} s)")
    return curves, items


def _held(curve, turn) -> float:
    base = curve[0]["pooled_auc"]
    return base - next(r["pooled_auc"] for r in curve if r["turn_deg"] == turn)


def crossing_turn(curve, drop=HOLD) -> float | None:
    """The turn where the AUC first falls by more than ``drop`` (linear interpolation), None if never."""
    base = curve[0]["pooled_auc"]
    for a, b in zip(curve, curve[1:]):
        da, db = base - a["pooled_auc"], base - b["pooled_auc"]
        if db > drop:
            t = (drop - da) / (db - da) if db > da else 0.0
            return a["turn_deg"] + t * (b["turn_deg"] - a["turn_deg"])
    return None


def median_reading(items, shift, turn) -> float | None:
    vals = [i["reading"] for i in items if i["shift"] == shift and i["turn_deg"] == turn and i["reading"] is not None]
    return float(np.median(vals)) if vals else None


def within_budget(values) -> float:
    """The smallest limit that leaves at most MAX_REFUSED_HOLDING of ``values`` (rounded down) above it."""
    v = sorted(values)
    return float(v[len(v) - 1 - int(np.floor(MAX_REFUSED_HOLDING * len(v) + 1e-9))])


def refusal_budget_reading(items, shift, turn) -> float | None:
    """The QC reading that at most 1 slide in 7 exceeds at (shift, turn)."""
    vals = [i["reading"] for i in items if i["shift"] == shift and i["turn_deg"] == turn and i["reading"] is not None]
    return within_budget(vals) if vals else None


def stain_limit(curves, items) -> dict:
    """Per shift, the reading at the turn where its AUC falls by more than HOLD; the limit is the smallest
    (rounded down to 0.5 deg). A shift that never falls that far sets no such limit but says how far it was
    validated: the reading that at most 1 slide in 7 exceeds at its largest turn (the budget of refusals where the
    AUC holds). The limit is never beyond the furthest any shift was validated, for nothing was measured there."""
    per = {}
    for shift, curve in curves.items():
        t = crossing_turn(curve)
        if t is None:
            last = curve[-1]["turn_deg"]
            per[shift] = {"crossing_turn_deg": None, "reading_deg": None,
                          "validated_to_deg": _rounded(refusal_budget_reading(items, shift, last))}
            continue
        turns = [r["turn_deg"] for r in curve]
        lo = max(x for x in turns if x <= t)
        hi = min((x for x in turns if x >= t), default=lo)
        r_lo, r_hi = median_reading(items, shift, lo), median_reading(items, shift, hi)
        if r_lo is None or r_hi is None:
            reading = r_lo if r_hi is None else r_hi
        else:
            reading = r_lo if hi == lo else r_lo + (t - lo) / (hi - lo) * (r_hi - r_lo)
        per[shift] = {"crossing_turn_deg": round(t, 1), "reading_deg": _rounded(reading)}
    crossed = {s: v["reading_deg"] for s, v in per.items() if v["reading_deg"] is not None}
    validated = {s: v["validated_to_deg"] for s, v in per.items() if v.get("validated_to_deg") is not None}
    candidates = {}
    if crossed:
        name = min(crossed, key=crossed.get)
        candidates[name] = crossed[name]
    if validated:
        name = max(validated, key=validated.get)
        candidates[f"{name} (validated extent)"] = validated[name]
    if not candidates:
        raise ValueError("the QC read none of the shifted slides: the stain limit cannot be set")
    set_by = min(candidates, key=candidates.get)
    return {"limit_deg": float(np.floor(candidates[set_by] * 2) / 2), "set_by": set_by, "per_shift": per}


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def refused_by_qc(item, limit) -> str | None:
    """The QC's reason for refusing an item under the stain limit (None: the QC lets it through)."""
    if item["stain_problem"] is not None:
        return "stain-not-assessable"
    if item["reading"] is not None and item["reading"] > limit:
        return "stain-out-of-range"
    return item["other"][0] if item["other"] else None


def classes(curves) -> dict:
    """(shift, turn) -> 'holds' (AUC within HOLD), 'fell' (by more than FALL) or 'between'."""
    out = {}
    for shift, curve in curves.items():
        for r in curve:
            drop = _held(curve, r["turn_deg"])
            out[(shift, r["turn_deg"])] = "holds" if drop <= HOLD else "fell" if drop > FALL else "between"
    return out


def ood_limit(curves, items, stain_deg: float) -> float:
    """The smallest OOD limit (rounded up to 4 decimals) that, with the QC's gates at ``stain_deg``, refuses at
    most MAX_REFUSED_HOLDING of the slides at every (shift, turn) where the AUC holds: as tight as the budget for
    refusing readable slides allows. Where the QC alone already spends the budget, the OOD score by itself may
    refuse at most that many (the gates' excess there is reported, not hidden by a looser OOD limit)."""
    cls = classes(curves)
    groups = {}
    for i in items:
        if cls[(i["shift"], i["turn_deg"])] == "holds":
            groups.setdefault((i["shift"], i["turn_deg"]), []).append(i)
    need = []
    for group in groups.values():
        budget = int(np.floor(MAX_REFUSED_HOLDING * len(group) + 1e-9))
        passed = [i["ood"] for i in group if refused_by_qc(i, stain_deg) is None]
        left = budget - (len(group) - len(passed))
        if left < 0 or len(passed) <= left:  # the QC is over budget, or leaves too few for the OOD to matter
            need.append(within_budget([i["ood"] for i in group]))
        else:  # the smallest limit that leaves at most `left` of the slides the QC passed above it
            need.append(float(sorted(passed)[len(passed) - 1 - left]))
    return float(np.ceil(max(need) * 1e4) / 1e4)


def roc(items, curves) -> dict:
    """The OOD score's ROC for 'AUC fell by more than FALL' (positive) against 'held within HOLD'."""
    cls = classes(curves)
    pos = [i["ood"] for i in items if cls[(i["shift"], i["turn_deg"])] == "fell"]
    neg = [i["ood"] for i in items if cls[(i["shift"], i["turn_deg"])] == "holds"]
    if not pos or not neg:
        return {"positives": len(pos), "negatives": len(neg), "auc": None, "points": []}
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    s = np.r_[pos, neg]
    points = []
    for t in np.unique(s)[::-1]:
        points.append([round(float(np.mean(np.array(neg) >= t)), 4), round(float(np.mean(np.array(pos) >= t)), 4),
                       round(float(t), 4)])
    step = max(1, len(points) // 40)
    return {"positives": len(pos), "negatives": len(neg), "auc": round(auc(y, s), 4),
            "points_fpr_tpr_threshold": points[::step] + ([points[-1]] if points[::step][-1] != points[-1] else [])}


def outcomes(curves, items, stain_deg, ood_max) -> list[dict]:
    """Per shift and turn: the AUC and its drop, the slides' median reading and OOD score, how many were refused
    and by what, and how many tumour slides were called benign-appearing."""
    cls = classes(curves)
    rows = []
    for shift, curve in curves.items():
        for r in curve:
            group = [i for i in items if i["shift"] == shift and i["turn_deg"] == r["turn_deg"]]
            why = {}
            benign = []
            for i in group:
                reason = refused_by_qc(i, stain_deg) or ("out-of-distribution" if i["ood"] > ood_max else None)
                if reason:
                    why[reason] = why.get(reason, 0) + 1
                elif i["called"] == "benign" and i["idc_patches"] > 0:
                    benign.append(i["slide"])
            oods = [i["ood"] for i in group]
            out_of_plane = [i["h_out_of_plane_deg"] for i in group if i.get("h_out_of_plane_deg") is not None]
            rows.append({"shift": shift, "turn_deg": r["turn_deg"], "pooled_auc": r["pooled_auc"],
                         "auc_drop": round(_held(curve, r["turn_deg"]), 4), "class": cls[(shift, r["turn_deg"])],
                         "slides": len(group), "median_reading_deg": median_reading(items, shift, r["turn_deg"]),
                         "median_ood": round(float(np.median(oods)), 3),
                         "median_h_out_of_plane_deg": round(float(np.median(out_of_plane)), 1) if out_of_plane else None,
                         "refused": sum(why.values()),
                         "refused_by": why, "tumour_slides_called_benign": benign})
    return rows


def rules_hold(rows) -> dict:
    """The issue's three rules over the outcome rows."""
    return {"no_tumour_slide_called_benign": all(not r["tumour_slides_called_benign"] for r in rows),
            "at_most_1_in_7_refused_where_auc_holds": all(r["refused"] <= MAX_REFUSED_HOLDING * r["slides"]
                                                          for r in rows if r["class"] == "holds"),
            "all_refused_where_auc_fell_by_more_than_0.05": all(r["refused"] == r["slides"]
                                                                 for r in rows if r["class"] == "fell")}
