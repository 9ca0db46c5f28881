"""Statistics of a site validation in plain numpy: Wilson intervals, ROC, DeLong AUC, the threshold rule."""

from __future__ import annotations

import math

import numpy as np

RECOMMENDATION_RULE = (
    "A case is called suspicious when its score is at or above the threshold. "
    "The recommended threshold is the highest score of one of this lab's malignant cases at which the "
    "lower end of the 95% Wilson interval of sensitivity (malignant cases caught, out of all malignant cases) "
    "is at least the bar. The bar is the target sensitivity, unless the lab has too few malignant cases to "
    "show it: then the bar is the lower end of the 95% Wilson interval for catching every malignant case, "
    "and the recommended threshold catches them all."
)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) for ``k`` successes out of ``n``; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _split(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the malignant (label 1) and benign (label 0) cases; ValueError if either class is empty."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant), one per score")
    if not np.isfinite(scores).all():
        raise ValueError("every score must be a finite number (leave out cases that could not be called)")
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"need both malignant and benign cases (got {len(pos)} malignant, {len(neg)} benign)")
    return pos, neg


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the average of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    return (starts + (counts + 1) / 2.0)[inverse]


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, from (0, 0) at threshold +inf.

    A case is called positive when its score is >= the threshold.
    """
    pos, neg = _split(labels, scores)
    thresholds = np.concatenate([[np.inf], np.unique(np.concatenate([pos, neg]))[::-1]])

    def called(s: np.ndarray) -> np.ndarray:
        return (len(s) - np.searchsorted(np.sort(s), thresholds, side="left")) / len(s)

    return called(neg), called(pos), thresholds


def auc_delong(labels, scores) -> tuple[float, tuple[float, float]]:
    """AUC (Mann-Whitney, ties count 1/2) and its 95% CI from DeLong's variance, clipped to [0, 1].

    V10[i] is the share of benign cases malignant case i outscores, V01[j] the share of malignant cases that
    outscore benign case j; var = var(V10)/m + var(V01)/n. Computed from midranks (Sun & Xu 2014), so it
    needs no m-by-n matrix. With a single case in a class its variance is unknown and the CI is (0, 1).
    """
    pos, neg = _split(labels, scores)
    m, n = len(pos), len(neg)
    ranks = _midranks(np.concatenate([pos, neg]))
    v10 = (ranks[:m] - _midranks(pos)) / n
    v01 = 1.0 - (ranks[m:] - _midranks(neg)) / m
    auc = float(v10.mean())
    if m < 2 or n < 2:
        return auc, (0.0, 1.0)
    se = math.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return auc, (max(0.0, auc - 1.959964 * se), min(1.0, auc + 1.959964 * se))


def at_threshold(labels, scores, threshold: float) -> dict:
    """Counts, sensitivity and specificity with Wilson 95% CIs when calling score >= ``threshold``."""
    labels = np.asarray(labels)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    tp, fn = int((called & (labels == 1)).sum()), int((~called & (labels == 1)).sum())
    tn, fp = int((~called & (labels == 0)).sum()), int((called & (labels == 0)).sum())

    def rate(k: int, n: int) -> float | None:
        return round(k / n, 4) if n else None

    return {
        # not rounded: it is the exact value the counts were taken at, and rounding up could drop a case
        "threshold": float(threshold),
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "sensitivity_ci95": [round(v, 4) for v in wilson(tp, tp + fn)],
        "specificity_ci95": [round(v, 4) for v in wilson(tn, tn + fp)],
        "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "positive": tp + fn, "negative": tn + fp,
    }


def recommend_threshold(labels, scores, target: float) -> dict:
    """The site threshold by the written rule (``RECOMMENDATION_RULE``).

    Candidates are the malignant cases' scores. The bar is min(target, Wilson lower bound of n_pos/n_pos):
    with n_pos malignant cases even catching all of them only shows sensitivity >= that bound. The
    threshold is the highest candidate whose Wilson 95% lower bound of sensitivity is >= the bar, which
    keeps specificity as high as the sensitivity bar allows.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    pos, _ = _split(labels, scores)
    n_pos = len(pos)
    bar = min(target, wilson(n_pos, n_pos)[0])
    candidates = np.unique(pos)[::-1]
    caught = n_pos - np.searchsorted(np.sort(pos), candidates, side="left")
    # caught grows as the candidate falls and the last catches every case (bound >= bar), so one always passes
    passes = [wilson(int(k), n_pos)[0] >= bar for k in caught]
    threshold = float(candidates[passes.index(True)])
    return at_threshold(labels, scores, threshold) | {
        "target": target, "bar": round(bar, 4), "rule": RECOMMENDATION_RULE, "limited_by_cases": bar < target,
    }


def cases_needed(n_malignant: int, n_benign: int, minimum: int = 30) -> str | None:
    """One sentence saying how many more callable cases of each class a recommendation needs; None if enough."""
    short = [(minimum - n, name) for n, name in ((n_malignant, "malignant"), (n_benign, "benign")) if n < minimum]
    if not short:
        return None
    parts = " and ".join(f"{k} more {name}" for k, name in short)
    noun = "case is" if len(short) == 1 and short[0][0] == 1 else "cases are"
    return f"No site threshold is recommended: {parts} callable {noun} needed (at least {minimum} of each)."


def ci_overlap(a: list[float], b: list[float]) -> bool:
    """Whether two closed intervals [lo, hi] share at least one point."""
    return max(a[0], b[0]) <= min(a[1], b[1])


def spread(values) -> dict | None:
    """n and the 5th, 50th and 95th percentiles (linear) of the finite values; None if there are none."""
    x = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None
    p05, p50, p95 = np.percentile(x, [5, 50, 95])
    return {"n": int(len(x)), "p05": round(float(p05), 4), "p50": round(float(p50), 4), "p95": round(float(p95), 4)}
