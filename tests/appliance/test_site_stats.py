"""The site validation statistics against hand-computed values and brute force."""

import math

import numpy as np
import pytest

from appliance.site.stats import (
    RECOMMENDATION_RULE,
    at_threshold,
    auc_delong,
    cases_needed,
    ci_overlap,
    recommend_threshold,
    roc_curve,
    spread,
    wilson,
)

Z = 1.959964


def test_wilson_known_values():
    # Wilson: centre = (p + z^2/2n) / (1 + z^2/n), half = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2), z^2 = 3.8415.
    # 0/10: centre = 0.19207/1.38415 = 0.13877, half = 1.41601 * sqrt(0.0096036) = 0.13877 -> (0, 0.2775)
    # 10/10: the mirror image -> (0.7225, 1); also the lower end is n / (n + z^2) = 10/13.8415
    # 5/10: centre 0.5, half = 1.41601 * sqrt(0.025 + 0.0096036) = 0.26341 -> (0.2366, 0.7634)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=5e-4)
    assert wilson(10, 10)[0] == pytest.approx(10 / (10 + Z * Z))
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def brute_force_auc(pos, neg) -> float:
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_is_the_pairwise_mann_whitney_count_with_ties():
    rng = np.random.default_rng(7)
    for _ in range(5):
        labels = rng.integers(0, 2, 80)
        scores = np.round(rng.random(80) + 0.3 * labels, 1)  # one decimal: many ties
        auc, (lo, hi) = auc_delong(labels, scores)
        assert auc == pytest.approx(brute_force_auc(scores[labels == 1], scores[labels == 0]))
        assert lo <= auc <= hi


def test_delong_variance_of_a_hand_worked_example():
    # malignant 0.9, 0.6, 0.4; benign 0.5, 0.4 (one tie, counted 1/2).
    # V10 (per malignant case, share of benign outscored) = 1, 1, 0.25 -> AUC 0.75, sample variance 0.1875
    # V01 (per benign case, share of malignant above it) = 2/3, 5/6 -> sample variance 1/72
    # var = 0.1875/3 + (1/72)/2 = 10/144, se = sqrt(10)/12; the upper end 0.75 + 1.96 se > 1 is clipped
    auc, (lo, hi) = auc_delong([1, 1, 1, 0, 0], [0.9, 0.6, 0.4, 0.5, 0.4])
    assert auc == pytest.approx(0.75)
    assert lo == pytest.approx(0.75 - Z * math.sqrt(10) / 12)
    assert hi == 1.0


def test_delong_ci_narrows_with_more_cases():
    rng = np.random.default_rng(3)

    def width(n: int) -> float:
        labels = np.repeat([1, 0], n)
        scores = np.concatenate([rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)])
        _, (lo, hi) = auc_delong(labels, scores)
        return hi - lo

    assert width(400) < width(100) < width(25)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both malignant and benign"):
        auc_delong([1, 1, 1], [0.2, 0.5, 0.9])


def test_roc_curve_runs_from_the_origin_through_every_distinct_score():
    labels = [1, 1, 0, 1, 0, 0]
    scores = [0.9, 0.7, 0.7, 0.4, 0.3, 0.1]
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert thresholds[0] == np.inf and list(thresholds[1:]) == [0.9, 0.7, 0.4, 0.3, 0.1]
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # at 0.7 both tied cases are called: 2 of 3 malignant, 1 of 3 benign
    assert (fpr[2], tpr[2]) == pytest.approx((1 / 3, 2 / 3))
    point = at_threshold(labels, scores, 0.7)
    assert (point["sensitivity"], point["specificity"]) == (0.6667, 0.6667)
    assert (point["tp"], point["fn"], point["tn"], point["fp"]) == (2, 1, 2, 1)


def test_at_threshold_leaves_an_empty_class_undefined():
    point = at_threshold([1, 1], [0.2, 0.8], 0.5)
    assert point["specificity"] is None and point["specificity_ci95"] == [0.0, 1.0]
    assert point["sensitivity"] == 0.5 and point["positive"] == 2 and point["negative"] == 0


def test_forty_malignant_cases_can_only_show_the_bound_of_forty_of_forty():
    rng = np.random.default_rng(11)
    malignant, benign = rng.uniform(0.5, 0.99, 40), rng.uniform(0.0, 0.6, 40)
    labels, scores = np.repeat([1, 0], 40), np.concatenate([malignant, benign])
    rec = recommend_threshold(labels, scores, target=0.95)
    assert rec["bar"] == round(40 / (40 + Z * Z), 4) and rec["limited_by_cases"] is True
    assert rec["threshold"] == malignant.min() and rec["tp"] == 40 and rec["fn"] == 0
    assert rec["target"] == 0.95 and rec["rule"] == RECOMMENDATION_RULE


def test_five_hundred_malignant_cases_allow_a_few_misses_at_target_098():
    rng = np.random.default_rng(5)
    labels = np.repeat([1, 0], 500)
    scores = np.concatenate([rng.beta(6, 2, 500), rng.beta(2, 6, 500)])
    rec = recommend_threshold(labels, scores, target=0.98)
    assert rec["bar"] == 0.98 and rec["limited_by_cases"] is False
    assert rec["fn"] >= 1
    # the highest such candidate: catching one case fewer would no longer show 0.98
    assert wilson(rec["tp"], 500)[0] >= 0.98 > wilson(rec["tp"] - 1, 500)[0]
    assert rec["sensitivity_ci95"][0] >= 0.98


def test_cases_needed_sentences():
    assert cases_needed(18, 25) == (
        "No site threshold is recommended: 12 more malignant and 5 more benign callable cases are needed "
        "(at least 30 of each)."
    )
    assert cases_needed(30, 25) == (
        "No site threshold is recommended: 5 more benign callable cases are needed (at least 30 of each)."
    )
    assert cases_needed(29, 40) == (
        "No site threshold is recommended: 1 more malignant callable case is needed (at least 30 of each)."
    )
    assert cases_needed(30, 30) is None
    assert cases_needed(5, 9, minimum=10) == (
        "No site threshold is recommended: 5 more malignant and 1 more benign callable cases are needed "
        "(at least 10 of each)."
    )


def test_ci_overlap_counts_touching_ends():
    assert ci_overlap([0.1, 0.5], [0.5, 0.9])
    assert ci_overlap([0.1, 0.9], [0.3, 0.4])
    assert not ci_overlap([0.1, 0.49], [0.5, 0.9])


def test_spread_of_the_finite_values():
    values = list(range(1, 101)) + [None, float("nan"), float("inf")]
    assert spread(values) == {"n": 100, "p05": 5.95, "p50": 50.5, "p95": 95.05}
    assert spread([None, float("nan")]) is None
    assert spread([]) is None
