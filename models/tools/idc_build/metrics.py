"""Build metrics: the appliance's AUC and confusion metrics in the build's report format, thresholds."""
from __future__ import annotations

import numpy as np

from appliance.model import metrics as appliance_metrics

TOP_K = 15
CASE_MIN_SENSITIVITY = 0.98


def auc(y, p) -> float:
    """ROC AUC (appliance.model.metrics.roc_auc: Mann-Whitney U, average ranks for ties); NaN, not None, when only one
    class is present, as the build's reports have always had it."""
    a = appliance_metrics.roc_auc(y, p)
    return float("nan") if a is None else a


def _nan(x):
    return float("nan") if x is None else x


def binary_metrics(y, p, threshold: float, n_patients: int) -> dict:
    """appliance.model.metrics.binary_metrics (positive if p >= threshold) in the build's report format: rounded to 4
    decimals, NaN for an undefined sensitivity/specificity, precision 0 without predicted positives, plus
    accuracy, threshold, confusion matrix and patch/patient counts. F1 stays 2PR/(P+R) of that precision and
    sensitivity: the appliance's 2TP/(2TP+FP+FN) is the same number but not always the same float."""
    m = appliance_metrics.binary_metrics(y, p, threshold)
    tp, tn, fp, fn = m["tp"], m["tn"], m["fp"], m["fn"]
    sens, spec = _nan(m["sensitivity"]), _nan(m["specificity"])
    prec = 0.0 if m["precision"] is None else m["precision"]
    f1 = 2 * prec * sens / (prec + sens) if prec + sens else 0.0
    return {
        "auc": round(_nan(m["auc"]), 4),
        "balanced_accuracy": round(_nan(m["balanced_accuracy"]), 4),
        "f1": round(f1, 4),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
        "precision": round(prec, 4),
        "accuracy": round((tp + tn) / m["n"], 4),
        "threshold": threshold,
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "n_patches": m["n"],
        "n_positive_patches": m["positives"],
        "n_patients": int(n_patients),
    }


def best_balanced_accuracy_threshold(y, p) -> float:
    """Threshold maximising balanced accuracy (rule: positive if p >= threshold), midpoint between
    neighbouring distinct scores, rounded to 4 decimals."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    u = np.unique(p)  # ascending
    cands = np.r_[(u[:-1] + u[1:]) / 2.0, u[0]]
    cands = np.unique(np.round(cands, 4))
    n_pos, n_neg = y.sum(), (~y).sum()
    best_t, best_ba = 0.5, -1.0
    ps, ys = np.sort(p), y[np.argsort(p, kind="mergesort")]
    cum_pos = np.r_[0, np.cumsum(ys)]  # positives strictly below index
    for t in cands:
        k = np.searchsorted(ps, t, side="left")  # number with p < t -> predicted negative
        fn = cum_pos[k]
        tn = k - fn
        ba = ((n_pos - fn) / n_pos + tn / n_neg) / 2
        if ba > best_ba + 1e-12:
            best_ba, best_t = ba, float(t)
    return best_t


def sensitivity_first_threshold(scores, labels, min_sens=CASE_MIN_SENSITIVITY) -> float:
    """Highest threshold (rounded down to 4 decimals) that flags at least min_sens of the positive cases."""
    pos = np.sort(scores[labels == 1])
    if not len(pos):
        raise ValueError("no positive cases: a sensitivity-first threshold needs at least one")
    k = int(np.floor((1.0 - min_sens) * len(pos)))  # positives allowed below the threshold
    t = float(np.floor(pos[k] * 1e4) / 1e4)
    if (pos >= t).mean() < min_sens:  # pos[k] * 1e4 can round up to the next whole number, putting t above pos[k]
        raise ValueError(f"threshold {t} flags {(pos >= t).mean():.4f} of the positive cases, below {min_sens}")
    return t


def summary(vals):
    v = np.asarray(vals, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)), 4) if len(v) > 1 else None}
