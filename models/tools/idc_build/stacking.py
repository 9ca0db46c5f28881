"""Out-of-fold stacking of the context stage, region Dice on complete slides, and the case rules on bags.

Every number here is on patients the scoring models never saw: the first stage's out-of-fold probabilities
(each patient scored by the fold member that did not train on it), and for the context stage, per fold, a
regression fitted on the other folds' out-of-fold outputs of complete slides and applied to the held fold.
"""
from __future__ import annotations

import numpy as np

from .context import apply_context, cells, fit_context, grid_features
from .metrics import auc

# appliance's own rules (the build's numbers are the appliance's behaviour)
from appliance.model.metrics import top_k_mean  # noqa: E402
from appliance.pipeline.mil import largest_region  # noqa: E402


def patient_cells(pid_of, xs, ys):
    """patient -> (indices, gx, gy) of its patches on its own grid."""
    out = {}
    for p in np.unique(pid_of):
        idx = np.flatnonzero(pid_of == p)
        gx, gy = cells(xs[idx], ys[idx])
        out[int(p)] = (idx, gx, gy)
    return out


def context_training_set(cell_map, prob, labels, patients):
    """Features and labels of the listed patients' cells."""
    f, y = [], []
    for p in patients:
        idx, gx, gy = cell_map[p]
        f.append(grid_features(gx, gy, prob[idx]))
        y.append(labels[idx])
    return np.concatenate(f), np.concatenate(y)


def stack_out_of_fold(cell_map, prob, labels, fold_of, complete, k_folds, train_on="complete"):
    """Refined OOF probabilities: fold k's patients through a context stage fitted on the other folds'
    patients (complete slides only, or all). Returns (refined, per-fold params)."""
    refined = np.full(len(prob), np.nan)
    params = []
    for k in range(k_folds):
        train = [p for p, f in fold_of.items() if f != k and (train_on == "all" or complete[p])]
        f, y = context_training_set(cell_map, prob, labels, train)
        par = fit_context(f, y)
        params.append(par)
        for p in (p for p, f in fold_of.items() if f == k):
            idx, gx, gy = cell_map[p]
            refined[idx] = apply_context(par, gx, gy, prob[idx])
    return refined, params


def slide_dice(cell_map, prob, labels, thr, slides) -> dict:
    """Dice of (probability >= thr) against the IDC patches, per complete slide holding IDC."""
    per = {}
    for p in slides:
        idx = cell_map[p][0]
        truth = labels[idx] == 1
        if not truth.any():
            continue
        pred = prob[idx] >= thr
        per[p] = round(float(2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())), 4)
    vals = list(per.values())
    return {"mean": round(float(np.mean(vals)), 4), "sd": round(float(np.std(vals)), 4),
            "min": round(float(min(vals)), 4), "slides": len(vals), "per_slide": {str(k): v for k, v in per.items()}}


def bags(cell_map, labels, patients):
    """The bag proxy: each patient as a bag (positive if it holds IDC), and each patient with IDC again
    with its IDC patches removed (negative). Yields (patient, keep mask over its patches, bag label)."""
    for p in patients:
        idx = cell_map[p][0]
        pos = labels[idx] == 1
        yield p, np.ones(len(idx), bool), int(pos.any())
        if pos.any() and (~pos).any():
            yield p, ~pos, 0


BAG_KS = (1, 3, 5, 10, 15)


def bag_scores(cell_map, prob, labels, patients, fold_of, params, first_stage_threshold, refined_threshold, k=15):
    """Each rule's score of every bag. First-stage rules use prob as is; refined rules re-run the context
    stage of the bag's fold on the bag's own cells (removing the IDC patches changes their neighbours).
    Rules: top-k mean (k in BAG_KS; "top15" is the 0.3.0 rule) and the largest region's area and mass, each on
    first-stage and on refined probabilities; the regions are the cells at or above first_stage_threshold or
    refined_threshold."""
    rules = {}
    y = []
    for p, keep, yb in bags(cell_map, labels, patients):
        idx, gx, gy = cell_map[p]
        idx, gx, gy = idx[keep], gx[keep], gy[keep]
        p1 = prob[idx]
        p2 = apply_context(params[fold_of[p]], gx, gy, p1)
        for name, q, t in (("", p1, first_stage_threshold), ("_refined", p2, refined_threshold)):
            for kk in BAG_KS:
                rules.setdefault(f"top{kk}{name}", []).append(top_k_mean(q, kk))
            area, mass = largest_region(gx, gy, q, t)
            rules.setdefault("region_area" + name, []).append(area)
            rules.setdefault("region_mass" + name, []).append(mass)
        y.append(yb)
    y = np.array(y)
    return y, {n: np.array(v, float) for n, v in rules.items()}


def rule_aucs(y, scores) -> dict:
    return {n: round(auc(y, s), 4) for n, s in scores.items()}
