"""The shift gates' limits (models/tools/idc_build/gates.py), set on small synthetic calibrations whose answer is
known: the stain limit at a shift's crossing, never beyond the furthest validated reading; the OOD limit within
the budget of 1 refused slide in 7 that the QC's refusals share."""

import pytest

from idc_build.gates import ood_limit, rules_hold, outcomes, stain_limit


def curve(aucs):
    return [{"turn_deg": t, "pooled_auc": a} for t, a in zip((0, 10, 20), aucs)]


def items(shift, readings_by_turn, ood=1.0):
    out = []
    for turn, readings in readings_by_turn.items():
        for n, r in enumerate(readings):
            out.append({"shift": shift, "turn_deg": turn, "slide": n, "reading": r, "stain_problem": None,
                        "other": [], "ood": ood + n / 100, "called": "malignant", "idc_patches": 1})
    return out


SEVEN = {0: [1] * 7, 10: [5, 6, 7, 8, 9, 10, 11], 20: [30, 15, 16, 17, 18, 19, 20]}


def test_the_stain_limit_is_the_smallest_crossing_reading_rounded_down():
    curves = {"a": curve([0.90, 0.89, 0.80]), "b": curve([0.90, 0.90, 0.90])}  # a falls by 0.02 at turn 11
    limit = stain_limit(curves, items("a", SEVEN) + items("b", SEVEN))
    assert limit["per_shift"]["a"]["crossing_turn_deg"] == pytest.approx(11.1, abs=0.05)
    # median reading 8 at turn 10, 18 at 20: 8 + 0.11 * 10
    assert limit["per_shift"]["a"]["reading_deg"] == pytest.approx(9.1, abs=0.05)
    assert limit["limit_deg"] == 9.0 and limit["set_by"] == "a"


def test_where_no_shift_falls_the_limit_is_the_furthest_reading_validated_within_the_refusal_budget():
    curves = {"a": curve([0.90, 0.90, 0.89]), "b": curve([0.90, 0.90, 0.90])}
    limit = stain_limit(curves, items("a", SEVEN) + items("b", {**SEVEN, 20: [21, 22, 23, 24, 25, 26, 27]}))
    # of 7 slides 1 may exceed it: the 6th reading at the last turn
    assert limit["per_shift"]["a"]["validated_to_deg"] == 20 and limit["per_shift"]["b"]["validated_to_deg"] == 26
    assert limit["limit_deg"] == 26.0 and "validated extent" in limit["set_by"]


def test_a_crossing_below_another_shift_s_validated_extent_sets_the_limit():
    curves = {"a": curve([0.90, 0.89, 0.80]), "b": curve([0.90, 0.90, 0.90])}
    limit = stain_limit(curves, items("a", SEVEN) + items("b", SEVEN))
    assert limit["per_shift"]["b"]["validated_to_deg"] == 20 and limit["limit_deg"] == 9.0


def test_the_ood_limit_leaves_the_qc_s_refusals_inside_the_budget():
    curves = {"a": curve([0.90, 0.90, 0.90])}
    calibration = items("a", SEVEN)  # OOD 1.00 .. 1.06 per turn
    # stain limit 29: slide 0 (reading 30, the lowest OOD) refused by the QC at turn 20, so the OOD may refuse
    # none of the others there
    ood = ood_limit(curves, calibration, 29)
    assert ood == 1.06
    rows = outcomes(curves, calibration, 29, ood)
    assert [r["refused"] for r in rows] == [0, 0, 1]
    assert rules_hold(rows)["at_most_1_in_7_refused_where_auc_holds"]
    # without a QC refusal the OOD alone may refuse one slide in 7 everywhere
    assert ood_limit(curves, calibration, 40) == 1.05


def test_where_the_qc_alone_is_over_budget_the_ood_keeps_its_own_budget_and_the_excess_is_reported():
    curves = {"a": curve([0.90, 0.90, 0.90])}
    calibration = items("a", SEVEN)
    ood = ood_limit(curves, calibration, 17.5)  # turn 20: 4 slides over the stain limit
    assert ood == 1.05
    rows = outcomes(curves, calibration, 17.5, ood)
    assert rows[2]["refused"] == 4 and not rules_hold(rows)["at_most_1_in_7_refused_where_auc_holds"]
