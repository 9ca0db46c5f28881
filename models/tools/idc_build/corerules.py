"""Case rules scored on virtual cores (idc_build/cores.py), thresholds chosen on them, and their uncertainty.

Every core is scored only with out-of-fold outputs: first-stage probabilities of the fold member that never
saw the core's patient, and for refined rules the context stage of that patient's fold (fitted on the other
folds' out-of-fold outputs) run on the core's own cells, as the appliance would see the core alone.
Confidence intervals come from a bootstrap over patients (cores of one slide overlap and are alike), never
over cores.
"""
from __future__ import annotations

import math

import numpy as np

from .context import apply_context
from .metrics import auc, sensitivity_first_threshold

from appliance.model.metrics import top_k_mean  # noqa: E402
from appliance.pipeline.mil import largest_region  # noqa: E402

TOP_KS = (1, 3, 5, 10, 15)
TOP_FRACTIONS = (0.05, 0.1)  # top-k mean with k = ceil(fraction x the core's patches): scaled by tissue size
OPERATING_SENSITIVITIES = (0.95, 0.98, 0.99, 1.0)
BOOTSTRAP = 2000
# rules whose score never falls as patches arrive (first-stage values never change): eligible as the early rule
MONOTONE = {f"top{k}": ("top-k-mean", k) for k in TOP_KS}
# rules the appliance can run as the final rule (decision.case_rule, top_k)
FINAL = {**MONOTONE, **{f"top{k}_refined": ("top-k-mean-refined", k) for k in TOP_KS}}


def score_cores(cores, gx_all, gy_all, p1, fold_of, fold_params, first_stage_threshold, refined_threshold) -> dict:
    """Each rule's score of every core -> {rule: float array in core order}. gx_all/gy_all: every patch's grid
    cell; p1: out-of-fold first-stage probabilities; fold_params: the context stage fitted out of fold per fold;
    first_stage_threshold / refined_threshold: the cell thresholds of the region and count rules on first-stage
    and on refined probabilities."""
    out: dict[str, list[float]] = {}

    def put(name, v):
        out.setdefault(name, []).append(float(v))

    for c in cores:
        gx, gy, q1 = gx_all[c.idx], gy_all[c.idx], p1[c.idx]
        q2 = apply_context(fold_params[fold_of[c.patient]], gx - gx.min(), gy - gy.min(), q1)
        n = len(q1)
        for name, q, t in (("", q1, first_stage_threshold), ("_refined", q2, refined_threshold)):
            for k in TOP_KS:
                put(f"top{k}{name}", top_k_mean(q, k))
            for f in TOP_FRACTIONS:
                put(f"top{int(f * 100)}pct{name}", top_k_mean(q, math.ceil(f * n)))
            area, mass = largest_region(gx, gy, q, t)
            put(f"region_area{name}", area)
            put(f"region_mass{name}", mass)
            put(f"cells_above{name}", int((q >= t).sum()))
            put(f"fraction_above{name}", float((q >= t).mean()))
    return {k: np.asarray(v) for k, v in out.items()}


def at_threshold(scores, y, t) -> dict:
    pos, neg = scores[y == 1], scores[y == 0]
    return {"threshold": t, "sensitivity": round(float((pos >= t).mean()), 4),
            "specificity": round(float((neg < t).mean()), 4),
            "true_positive": int((pos >= t).sum()), "positive": int(len(pos)),
            "true_negative": int((neg < t).sum()), "negative": int(len(neg))}


def bootstrap_ci(patients, fn, n: int = BOOTSTRAP, seed: int = 20240611, level: float = 0.95):
    """(low, high) percentile interval of fn(selected core indices) over resamples of the patients."""
    rng = np.random.default_rng(seed)
    uniq = np.unique(patients)
    by_patient = {p: np.flatnonzero(patients == p) for p in uniq}
    vals = []
    for _ in range(n):
        pick = rng.choice(uniq, size=len(uniq), replace=True)
        sel = np.concatenate([by_patient[p] for p in pick])
        v = fn(sel)
        if v is not None and np.isfinite(v):
            vals.append(v)
    a = (1 - level) / 2
    return round(float(np.quantile(vals, a)), 4), round(float(np.quantile(vals, 1 - a)), 4)


def _spec(scores, y, t):
    def fn(sel):
        neg = scores[sel][y[sel] == 0]
        return float((neg < t).mean()) if len(neg) else None
    return fn


