"""Classification metrics in plain numpy (pure functions; no scikit-learn at run time)."""

from __future__ import annotations

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties get average ranks).

    None when only one class is present, because the AUC is then undefined.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks for ties
    _, start_idx, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start_idx + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """AUC, balanced accuracy, F1, sensitivity and specificity at ``threshold`` (predicted = score >= t)."""
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp = int((pred & labels).sum())
    tn = int((~pred & ~labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    prec = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    bal = (sens + spec) / 2 if sens is not None and spec is not None else None
    return {
        "n": int(len(labels)),
        "positives": int(labels.sum()),
        "auc": roc_auc(labels, scores),
        "balanced_accuracy": bal,
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
        "precision": prec,
        "tp": tp, "tn": tn, "fp": fp, "fn": fn,
    }


def top_k_mean(scores: np.ndarray, k: int) -> float:
    """Mean of the k largest scores (all of them if there are fewer than k)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    return float(s[:k].mean()) if len(s) else 0.0
