"""The first stage's out-of-fold figures: the colour baseline, cross-validation of the members (FP32 without
and with TTA, INT8) and FP32 against INT8."""
from __future__ import annotations

import time

import numpy as np

from .data import colour_features
from .dataset import Data
from .log import log
from .members import OutOfFold
from .metrics import auc, best_balanced_accuracy_threshold, binary_metrics, summary
from .split import K_FOLDS
from .training import fit_logistic

METRIC_KEYS = ("auc", "balanced_accuracy", "f1", "sensitivity", "specificity")  # summarised as mean ± sd


def colour_baseline(d: Data) -> dict:
    """Colour-histogram logistic regression on the same folds (OOF), with its own best-BAC threshold."""
    t0 = time.time()
    features = colour_features(d.images)
    p_baseline = np.full(len(d.images), np.nan)
    for k in range(K_FOLDS):
        train, held = d.train_of(k), d.in_fold(k)
        p_baseline[held] = fit_logistic(features[train], d.labels[train])(features[held])
    baseline_threshold = best_balanced_accuracy_threshold(d.labels[d.dev], p_baseline[d.dev])
    fold_metrics = [binary_metrics(d.labels[d.in_fold(k)], p_baseline[d.in_fold(k)], baseline_threshold,
                                   len(d.folds[k])) for k in range(K_FOLDS)]
    log(f"baseline (colour histograms + logistic regression): fold AUC {[m['auc'] for m in fold_metrics]}, "
        f"BAC {[m['balanced_accuracy'] for m in fold_metrics]} ({time.time() - t0:.0f}s)")
    return {"method": f"per-patch 16-bin histograms of R,G,B,H,S,V + mean/sd of each ({features.shape[1]} "
                      "features), standardised, class-weighted L2 logistic regression (LBFGS, numpy/torch), same "
                      "folds",
            "threshold": baseline_threshold, "folds": fold_metrics,
            "mean_sd": {key: summary([m[key] for m in fold_metrics]) for key in METRIC_KEYS}}


def cross_validation(d: Data, oof: OutOfFold, first_stage_threshold: float) -> dict:
    """Per-fold and pooled OOF metrics of the FP32 (no TTA, TTA) and INT8 members, plus INT8 with each fold's
    threshold chosen on the other folds. The INT8 members and the FP32 recipe as shipped are scored at
    first_stage_threshold (chosen on the pooled OOF INT8 probabilities), the other FP32 recipe at its own
    best-BAC threshold."""
    y_dev, n_dev_patients = d.labels[d.dev], len(d.fold_of)

    def per_fold(p, threshold):
        return [binary_metrics(d.labels[d.in_fold(k)], p[d.in_fold(k)], threshold, len(d.folds[k]))
                for k in range(K_FOLDS)]

    cv = {}
    for name, p in (("fp32_no_tta", oof.fp32), ("fp32_tta", oof.fp32_tta), ("int8_shipped_recipe", oof.int8)):
        shipped_recipe = name == "int8_shipped_recipe" or (name == "fp32_tta") == oof.tta
        threshold = first_stage_threshold if shipped_recipe else best_balanced_accuracy_threshold(y_dev, p[d.dev])
        fold_metrics = per_fold(p, threshold)
        cv[name] = {"threshold": threshold, "folds": fold_metrics,
                    "mean_sd": {key: summary([m[key] for m in fold_metrics]) for key in METRIC_KEYS},
                    "pooled": binary_metrics(y_dev, p[d.dev], threshold, n_dev_patients)}
    # honest variant: each fold's threshold chosen on the OTHER folds' OOF INT8 predictions
    other_folds_threshold = []
    for k in range(K_FOLDS):
        other = d.train_of(k)
        threshold_k = best_balanced_accuracy_threshold(d.labels[other], oof.int8[other])
        other_folds_threshold.append(binary_metrics(d.labels[d.in_fold(k)], oof.int8[d.in_fold(k)], threshold_k,
                                                    len(d.folds[k])))
    cv["int8_threshold_from_other_folds"] = {
        "folds": other_folds_threshold,
        "mean_sd": {key: summary([m[key] for m in other_folds_threshold]) for key in METRIC_KEYS}}
    return cv


def quantization_out_of_fold(d: Data, oof: OutOfFold, first_stage_threshold: float) -> dict:
    """FP32 vs INT8 of the fold members (the graph as shipped) on their out-of-fold patients; labels compared at
    first_stage_threshold."""
    dev, y_dev = d.dev, d.labels[d.dev]
    fp32, int8 = oof.fp32_shipped, oof.int8
    return {
        "auc_drop_pooled": round(auc(y_dev, fp32[dev]) - auc(y_dev, int8[dev]), 4),
        "auc_drop_per_fold": [round(auc(d.labels[d.in_fold(k)], fp32[d.in_fold(k)])
                                    - auc(d.labels[d.in_fold(k)], int8[d.in_fold(k)]), 4) for k in range(K_FOLDS)],
        "label_agreement_at_threshold": round(float(((fp32[dev] >= first_stage_threshold)
                                                     == (int8[dev] >= first_stage_threshold)).mean()), 4),
        "mean_abs_probability_diff": round(float(np.abs(fp32[dev] - int8[dev]).mean()), 4),
        "max_abs_probability_diff": round(float(np.abs(fp32[dev] - int8[dev]).max()), 4),
    }
