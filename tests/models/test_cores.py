"""Virtual core biopsies (models/tools/idc_build/cores.py) and the early rule chosen on them
(corerules.py): the build's case-level unit, checked on a small synthetic slide whose answer is known."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idc_build.corerules import MONOTONE, early_rule, rule_table
from idc_build.cores import cut_cores


def slide(width=20, height=20, idc=()):
    """Every cell of a width x height grid is a tissue patch; idc: the (gx, gy) cells holding IDC."""
    gy, gx = np.mgrid[:height, :width]
    gx, gy = gx.ravel(), gy.ravel()
    labels = np.array([int((x, y) in set(idc)) for x, y in zip(gx, gy)])
    return np.arange(len(gx)), gx, gy, labels


def test_strips_are_1_mm_wide_every_1_mm_and_labelled_with_a_margin():
    # IDC in rows 7 and 8 at column 3, and one cell in row 10 (the first row of the third horizontal strip)
    idx, gx, gy, labels = slide(idc=[(3, 7), (3, 8), (12, 10)])
    cores, ambiguous = cut_cores(1, idx, gx, gy, labels, directions=("horizontal", "vertical"))
    horizontal = {c.band: c for c in cores if c.direction == "horizontal"}
    # 4 strips of 5 rows; strip 1 (rows 5-9) holds 2 IDC patches; strip 2 (rows 10-14) holds 1
    assert all(len(c.idx) == 100 for c in horizontal.values())
    assert horizontal[1].label == 1 and horizontal[1].idc_patches == 2 and horizontal[1].idc_bin == "1-2"
    assert horizontal[2].label == 1 and horizontal[2].idc_patches == 1
    # strip 0 (rows 0-4) has no IDC and none in row 5 (its margin): negative; strip 3 (rows 15-19): negative
    assert horizontal[0].label == 0 and horizontal[3].label == 0
    # vertical: strip 0 (columns 0-4) holds column 3's IDC, strip 2 (10-14) column 12's; strips 1 (5-9) and 3
    # (15-19) are clean, and so are their margins (columns 4, 10 and 14 hold no IDC)
    vertical = {c.band: c for c in cores if c.direction == "vertical"}
    assert vertical[0].label == 1 and vertical[2].label == 1 and vertical[3].label == 0 and vertical[1].label == 0
    assert ambiguous == 0


def test_a_strip_with_idc_just_outside_its_edge_is_left_out():
    idx, gx, gy, labels = slide(idc=[(3, 5)])  # row 5: the first row of strip 1, the margin of strip 0
    cores, ambiguous = cut_cores(1, idx, gx, gy, labels, directions=("horizontal",))
    assert [c.band for c in cores] == [1, 2, 3] and ambiguous == 1


def test_a_strip_with_too_little_tissue_is_not_a_core():
    idx, gx, gy, labels = slide(width=2, height=20)  # a strip of 5 rows x 2 columns = 10 patches
    cores, _ = cut_cores(1, idx, gx, gy, labels, directions=("horizontal",))
    assert cores == []
    cores, _ = cut_cores(1, idx, gx, gy, labels, directions=("vertical",))  # one strip of 40 patches
    assert len(cores) == 1 and len(cores[0].idx) == 40


def test_diagonal_strips_cover_every_cell_once():
    idx, gx, gy, labels = slide()
    for direction in ("diagonal", "antidiagonal"):
        cores, _ = cut_cores(1, idx, gx, gy, labels, min_patches=1, directions=(direction,))
        cells = np.concatenate([c.idx for c in cores])
        assert sorted(cells.tolist()) == idx.tolist()


@settings(max_examples=200, deadline=None)
@given(neg=st.lists(st.floats(0, 1), min_size=1, max_size=40), pos=st.lists(st.floats(0, 1), min_size=1,
                                                                              max_size=40))
def test_the_early_threshold_lets_no_negative_core_fire(neg, pos):
    y = np.array([0] * len(neg) + [1] * len(pos))
    scores = {name: np.array(neg + pos) ** (i + 1) for i, name in enumerate(MONOTONE)}
    e = early_rule(scores, y)
    s = scores[e["rule"]]
    assert not (s[y == 0] >= e["threshold"]).any() and e["negative_cores_fired"] == 0
    assert e["positive_cores_fired"] == int((s[y == 1] >= e["threshold"]).sum())


@pytest.mark.parametrize("negative", [0.57, 0.29, 0.5699, 1.0])
def test_the_early_threshold_is_strictly_above_a_negative_core_s_score_on_its_4th_decimal(negative):
    """0.57 * 1e4 is 5699.999...: a threshold rounded down from it and up by 1e-4 was 0.57 itself."""
    scores = {name: np.array([negative, 1.0]) for name in MONOTONE}
    e = early_rule(scores, np.array([0, 1]))
    assert e["threshold"] > negative and e["negative_cores_fired"] == 0
    assert e["threshold"] == pytest.approx(negative + 1e-4, abs=1e-9) and round(e["threshold"], 4) == e["threshold"]


def test_each_rules_threshold_keeps_the_sensitivity_asked_for():
    rng = np.random.default_rng(1)
    y = np.array([0] * 50 + [1] * 50)
    scores = {"top3": np.r_[rng.uniform(0, 0.7, 50), rng.uniform(0.3, 1, 50)]}
    r = rule_table(scores, y, 0.98)["top3"]
    assert r["sensitivity"] >= 0.98 and r["true_positive"] >= 49
    # the highest such threshold: one step up would miss more than 2% of the positives
    assert (scores["top3"][y == 1] >= r["threshold"] + 1e-4).mean() < 0.98
