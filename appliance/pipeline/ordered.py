"""The ordered scorer: batches of patches go to the engine without waiting for their results (OpenVINO's async
queue), and come back out in the order they were submitted, whatever order or moment the engine returns them
in. A stain-normalising model's batches first wait for the case's one normalising map (``StainMap``).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from appliance.model.manifest import StainSpec
from appliance.model.scoring import Scored, Scorer
from appliance.pipeline.patches import Positions
from appliance.pipeline.qc import CaseQc
from appliance.pipeline.stain import StainFit, apply_map, normalising_map

Folded = tuple[Positions, np.ndarray, "np.ndarray | None"]  # (positions, probabilities, OOD distances or None)

__all__ = ["Folded", "OrderedScorer", "StainMap"]


class OrderedScorer:
    """Submits batches to ``scorer`` (the engine's streaming front end, ``Engine.scorer``) tagged with their
    submission number, and hands each one's results on with its patches' positions, in submission order."""

    def __init__(self, scorer: Scorer):
        self.scorer = scorer
        self._inflight: dict[int, Positions] = {}
        self._next_id = 0
        self._arrived: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # back ahead of an earlier batch
        self._next_fold = 0  # the batch handed on next

    def submit(self, positions: Positions, pixels: np.ndarray) -> None:
        """One batch: the patches' pixels to the engine (not waiting for the result), their positions kept."""
        batch_id, self._next_id = self._next_id, self._next_id + 1
        self._inflight[batch_id] = positions
        self.scorer.submit(pixels, batch_id)

    def in_order(self, results: Iterable[Scored] | None = None) -> Iterator[Folded]:
        """Takes in ``results`` (by default what the scorer has finished since it was last asked), then yields
        (positions, probabilities, OOD distances or None) of every batch whose turn has come: each batch
        after all those submitted before it, results that came back early held until then."""
        for batch_id, probs, distances in (self.scorer.done() if results is None else results):
            self._arrived[batch_id] = (probs, distances)
        while self._next_fold in self._arrived:
            batch_id, self._next_fold = self._next_fold, self._next_fold + 1
            probs, distances = self._arrived.pop(batch_id)
            yield self._inflight.pop(batch_id), probs, distances

    def wait(self) -> list[Scored]:
        """Blocks until every submitted batch is scored and closes the scorer; returns the results not yet taken
        in (for ``in_order``)."""
        results = self.scorer.wait()
        self.scorer.close()
        return results

    @property
    def pending(self) -> int:
        """Batches submitted and not yet handed on."""
        return len(self._inflight)


class StainMap:
    """The case's one stain-normalising map, for a model whose ``stain`` (its manifest's) asks for Macenko
    normalisation towards ``reference``. It is made from the stain's first judgement, so which tile it comes
    from depends on the tiles alone; until then the case's patches wait. A model that does not normalise
    sends its patches as they are."""

    def __init__(self, stain: StainSpec, reference: StainFit | None):
        self.stain, self.reference = stain, reference
        self.map: np.ndarray | None = None

    @property
    def waiting(self) -> bool:
        """The model normalises and the case's map is not made yet."""
        return self.stain.normalisation == "macenko" and self.map is None

    def ready(self, qc: CaseQc, final: bool = False) -> bool:
        """Whether patches may go to the engine now. For a normalising model the map is made here, from the
        stain's first judgement, once ``qc`` has one (or, ``final``, when the case has ended: the caller judges
        a small case's stain first); an unmeasurable stain gives the identity."""
        if self.waiting:
            if not qc.fits and not final:
                return False
            fit = qc.first_fit
            self.map = normalising_map(fit, self.reference) if fit is not None else np.eye(3, dtype=np.float32)
        return True

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """A batch's pixels as the engine is to see them: re-stained with the map, when there is one."""
        return pixels if self.map is None else apply_map(pixels, self.map)
