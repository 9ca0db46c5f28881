"""TriageSession: the one streaming path from tiles to a verdict, shared by the daemon and `appliance triage`."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from .. import RESEARCH_USE_NOTICE
from ..engine import Engine
from ..errors import InputError
from .mil import TopKMean
from .patches import Patch, cut_patches
from .tissue import tissue_fraction

SUSPICIOUS = "suspicious"
BENIGN = "benign-appearing"
CANNOT_CALL = "cannot-call"
VERDICTS = (SUSPICIOUS, BENIGN, CANNOT_CALL)


@dataclass(frozen=True)
class Reason:
    """Why a case cannot be called: a stable code for machines and a sentence for people."""

    code: str
    message: str


@dataclass(frozen=True)
class PatchScore:
    x: int
    y: int
    w: int
    h: int
    probability: float


@dataclass
class TriageResult:
    verdict: str
    score: float
    threshold: float
    reasons: list[Reason]
    model: dict
    timings_ms: dict[str, float]
    patches: list[PatchScore]
    tiles: int
    patches_seen: int
    early_positive: bool
    early_positive_after_tiles: int | None
    top_k: int
    research_use_only: bool = True
    notice: str = RESEARCH_USE_NOTICE

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_patches"] = [asdict(p) for p in self.top_patches()]
        return d

    def top_patches(self) -> list[PatchScore]:
        """The patches that drove the call, highest probability first."""
        return sorted(self.patches, key=lambda p: p.probability, reverse=True)[: self.top_k]


Event = Callable[[str, dict], None]


class TriageSession:
    """Feed tiles as they arrive with ``add_tile``; ``finish`` returns the verdict.

    Patches are scored in batches while tiles stream in. A suspicious call made early (the top-k mean
    passed the threshold) is final, because adding patches can never lower a full top-k mean.
    """

    def __init__(self, engine: Engine, *, batch_size: int = 64, on_event: Event | None = None):
        m = engine.manifest
        self.engine = engine
        self.batch_size = batch_size
        self.size = m.patch.size
        self.stride = m.patch.stride
        self.pad_value = m.input.pad_value
        self.min_tissue = m.patch.min_tissue_fraction
        self.threshold = m.decision.case_threshold
        self.mil = TopKMean(m.decision.top_k)
        self.on_event = on_event or (lambda kind, data: None)
        self.tiles = 0
        self.patches_seen = 0
        self.early_positive_after_tiles: int | None = None
        self._pending: list[Patch] = []
        self._scores: list[PatchScore] = []
        self._timings: dict[str, float] = defaultdict(float)
        self._started = time.perf_counter()
        self._finished = False

    @property
    def score(self) -> float:
        return self.mil.score

    @property
    def early_positive(self) -> bool:
        return self.early_positive_after_tiles is not None

    @property
    def patches_scored(self) -> int:
        return len(self._scores)

    def add_tile(self, x: int, y: int, pixels: np.ndarray) -> None:
        """Cut, screen and queue one tile; scores a batch when enough patches are waiting."""
        if self._finished:
            raise RuntimeError("this session is finished; start a new one for the next case")
        _check_tile(pixels)
        t0 = time.perf_counter()
        patches = cut_patches(pixels, x, y, self.size, self.stride, self.pad_value)
        t1 = time.perf_counter()
        kept = [p for p in patches if tissue_fraction(p.pixels[: p.h, : p.w]) >= self.min_tissue]
        t2 = time.perf_counter()
        self._timings["patching"] += (t1 - t0) * 1e3
        self._timings["tissue"] += (t2 - t1) * 1e3
        self.tiles += 1
        self.patches_seen += len(patches)
        self._pending.extend(kept)
        if len(self._pending) >= self.batch_size:
            self._flush()

    def finish(self) -> TriageResult:
        """Score what is left and make the call."""
        self._flush()
        self._finished = True
        self._timings["total"] = (time.perf_counter() - self._started) * 1e3
        reasons = self._qc_reasons()
        if reasons:
            verdict = CANNOT_CALL
        elif self.early_positive or self.score >= self.threshold:
            verdict = SUSPICIOUS
        else:
            verdict = BENIGN
        result = TriageResult(
            verdict=verdict,
            score=round(self.score, 6),
            threshold=self.threshold,
            reasons=reasons,
            model=self.engine.description,
            timings_ms={k: round(v, 3) for k, v in self._timings.items()},
            patches=list(self._scores),
            tiles=self.tiles,
            patches_seen=self.patches_seen,
            early_positive=self.early_positive,
            early_positive_after_tiles=self.early_positive_after_tiles,
            top_k=self.mil.k,
        )
        self.on_event("finished", {"verdict": verdict, "score": result.score})
        return result

    def _qc_reasons(self) -> list[Reason]:
        if self.tiles == 0:
            return [Reason("no-tiles", "No tiles were received for this case.")]
        if not self._scores:
            return [Reason("no-tissue", f"No tissue was found in {self.tiles} tiles ({self.patches_seen} patches).")]
        if not self.mil.full and not self.early_positive:
            return [
                Reason(
                    "too-little-tissue",
                    f"Only {len(self._scores)} tissue patches were found; at least {self.mil.k} are needed "
                    f"for a call.",
                )
            ]
        return []

    def _flush(self) -> None:
        if not self._pending:
            return
        batch = np.stack([p.pixels for p in self._pending])
        t0 = time.perf_counter()
        probs = self.engine.infer(batch)
        t1 = time.perf_counter()
        for p, prob in zip(self._pending, probs.tolist()):
            self._scores.append(PatchScore(p.x, p.y, p.w, p.h, round(prob, 6)))
            self.mil.add(prob)
        self._timings["inference"] += (t1 - t0) * 1e3
        self._timings["aggregation"] += (time.perf_counter() - t1) * 1e3
        self._pending.clear()
        if not self.early_positive and self.mil.full and self.mil.score >= self.threshold:
            self.early_positive_after_tiles = self.tiles
            self.on_event("early-positive", {"score": self.mil.score, "tiles": self.tiles})


def _check_tile(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray):
        raise InputError(f"a tile must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise InputError(f"a tile must be uint8 RGB, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise InputError(f"a tile must have shape (height, width, 3), got {pixels.shape}")
