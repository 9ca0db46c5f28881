"""TriageSession: the one streaming path from tiles to a verdict, shared by the daemon and `appliance triage`.

Per tile, as it arrives: resample to the model's resolution, then intake (appliance.pipeline.intake): paint into
the on-disk mosaic, tissue mask (saturation + closing), QC evidence, thumbnail, and the tissue patches the
case-wide patch grid says are complete. They go to the engine in batches without waiting for the result
(appliance.pipeline.ordered: OpenVINO's async queue), so the next tile is cut while the last batch is scored.
Results are folded in submission order into the early rule's figures, judged at each tile's checkpoint
(appliance.pipeline.checkpoints), and into the overlap-averaged heatmap; ``finish`` assembles the call
(appliance.pipeline.assembly) and ``write_outputs`` the case's files (appliance.pipeline.casefiles).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.durable import fsync_path
from appliance.errors import InputError
from appliance.model.engine import Engine
from appliance.model.scoring import Scored, Scorer
from appliance.pipeline import decision
from appliance.pipeline.assembly import Assembly, ScoredPatches
from appliance.pipeline.casefiles import CaseFiles
from appliance.pipeline.checkpoints import Checkpoints
from appliance.pipeline.clock import StageClock
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import Heatmap, Thumbnail
from appliance.pipeline.intake import Intake
from appliance.pipeline.jpegscale import jpeg_tile_to_model
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.ordered import OrderedScorer, StainMap
from appliance.pipeline.patches import check_tile
from appliance.pipeline.qc import CaseQc, QcLimits, limits_for
from appliance.pipeline.resample import CaseFrame, resample_tile, scale_factor, target_span
from appliance.pipeline.result import TriageResult
from appliance.pipeline.scanpyramid import ScanGrid
from appliance.pipeline.stain import StainFit
from appliance.terms import CaseFile

THUMBNAIL_CELL = 10  # model pixels per thumbnail pixel

__all__ = ["TriageSession"]


class TriageSession:
    """Feed tiles as they arrive with ``add_tile``; ``finish`` returns the verdict.

    Every decision is taken on the tile sequence, never on timing. Each patch belongs to the tile that
    completed it, and results are folded in the order the patches were cut, whatever order or moment the
    engine returns them in. The early positive "after tile N" is judged once every patch of tiles 1..N is
    scored: the full top-k mean of those patches passes the case threshold while the QC of tiles 1..N is
    clean, the stain included (so it waits until the stain can be judged). The first such N is the same in
    every run, and the call is final: adding patches can never lower a full top-k mean. QC problems found
    after it are reported as warnings.

    ``scanner_mpp``/``width``/``height`` describe the case in scanner pixels (0/None when unknown);
    ``workdir`` holds the on-disk mosaic (a temporary folder when not given). ``thresholds`` are the ones in
    force (default: the model's own; a site's accepted operating point replaces them). ``origin`` is the input's
    top-left (a tile folder cut from a slide need not start at 0, 0): the grid, mosaic, heatmap and output
    files are anchored there, while patch positions in the result are reported in input pixels.
    """

    def __init__(self, engine: Engine, *, batch_size: int = 128,
                 on_early_positive: Callable[[float, int], None] | None = None,
                 scanner_mpp: float | None = None, width: int | None = None, height: int | None = None,
                 workdir: Path | None = None, qc_limits: QcLimits | None = None, origin: tuple[int, int] = (0, 0),
                 thresholds: decision.ThresholdInForce | None = None):
        m = engine.manifest
        self.engine = engine
        self.manifest = m
        # the model's thresholds, or a site's accepted operating point (appliance.store.points)
        self.thresholds = thresholds or decision.ThresholdInForce.of_model(m.decision)
        self.scale = scale_factor(scanner_mpp, m.input.microns_per_pixel)
        self.origin = origin
        self.frame = CaseFrame(self.scale, origin)  # model-resolution case pixels <-> the input's own
        ref = m.stain.reference
        self.stain_reference = StainFit.from_dict(ref.model_dump()) if ref is not None else None
        self.qc = CaseQc(qc_limits or limits_for(m), self.stain_reference)
        w_model = target_span(0, width, self.scale)[1] if width else None
        h_model = target_span(0, height, self.scale)[1] if height else None
        self.grid = PatchGrid(m.patch.size, m.patch.stride, w_model, h_model)
        self.heatmap = Heatmap(m.patch.size, m.patch.stride, w_model, h_model)
        self.thumbnail = Thumbnail(THUMBNAIL_CELL)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="triage-mosaic-")
            workdir = Path(self._tmp.name)
        self.mosaic = Mosaic(Path(workdir) / "mosaic")
        self._clock = StageClock()
        self.intake = Intake(m.patch, m.input, batch_size, qc=self.qc, grid=self.grid, mosaic=self.mosaic,
                             thumbnail=self.thumbnail, clock=self._clock)
        self.stain_map = StainMap(m.stain, self.stain_reference)
        self.ordered = OrderedScorer(engine.scorer())
        self.checkpoints = Checkpoints(m.decision, m.patch, self.thresholds, on_early_positive)
        self.scored = ScoredPatches()
        self.assembly = Assembly(engine, self.thresholds, qc=self.qc, heatmap=self.heatmap, frame=self.frame,
                                 early=self.checkpoints, scored=self.scored, clock=self._clock)
        self.files = CaseFiles(engine, frame=self.frame, scale=self.scale, mosaic=self.mosaic, heatmap=self.heatmap,
                               thumbnail=self.thumbnail)
        self.tiles = 0
        self.patches_seen = 0
        self._started = time.perf_counter()
        self._finished = False

    # ------------------------------------------------------------------------------------------ state
    @property
    def scorer(self) -> Scorer:
        """The engine's streaming scorer the batches go to (replaceable before the first tile, e.g. by a test
        that hands results back late)."""
        return self.ordered.scorer

    @scorer.setter
    def scorer(self, scorer: Scorer) -> None:
        self.ordered.scorer = scorer

    @property
    def size(self) -> int:
        """The model's patch size, in model pixels."""
        return self.manifest.patch.size

    @property
    def score(self) -> float:
        """The running score under the early rule, on first-stage probabilities (so it never falls as tiles
        arrive). The final rule's score is known when the case ends."""
        return self.checkpoints.score

    @property
    def early_positive(self) -> bool:
        return self.checkpoints.early_positive

    @property
    def early_positive_after_tiles(self) -> int | None:
        return self.checkpoints.after_tiles

    @property
    def patches_scored(self) -> int:
        return self.checkpoints.folded

    @property
    def ood_score(self) -> float | None:
        """The case's out-of-distribution score so far (the median of its scored patches' distances; None for a
        model without the gate, or before any patch is scored)."""
        return self.scored.ood_score

    # ---------------------------------------------------------------------------------------- tiles in
    def add_tile(self, x: int, y: int, pixels: np.ndarray) -> None:
        """Take one tile (scanner pixels at scanner position x, y); scores batches as they fill."""
        check_tile(pixels)
        x, y = self._place(x, y)
        self._add(*resample_tile(pixels, x, y, self.scale))

    def add_jpeg(self, x: int, y: int, jpeg: bytes) -> None:
        """Take one tile as the scanner's JPEG bytes (at scanner position x, y), decoded no larger than the
        model needs (libjpeg's DCT scaling, appliance.pipeline.jpegscale); the rest as add_tile."""
        x, y = self._place(x, y)
        self._add(*jpeg_tile_to_model(jpeg, x, y, self.scale, label=f"tile at ({x}, {y})"))

    def _place(self, x: int, y: int) -> tuple[int, int]:
        """A tile's scanner position relative to the case origin; starts the tile's clock."""
        if self._finished:
            raise RuntimeError("this session is finished; start a new one for the next case")
        if x < 0 or y < 0:
            raise InputError(f"tile position ({x}, {y}) is negative")
        self._clock.mark()
        if x < self.origin[0] or y < self.origin[1]:
            raise InputError(f"tile position ({x}, {y}) is left of or above the case origin {self.origin}")
        return x - self.origin[0], y - self.origin[1]

    def _add(self, x: int, y: int, px: np.ndarray) -> None:
        """One tile at the model's resolution, at model position x, y: intake, its checkpoint, scoring."""
        self._clock.lap("resample")
        seen = self.intake.add(x, y, px)
        self.tiles += 1
        self.patches_seen += seen
        clean = self.qc.stain_judged and not self.qc.reasons()
        self.checkpoints.tile_ended(self.tiles, self.intake.cut, clean)
        self._clock.lap("patching")
        self._submit()
        self._collect()

    def _submit(self, final: bool = False) -> None:
        """Send the held batches to the engine (stain-normalised, when the model wants it, with the case's one
        map: until the stain's first judgement they wait)."""
        clock, batches = self._clock, self.intake.batches
        if final:
            batches.seal()
        if not self.stain_map.ready(self.qc, final):
            return  # hold the patches until the stain's first judgement (finish() judges a small case)
        for b in batches.take_ready():
            pixels = self.stain_map.apply(b.pixels)
            clock.lap("prepare")
            self.ordered.submit(b.positions, pixels)
            clock.lap("submit_wait")

    def _collect(self, results: list[Scored] | None = None) -> None:
        """Fold finished batches, in the order they were submitted, into the early rule's figures and the
        heatmap, and judge the early call at every tile whose patches are all folded."""
        for pos, probs, distances in self.ordered.in_order(results):
            probs = np.round(probs.astype(np.float64), 6)
            self.scored.add(pos, probs, distances)
            self.checkpoints.fold(pos, probs)
            if not self.engine.has_context:  # with a context stage the heatmap is drawn once, from the refined values
                self.heatmap.add_many(pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], probs)
        self.checkpoints.judge()
        self._clock.lap("aggregation")

    # ---------------------------------------------------------------------------------------- verdict
    def finish(self) -> TriageResult:
        """Score what is left and make the call."""
        if self._finished:
            raise RuntimeError("this session is already finished")
        clock = self._clock
        clock.mark()
        self.intake.drain()
        clock.lap("patching")
        if self.stain_map.waiting:
            self.qc.finish()  # a small case: its one map comes from the whole case, before the last patches go
        self._submit(final=True)
        self.qc.finish()  # the whole case's stain, judged while the engine scores the last batches
        clock.lap("tissue_qc")
        results = self.ordered.wait()
        clock.lap("wait_inference")
        self._collect(results)
        self._finished = True
        return self.assembly.result(tiles=self.tiles, patches_seen=self.patches_seen, started=self._started)

    def write_outputs(self, out_dir: Path, case_id: str, summary: dict, *, geojson_tiles: bool = False,
                      scan: ScanGrid | None = None) -> dict[CaseFile, str]:
        """The case's files (``CaseFile``) into ``out_dir``; returns their paths. ``summary`` is the finished
        result's ``summary(...)``; it is left as it is (summary.json adds the
        case id and the list of files), so the file and the result a caller holds never differ. With
        ``geojson_tiles`` every scored patch is also a tile object in regions.geojson. ``scan``: the scanner's
        tiles on their grid; when the scan is finer than the model's resolution, case.ome.tif is the scan as
        it arrived (appliance.pipeline.scanpyramid) and the top patches and regions are in its pixels."""
        return self.files.write(out_dir, case_id, summary, self.assembly.patches, geojson_tiles=geojson_tiles,
                                scan=scan)

    def close(self) -> None:
        """Remove the mosaic (call after the outputs are written)."""
        self.mosaic.remove()
        work = self.mosaic.root.parent
        try:
            work.rmdir()  # the work folder, when nothing else is in it
            fsync_path(work.parent)  # and gone for good: a power cut must not bring it back beside the files
        except OSError:
            pass
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
