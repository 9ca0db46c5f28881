"""The early positive, judged at the end of each tile on exactly that tile's prefix of the case.

Each tile closes a checkpoint: tiles 1..N gave so many patches, and their QC was clean or not. First-stage
probabilities are folded into the early rule's figures in cut order, and a batch is folded piece by piece,
each piece ending where the next checkpoint's patches end, so tile N is judged once every patch of tiles 1..N
is folded and none after them. The first N whose prefix passes is the same in every run, and the call is
final: the early rule's figures never fall as patches are added.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from appliance.model.manifest import DecisionSpec, PatchSpec
from appliance.pipeline.decision import ThresholdInForce, case_score, is_early_positive
from appliance.pipeline.mil import LargestRegion, TopKMean
from appliance.pipeline.patches import Positions
from appliance.terms import CaseRule

__all__ = ["Checkpoint", "Checkpoints"]


@dataclass(frozen=True)
class Checkpoint:
    """The end of tile N: how many patches tiles 1..N gave, and their QC (known when the tile is cut)."""

    tile: int
    patches: int
    qc_clean: bool  # no blocking QC finding over tiles 1..N, and the stain judged on them


class Checkpoints:
    """The early rule's running figures and its judgement at every tile's checkpoint.

    ``decision`` is the model's (its manifest's), ``patch`` gives the grid stride a region rule's cells are on,
    and ``thresholds`` are the ones in force. ``on_early_positive(score, tile)`` is called once, when the first
    checkpoint passes; ``after_tiles`` is that tile from then on."""

    def __init__(self, decision: DecisionSpec, patch: PatchSpec, thresholds: ThresholdInForce,
                 on_early_positive: Callable[[float, int], None] | None = None):
        self.decision, self.patch, self.thresholds = decision, patch, thresholds
        self.rule = decision.early_rule  # on first-stage probabilities, so its score never falls
        self.mil = TopKMean(self.rule.top_k)
        # the region rule's figures, on first-stage probabilities (they only ever grow: see LargestRegion)
        self.region = (LargestRegion(decision.region_threshold) if self.rule.rule != CaseRule.TOP_K_MEAN
                       else None)
        self.on_early_positive = on_early_positive or (lambda score, tiles: None)
        self.folded = 0  # patches folded into the figures, in cut order
        self.after_tiles: int | None = None
        self._pending: deque[Checkpoint] = deque()

    @property
    def score(self) -> float:
        """The score under the early rule of the patches folded so far."""
        return case_score(self.rule.rule, self.mil, self.region)

    @property
    def early_positive(self) -> bool:
        return self.after_tiles is not None

    def tile_ended(self, tile: int, patches: int, qc_clean: bool) -> None:
        """Tile ``tile`` is cut: tiles 1..tile gave ``patches`` patches (in all), with a clean QC or not."""
        self._pending.append(Checkpoint(tile, patches, qc_clean))

    def fold(self, pos: Positions, probs: np.ndarray) -> None:
        """The next patches in cut order and their first-stage probabilities (float64, rounded), judging every
        checkpoint they complete on its own prefix."""
        start = 0
        while True:
            self.judge()
            if start == len(probs):
                break
            # up to the end of the next tile's patches, so each tile is judged on exactly its own prefix
            end = len(probs)
            if self._pending:
                end = min(end, start + self._pending[0].patches - self.folded)
            self.mil.add_many(probs[start:end])
            if self.region is not None:
                self._add_to_region(pos[start:end], probs[start:end])
            self.folded += end - start
            start = end

    def judge(self) -> None:
        """The early positive at each tile N whose patches are all folded, first N first."""
        while self._pending and self._pending[0].patches <= self.folded:
            cp = self._pending.popleft()
            if not self.early_positive and is_early_positive(
                    qc_clean=cp.qc_clean, patches=cp.patches, min_patches=self.decision.min_patches,
                    mil_full=self.mil.full, score=self.score, threshold=self.thresholds.early_threshold):
                self.after_tiles = cp.tile
                self.on_early_positive(self.score, cp.tile)

    def _add_to_region(self, pos: Positions, probs: np.ndarray) -> None:
        hot = probs >= self.region.threshold  # the others never join a region
        stride = self.patch.stride
        for gx, gy, p in zip((pos[hot, 0] // stride).tolist(), (pos[hot, 1] // stride).tolist(),
                             probs[hot].tolist()):
            self.region.add(gx, gy, p)
