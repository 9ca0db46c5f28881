"""The early positive's checkpoints on their own (appliance.pipeline.checkpoints), with the committed model's
decision: a tile is judged on exactly its own prefix of the case once all of it is folded, the first tile whose
prefix passes with a clean QC makes the call, never one whose QC is not clean, and the call is final."""

import numpy as np
import pytest

from appliance.model.manifest import read_manifest
from appliance.pipeline.checkpoints import Checkpoints
from appliance.pipeline.decision import ThresholdInForce
from appliance.terms import CaseRule
from tests.conftest import MODEL_DIR

MANIFEST = read_manifest(MODEL_DIR)
DECISION = MANIFEST.decision  # top-5 mean on first-stage probabilities, at least 15 patches


def positions(n: int, start: int = 0) -> np.ndarray:
    """n patches in a row of the grid, from grid column ``start``."""
    stride = MANIFEST.patch.stride
    return np.array([[(start + i) * stride, 0, stride, stride] for i in range(n)], dtype=np.int64)


def checkpoints(decision=DECISION, thresholds=None) -> tuple[Checkpoints, list]:
    calls = []
    cp = Checkpoints(decision, MANIFEST.patch, thresholds or ThresholdInForce.of_model(decision),
                     lambda score, tile: calls.append((score, tile)))
    return cp, calls


# tile 1: 10 patches, five of them sure (too few patches for a call); tile 2: 10 low ones; tile 3: 10 surer still
PROBS = np.array([0.9] * 5 + [0.2] * 5 + [0.1] * 10 + [0.99] * 10)
TILES = ((1, 10), (2, 20), (3, 30))  # (tile, patches of tiles 1..tile)


def test_the_committed_decision_is_what_these_tests_assume():
    early = DECISION.early_rule
    assert (early.rule, early.top_k, DECISION.min_patches) == (CaseRule.TOP_K_MEAN, 5, 15)
    assert 0.2 < early.threshold < 0.9


def test_each_tile_is_judged_on_its_own_prefix_not_on_the_batch_that_completes_it():
    cp, calls = checkpoints()
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=True)
    cp.fold(positions(30), PROBS)  # one batch holding all three tiles
    assert cp.after_tiles == 2 and cp.early_positive
    assert calls == [(pytest.approx(0.9), 2)]  # the top 5 of tiles 1..2, not of the whole batch
    assert cp.folded == 30 and cp.score == pytest.approx(0.99)


def test_never_at_a_tile_whose_qc_is_not_clean():
    cp, calls = checkpoints()
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=tile != 2)
    cp.fold(positions(30), PROBS)
    assert cp.after_tiles == 3 and calls == [(pytest.approx(0.99), 3)]
    cp, calls = checkpoints()
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=False)
    cp.fold(positions(30), PROBS)
    assert cp.after_tiles is None and not cp.early_positive and calls == []


@pytest.mark.parametrize("split", range(31))
def test_the_same_tile_however_the_patches_are_batched(split):
    cp, calls = checkpoints()
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=True)
    cp.fold(positions(split), PROBS[:split])
    if split < 20:
        assert calls == []  # tile 2 is not all folded yet
    cp.fold(positions(30 - split, split), PROBS[split:])
    assert cp.after_tiles == 2 and calls == [(pytest.approx(0.9), 2)]


def test_a_tile_waits_until_every_one_of_its_patches_is_folded():
    cp, calls = checkpoints()
    cp.tile_ended(1, 20, qc_clean=True)
    cp.fold(positions(19), np.full(19, 0.95))
    assert cp.after_tiles is None and cp.score == pytest.approx(0.95)
    cp.fold(positions(1, 19), np.array([0.1]))
    assert cp.after_tiles == 1 and calls == [(pytest.approx(0.95), 1)]


def test_the_top_k_must_be_full():
    cp, calls = checkpoints(DECISION.model_copy(update={"min_patches": 1}))
    for tile in range(1, 6):
        cp.tile_ended(tile, tile, qc_clean=True)
        cp.fold(positions(1, tile - 1), np.array([0.99]))
        assert cp.early_positive == (tile == 5)
    assert calls == [(pytest.approx(0.99), 5)]


def test_the_call_is_final_and_made_once():
    cp, calls = checkpoints()
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=True)
    cp.fold(positions(30), PROBS)
    for tile in range(4, 10):  # low tiles, one with a QC finding: the call stands
        cp.tile_ended(tile, 30 + 10 * (tile - 3), qc_clean=tile != 5)
        cp.fold(positions(10, 30 + 10 * (tile - 4)), np.full(10, 0.01))
    assert cp.after_tiles == 2 and len(calls) == 1 and cp.score == pytest.approx(0.99)


def test_the_thresholds_in_force_decide():
    site = ThresholdInForce.of_site(DECISION, 0.95, "2026-01-01T00:00:00+00:00", "0" * 64)
    assert site.early_threshold == 0.95  # the early rule is the final rule: the site's threshold holds for both
    cp, calls = checkpoints(thresholds=site)
    for tile, patches in TILES:
        cp.tile_ended(tile, patches, qc_clean=True)
    cp.fold(positions(30), PROBS)
    assert cp.after_tiles == 3 and calls == [(pytest.approx(0.99), 3)]


def test_a_region_rule_counts_connected_hot_cells_on_the_grid():
    stride = MANIFEST.patch.stride
    region = DECISION.model_copy(update={"case_rule": CaseRule.LARGEST_REGION_AREA, "region_threshold": 0.5,
                                         "case_threshold": 3.0, "early": None, "min_patches": 1})
    cp, calls = checkpoints(region)
    assert cp.region is not None and cp.rule.threshold == 3.0

    def cells(*xy):
        return np.array([[x * stride, y * stride, stride, stride] for x, y in xy], dtype=np.int64)

    cp.tile_ended(1, 4, qc_clean=True)  # a diagonal: no two hot cells share an edge
    cp.fold(cells((0, 0), (1, 1), (2, 2), (1, 0)), np.array([0.9, 0.9, 0.9, 0.4]))
    assert cp.score == 1.0 and not cp.early_positive  # (1, 0) is not hot
    cp.tile_ended(2, 5, qc_clean=True)
    cp.fold(cells((0, 1)), np.array([0.6]))  # joins (0, 0) and (1, 1)
    assert cp.score == 3.0 and calls == [(3.0, 2)]
