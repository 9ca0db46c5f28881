"""The call as pure functions (appliance/pipeline/decision.py): the same measurements, the same call."""

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.pipeline.decision import case_score, cannot_call_reasons, final_score, is_early_positive, make_call
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


@settings(max_examples=300, deadline=None)
@given(first=st.lists(st.floats(0, 1), min_size=1, max_size=60), refined=st.lists(st.floats(0, 1), min_size=1,
                                                                                   max_size=60),
       k_early=st.integers(1, 10), k_final=st.integers(1, 10), early_threshold=st.floats(0, 1),
       case_threshold=st.floats(0, 1), qc=st.lists(st.sampled_from(["stain-out-of-range", "blurred"]), max_size=2))
def test_the_final_rule_never_reverses_an_early_positive(first, refined, k_early, k_final, early_threshold,
                                                       case_threshold, qc):
    """Whatever the refined probabilities and the final rule's threshold, and whatever QC finds after the early
    call, a case whose early rule passed its threshold is suspicious; otherwise the final rule decides."""
    mil = TopKMean(k_early)
    for p in first:
        mil.add(p)
    early_score = case_score(CaseRule.TOP_K_MEAN, mil, None)
    final = final_score(CaseRule.TOP_K_MEAN_REFINED, k_final, early_score, refined)
    fired = mil.full and early_score >= early_threshold
    reasons = [Reason(code, code) for code in qc]
    call = make_call(early_positive=fired, reasons=reasons, score=final, threshold=case_threshold)
    if fired:
        assert call.verdict == Verdict.SUSPICIOUS and call.warnings == reasons and not call.reasons
    elif reasons:
        assert call.verdict == Verdict.CANNOT_CALL
    else:
        assert call.verdict == (Verdict.SUSPICIOUS if final >= case_threshold else Verdict.BENIGN)
    # a first-stage final rule is the early rule's own score
    assert final_score(CaseRule.TOP_K_MEAN, k_final, early_score, refined) == early_score