def _sens(scores, y, t):
    def fn(sel):
        pos = scores[sel][y[sel] == 1]
        return float((pos >= t).mean()) if len(pos) else None
    return fn


def _auc(scores, y):
    def fn(sel):
        ys = y[sel]
        return auc(ys, scores[sel]) if 0 < ys.sum() < len(ys) else None
    return fn


def rule_table(scores: dict, y, min_sens: float) -> dict:
    """Per rule: core AUC, and the highest threshold with sensitivity >= min_sens with what it gives."""
    return {name: {"auc": round(auc(y, s), 4), **at_threshold(s, y, sensitivity_first_threshold(s, y, min_sens))}
            for name, s in scores.items()}


def choose_final_rule(table: dict, candidates=tuple(FINAL)) -> str:
    """The final rule: the highest out-of-fold specificity at its own sensitivity-first threshold, then the
    higher core AUC, then the name (so the choice is the same in every run)."""
    return max(candidates, key=lambda n: (table[n]["specificity"], table[n]["auc"], n))


def _just_above(m: float) -> float:
    """The smallest 4-decimal number strictly above ``m`` (floor(m * 1e4) / 1e4 alone can land on m itself:
    0.57 * 1e4 is 5699.999...)."""
    t = round(np.floor(m * 1e4) / 1e4, 4)
    while t <= m:
        t = round(t + 1e-4, 4)
    return t


def early_rule(scores: dict, y, candidates=tuple(MONOTONE)) -> dict:
    """The early positive: a first-stage rule that never falls, with a threshold just above every negative
    core's score (rounded up to 4 decimals), so that no out-of-fold negative core fires. Of the candidates, the
    one that fires on the most positive cores (then the larger k). Returns its name, threshold and reach."""
    best = None
    for name in candidates:
        s = scores[name]
        # above 1 when a negative core scores 1: a top-k mean can never pass it, so the early positive never fires
        t = _just_above(float(s[y == 0].max())) if (y == 0).any() else 0.0
        fires = int((s[y == 1] >= t).sum())
        key = (fires, MONOTONE[name][1])
        if best is None or key > best[0]:
            best = (key, {"rule": name, "case_rule": MONOTONE[name][0], "top_k": MONOTONE[name][1],
                          "threshold": t, "positive_cores_fired": fires, "positive_cores": int((y == 1).sum()),
                          "negative_cores_fired": int((s[y == 0] >= t).sum())})
    return best[1]


def operating_table(s, y, patients, sensitivities=OPERATING_SENSITIVITIES) -> list[dict]:
    """At each target sensitivity: the highest threshold reaching it, sensitivity and specificity with their
    patient-bootstrap 95% intervals."""
    rows = []
    for target in sensitivities:
        t = sensitivity_first_threshold(s, y, target)
        r = at_threshold(s, y, t)
        r["target_sensitivity"] = target
        r["sensitivity_ci95"] = bootstrap_ci(patients, _sens(s, y, t))
        r["specificity_ci95"] = bootstrap_ci(patients, _spec(s, y, t))
        rows.append(r)
    return rows


def combined_call(final_s, early_s, y, patients, case_thr, early_thr) -> dict:
    """The shipped call on the cores: suspicious when the early rule fires or the final rule passes."""
    called = (early_s >= early_thr) | (final_s >= case_thr)
    pos, neg = called[y == 1], called[y == 0]

    def spec(sel):
        m = y[sel] == 0
        return float((~called[sel][m]).mean()) if m.any() else None

    def sens(sel):
        m = y[sel] == 1
        return float(called[sel][m].mean()) if m.any() else None

    return {"sensitivity": round(float(pos.mean()), 4), "specificity": round(float((~neg).mean()), 4),
            "sensitivity_ci95": bootstrap_ci(patients, sens), "specificity_ci95": bootstrap_ci(patients, spec),
            "true_positive": int(pos.sum()), "positive": int(len(pos)),
            "true_negative": int((~neg).sum()), "negative": int(len(neg)),
            "early_fired_positive": int((early_s[y == 1] >= early_thr).sum()),
            "early_fired_negative": int((early_s[y == 0] >= early_thr).sum())}


def auc_with_ci(s, y, patients) -> dict:
    return {"auc": round(auc(y, s), 4), "auc_ci95": bootstrap_ci(patients, _auc(s, y))}
