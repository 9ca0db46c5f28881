"""The case rules and the context stage's grid: pure functions, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.pipeline.context import context_grid
from appliance.pipeline.heatmap import label_components
from appliance.pipeline.mil import LargestRegion, case_score, largest_region

cells = st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11), st.floats(0, 1)), min_size=1, max_size=90,
                 unique_by=lambda c: (c[0], c[1]))


def brute_force(cs, threshold):
    """Largest area and mass from a flood fill of the whole grid (the drawn regions' own labelling)."""
    hot = np.zeros((12, 12), bool)
    prob = np.zeros((12, 12))
    for x, y, p in cs:
        if p >= threshold:
            hot[y, x], prob[y, x] = True, p
    labels, n = label_components(hot)
    if n == 0:
        return 0, 0.0
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    masses = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n + 1)[1:]
    return int(areas.max()), float(masses.max())


@settings(max_examples=200, deadline=None)
@given(cells, st.floats(0.05, 0.95), st.randoms(use_true_random=False))
def test_largest_region_never_falls_and_ends_at_the_flood_fill_answer_in_any_order(cs, threshold, rnd):
    order = list(cs)
    rnd.shuffle(order)
    r = LargestRegion(threshold)
    last = (0, 0.0)
    for x, y, p in order:
        r.add(x, y, p)
        assert r.area >= last[0] and r.mass >= last[1] - 1e-12  # what makes an early positive final
        last = (r.area, r.mass)
    area, mass = brute_force(cs, threshold)
    assert r.area == area
    assert r.mass == pytest.approx(mass, abs=1e-9)


def test_a_cell_added_twice_is_refused():
    r = LargestRegion(0.5)
    r.add(3, 4, 0.9)
    with pytest.raises(ValueError, match="added twice"):
        r.add(3, 4, 0.8)


def test_regions_are_4_connected_and_cold_cells_break_them():
    gx, gy = np.array([0, 1, 2, 2, 4]), np.array([0, 0, 0, 1, 1])
    p = np.array([0.9, 0.8, 0.2, 0.7, 0.95])  # (2,0) is cold: (2,1) touches (1,0) only diagonally
    assert largest_region(gx, gy, p, 0.5) == (2, pytest.approx(1.7))
    assert case_score("largest-region-area", 15, 0.5, gx, gy, p) == 2.0
    assert case_score("largest-region-mass", 15, 0.5, gx, gy, p) == pytest.approx(1.7)
    assert case_score("top-k-mean", 2, None, gx, gy, p) == pytest.approx((0.95 + 0.9) / 2)
    with pytest.raises(ValueError, match="unknown case rule"):
        case_score("max", 15, 0.5, gx, gy, p)


def test_context_grid_places_each_cell_and_marks_it_scored():
    grid, rows, cols = context_grid(np.array([5, 7, 5]), np.array([10, 10, 12]), np.array([0.1, 0.2, 0.3]))
    assert grid.shape == (1, 2, 3, 3) and grid.dtype == np.float32
    assert grid[0, 1].sum() == 3 and grid[0, 0, 2, 0] == pytest.approx(0.3)
    assert (rows.tolist(), cols.tolist()) == ([0, 0, 2], [0, 2, 0])
    with pytest.raises(ValueError, match="same grid cell"):
        context_grid(np.array([1, 1]), np.array([2, 2]), np.array([0.5, 0.6]))
