"""The call as pure functions (appliance/pipeline/decision.py): the same measurements, the same call."""

import pytest

from appliance.pipeline.decision import (case_score, cannot_call_reasons, is_early_positive, make_call)
from appliance.pipeline.mil import LargestRegion, TopKMean
from appliance.pipeline.qc import Reason
from appliance.terms import CaseRule, Verdict

BLUR = Reason("out-of-focus", "blurred")


def test_the_case_score_follows_the_rule():
    mil, region = TopKMean(3), LargestRegion(0.5)
    for gx, p in enumerate((0.9, 0.8, 0.7, 0.1)):
        mil.add(p)
        region.add(gx, 0, p)
    assert case_score(CaseRule.TOP_K_MEAN, mil, None) == pytest.approx(0.8)
    assert case_score(CaseRule.LARGEST_REGION_AREA, mil, region) == 3.0
    assert case_score(CaseRule.LARGEST_REGION_MASS, mil, region) == pytest.approx(2.4)
    with pytest.raises(ValueError, match="needs the case's largest region"):
        case_score(CaseRule.LARGEST_REGION_AREA, mil, None)


@pytest.mark.parametrize("change, expected", [
    ({}, True),
    ({"qc_clean": False}, False),
    ({"patches": 14}, False),
    ({"mil_full": False}, False),
    ({"score": 0.49}, False),
    ({"score": 0.5}, True),  # at the threshold counts, as for the final call
])
def test_an_early_positive_needs_clean_qc_enough_patches_a_full_top_k_and_the_threshold(change, expected):
    args = dict(qc_clean=True, patches=15, min_patches=15, mil_full=True, score=0.8, threshold=0.5) | change
    assert is_early_positive(**args) is expected


def test_why_a_case_cannot_be_called():
    assert [r.code for r in cannot_call_reasons(tiles=0, patches_scored=0, patches_seen=0, qc_reasons=[],
                                                min_patches=15)] == ["no-tiles"]
    (blank,) = cannot_call_reasons(tiles=7, patches_scored=0, patches_seen=40, qc_reasons=[BLUR], min_patches=15)
    assert blank.code == "no-tissue" and "7 tiles (40 patches)" in blank.message
    few = cannot_call_reasons(tiles=7, patches_scored=9, patches_seen=40, qc_reasons=[BLUR], min_patches=15)
    assert [r.code for r in few] == ["out-of-focus", "too-little-tissue"] and "Only 9" in few[1].message
    assert cannot_call_reasons(tiles=7, patches_scored=15, patches_seen=40, qc_reasons=[], min_patches=15) == []


def test_the_verdict():
    assert make_call(early_positive=False, reasons=[], score=0.5, threshold=0.5) == (Verdict.SUSPICIOUS, [], [])
    assert make_call(early_positive=False, reasons=[], score=0.49, threshold=0.5) == (Verdict.BENIGN, [], [])
    assert make_call(early_positive=False, reasons=[BLUR], score=0.9, threshold=0.5) == (
        Verdict.CANNOT_CALL, [BLUR], [])
    # an early positive is final: QC found after it is a warning, never a reason
    assert make_call(early_positive=True, reasons=[BLUR], score=0.1, threshold=0.5) == (
        Verdict.SUSPICIOUS, [], [BLUR])
