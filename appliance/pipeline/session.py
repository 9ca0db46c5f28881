"""TriageSession: the one streaming path from tiles to a verdict, shared by the daemon and `appliance triage`.

Per tile, as it arrives: resample to the model's resolution, paint into the on-disk mosaic, tissue mask
(saturation + closing), QC evidence, thumbnail; then the case-wide patch grid says which patches are
complete. Tissue patches go to the engine in batches without waiting for the result (OpenVINO's async
queue), so the next tile is cut while the last batch is scored. Results feed the top-k MIL score and
the overlap-averaged heatmap.
"""

from __future__ import annotations

import heapq
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.durable import fsync_path
from appliance.errors import InputError
from appliance.model import ood
from appliance.model.engine import Engine
from appliance.pipeline import decision
from appliance.pipeline.clock import StageClock
from appliance.pipeline.context import refine
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import Heatmap, Thumbnail
from appliance.pipeline.mil import LargestRegion, TopKMean
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.outputs import write_outputs
from appliance.pipeline.batches import BatchFiller
from appliance.pipeline.patches import check_tile, pad_to
from appliance.pipeline.qc import CaseQc, QcLimits, laplacian_variance, limits_for
from appliance.pipeline.jpegscale import jpeg_tile_to_model
from appliance.pipeline.scanpyramid import ScanGrid
from appliance.pipeline.resample import CaseFrame, resample_tile, scale_factor, target_span
from appliance.pipeline.stain import StainFit, apply_map, normalising_map
from appliance.pipeline.result import PatchScore, TriageResult
from appliance.pipeline.tissue import MASK_STEP, mask_of_subsampled, patch_fractions, subsample, tissue_mask
from appliance.terms import CaseFile, CaseRule

Positions = np.ndarray  # (n, 4) int64: model-resolution x, y, w, h of each patch, in the order they were cut

THUMBNAIL_CELL = 10  # model pixels per thumbnail pixel
# Focus is measured on every 2nd tissue patch in the order the patches are cut (a fixed rule, so the same
# tiles give the same out-of-focus fraction): the fraction is an estimate.
FOCUS_SAMPLE = 2

__all__ = ["TriageSession"]


@dataclass(frozen=True)
class _Checkpoint:
    """The end of tile N: how many patches tiles 1..N gave, and their QC (known when the tile is cut)."""

    tile: int
    patches: int
    qc_clean: bool  # no blocking QC finding over tiles 1..N, and the stain judged on them


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
        self.batch_size = batch_size
        self.size = m.patch.size
        self.stride = m.patch.stride
        self.pad_value = m.input.pad_value
        self.min_tissue = m.patch.min_tissue_fraction
        # the model's thresholds, or a site's accepted operating point (appliance.store.points)
        self.thresholds = thresholds or decision.ThresholdInForce.of_model(m.decision)
        self.threshold = self.thresholds.threshold
        self.patch_threshold = m.decision.patch_threshold
        self.mpp = m.input.microns_per_pixel
        self.scale = scale_factor(scanner_mpp, self.mpp)
        self.origin = origin
        self.frame = CaseFrame(self.scale, origin)  # model-resolution case pixels <-> the input's own
        self.min_patches = m.decision.min_patches  # fewer tissue patches than this: too little tissue to call
        self.case_rule = m.decision.case_rule  # the final rule, scored when the case ends
        self.top_k = m.decision.top_k
        # the early positive's rule and threshold: on first-stage probabilities, so its score never falls
        self.early = m.decision.early_rule
        self.mil = TopKMean(self.early.top_k)
        # the region rule's figures, on first-stage probabilities (they only ever grow: see LargestRegion)
        self.region = (LargestRegion(m.decision.region_threshold) if self.early.rule != CaseRule.TOP_K_MEAN
                       else None)
        self.on_early_positive = on_early_positive or (lambda score, tiles: None)  # (score, after tiles)
        ref = m.stain.reference
        self.stain_reference = StainFit.from_dict(ref.model_dump()) if ref is not None else None
        self.normalise = m.stain.normalisation == "macenko"
        self._stain_map: np.ndarray | None = None
        self.qc = CaseQc(qc_limits or limits_for(m), self.stain_reference)
        w_model = target_span(0, width, self.scale)[1] if width else None
        h_model = target_span(0, height, self.scale)[1] if height else None
        self.grid = PatchGrid(self.size, self.stride, w_model, h_model)
        self.heatmap = Heatmap(self.size, self.stride, w_model, h_model)
        self.thumbnail = Thumbnail(THUMBNAIL_CELL)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="triage-mosaic-")
            workdir = Path(self._tmp.name)
        self.mosaic = Mosaic(Path(workdir) / "mosaic")
        self.scorer = engine.scorer()
        self.tiles = 0
        self.patches_seen = 0
        self.early_positive_after_tiles: int | None = None
        self._batches = BatchFiller(batch_size, self.size)  # full ones wait there (for the stain fit, if normalising)
        self._inflight: dict[int, Positions] = {}
        self._next_id = 0
        self._arrived: dict[int, np.ndarray] = {}  # results that came back ahead of an earlier batch
        self._next_fold = 0  # the batch whose results are folded next
        self._cut = 0  # tissue patches cut so far, in order
        self._folded = 0  # of those, scored and folded into the score
        self._checkpoints: deque[_Checkpoint] = deque()
        self._folded_pos: list[Positions] = []  # the folded batches' positions and first-stage probabilities
        self._folded_probs: list[np.ndarray] = []
        self._folded_ood: list[np.ndarray] = []  # each folded patch's OOD distance (models with the gate)
        self._patches: list[PatchScore] = []  # the result's patches, once finished
        self._clock = StageClock()
        self._started = time.perf_counter()
        self._finished = False

    # ------------------------------------------------------------------------------------------ state
    @property
    def score(self) -> float:
        """The running score under the early rule, on first-stage probabilities (so it never falls as tiles
        arrive). The final rule's score is known when the case ends."""
        return decision.case_score(self.early.rule, self.mil, self.region)

    @property
    def early_positive(self) -> bool:
        return self.early_positive_after_tiles is not None

    @property
    def patches_scored(self) -> int:
        return self._folded

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
        """One tile at the model's resolution, at model position x, y: mosaic, QC, patches, scoring."""
        clock = self._clock
        h, w = px.shape[:2]
        clock.lap("resample")
        self.mosaic.write(x, y, px)
        clock.lap("mosaic")
        sub = subsample(px)
        mask = mask_of_subsampled(sub)
        self.qc.add_tile(sub, mask)
        if MASK_STEP * sub.shape[0] == h and MASK_STEP * sub.shape[1] == w and not (x % MASK_STEP or y % MASK_STEP):
            self.thumbnail.add(x, y, sub, MASK_STEP)
        else:
            self.thumbnail.add(x, y, px)
        inside, completed = self.grid.add_tile(x, y, w, h)
        clock.lap("tissue_qc")
        self._cut_tile(px, x, y, mask, inside)
        self._take_from_mosaic(completed)
        self.tiles += 1
        self.patches_seen += len(inside) + len(completed)
        clean = self.qc.stain_judged and not self.qc.reasons()
        self._checkpoints.append(_Checkpoint(self.tiles, self._cut, clean))
        clock.lap("patching")
        self._submit()
        self._collect()

    def _cut_tile(self, px: np.ndarray, x: int, y: int, mask: np.ndarray, inside: list[tuple[int, int]]) -> None:
        """The tissue patches wholly inside this tile (at x, y), cut straight from its pixels."""
        if not inside:
            return
        ext = self.grid.extents(inside)
        frac = patch_fractions(mask, ext[:, 1] - y, ext[:, 0] - x, ext[:, 3], ext[:, 2])
        ext = ext[frac >= self.min_tissue]
        if len(ext):
            self._take(ext, self._crops(px, ext[:, 0] - x, ext[:, 1] - y, ext[:, 2], ext[:, 3]))

    def _crops(self, px: np.ndarray, xs: np.ndarray, ys: np.ndarray, ws: np.ndarray, hs: np.ndarray
               ) -> list[np.ndarray]:
        """The patches of a tile at tile-relative xs, ys: views into it, or, for patches clipped by the case
        edge, padded with glass as the model was trained."""
        s = self.size
        return [px[y0 : y0 + s, x0 : x0 + s] if w == s and h == s else pad_to(px[y0 : y0 + h, x0 : x0 + w], s,
                                                                                self.pad_value)
                for x0, y0, w, h in zip(xs.tolist(), ys.tolist(), ws.tolist(), hs.tolist())]

    def _take_from_mosaic(self, keys: list[tuple[int, int]]) -> None:
        """Patches that straddle tiles (or the case edge): read back from the mosaic."""
        if not keys:
            return
        ext = self.grid.extents(keys)
        crops = [self.mosaic.read(*e) for e in ext.tolist()]
        keep = [i for i, crop in enumerate(crops) if float(tissue_mask(crop).mean()) >= self.min_tissue]
        if keep:
            self._take(ext[keep], [pad_to(crops[i], self.size, self.pad_value) for i in keep])

    def _take(self, pos: Positions, crops: list[np.ndarray]) -> None:
        """Tissue patches, in the order they were cut: the focus QC of every FOCUS_SAMPLE-th (before any stain
        normalisation), and into batches."""
        sampled = crops[(-self._cut) % FOCUS_SAMPLE :: FOCUS_SAMPLE]  # cut numbers 0, FOCUS_SAMPLE, ...
        if sampled:
            self.qc.add_patches(laplacian_variance(np.stack(sampled)))
        self._cut += len(pos)
        self._batches.add(pos, crops)

    def _submit(self, final: bool = False) -> None:
        """Send the held batches to the engine (stain-normalised, when the model wants it, with the case's one
        map: until the stain's first judgement they wait)."""
        clock = self._clock
        if final:
            self._batches.seal()
        if self.normalise and self._stain_map is None:
            if not self.qc.fits and not final:
                return  # hold the patches until the stain's first judgement (finish() judges a small case)
            # one map per case, from the first judgement: which tile that is depends on the tiles alone
            fit = self.qc.first_fit
            self._stain_map = (normalising_map(fit, self.stain_reference) if fit is not None
                               else np.eye(3, dtype=np.float32))
        for b in self._batches.take_ready():
            pixels = b.pixels if self._stain_map is None else apply_map(b.pixels, self._stain_map)
            batch_id, self._next_id = self._next_id, self._next_id + 1
            self._inflight[batch_id] = b.positions
            clock.lap("prepare")
            self.scorer.submit(pixels, batch_id)
            clock.lap("submit_wait")

    def _collect(self, results=None) -> None:
        """Fold finished batches, in the order they were submitted, into the MIL score and heatmap, and judge
        the early call at every tile whose patches are all folded."""
        for batch_id, probs, distances in (self.scorer.done() if results is None else results):
            self._arrived[batch_id] = (probs, distances)
        while self._next_fold in self._arrived:
            batch_id, self._next_fold = self._next_fold, self._next_fold + 1
            probs, distances = self._arrived.pop(batch_id)
            if distances is not None:
                self._folded_ood.append(distances)
            self._fold(self._inflight.pop(batch_id), probs)
        self._judge_checkpoints()
        self._clock.lap("aggregation")

    def _fold(self, pos: Positions, probs: np.ndarray) -> None:
        probs = np.round(probs.astype(np.float64), 6)
        start = 0
        while True:
            self._judge_checkpoints()
            if start == len(probs):
                break
            # up to the end of the next tile's patches, so each tile is judged on exactly its own prefix
            end = len(probs)
            if self._checkpoints:
                end = min(end, start + self._checkpoints[0].patches - self._folded)
            self.mil.add_many(probs[start:end])
            if self.region is not None:
                self._add_to_region(pos[start:end], probs[start:end])
            self._folded += end - start
            start = end
        self._folded_pos.append(pos)
        self._folded_probs.append(probs)
        if not self.engine.has_context:  # with a context stage the heatmap is drawn once, from the refined values
            self.heatmap.add_many(pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], probs)

    def _add_to_region(self, pos: Positions, probs: np.ndarray) -> None:
        hot = probs >= self.region.threshold  # the others never join a region
        for gx, gy, p in zip((pos[hot, 0] // self.stride).tolist(), (pos[hot, 1] // self.stride).tolist(),
                             probs[hot].tolist()):
            self.region.add(gx, gy, p)

    def _judge_checkpoints(self) -> None:
        """The early positive at each tile N whose patches are all folded, first N first."""
        while self._checkpoints and self._checkpoints[0].patches <= self._folded:
            cp = self._checkpoints.popleft()
            if not self.early_positive and decision.is_early_positive(
                    qc_clean=cp.qc_clean, patches=cp.patches, min_patches=self.min_patches, mil_full=self.mil.full,
                    score=self.score, threshold=self.thresholds.early_threshold):
                self.early_positive_after_tiles = cp.tile
                self.on_early_positive(self.score, cp.tile)

    # ---------------------------------------------------------------------------------------- verdict
    def finish(self) -> TriageResult:
        """Score what is left and make the call."""
        if self._finished:
            raise RuntimeError("this session is already finished")
        clock = self._clock
        clock.mark()
        self._take_from_mosaic(self.grid.drain())
        clock.lap("patching")
        if self.normalise and self._stain_map is None:
            self.qc.finish()  # a small case: its one map comes from the whole case, before the last patches go
        self._submit(final=True)
        self.qc.finish()  # the whole case's stain, judged while the engine scores the last batches
        clock.lap("tissue_qc")
        results = self.scorer.wait()
        self.scorer.close()
        clock.lap("wait_inference")
        self._collect(results)
        self._finished = True
        pos = np.concatenate(self._folded_pos) if self._folded_pos else np.zeros((0, 4), np.int64)
        first = np.concatenate(self._folded_probs) if self._folded_probs else np.zeros(0)
        refined = None
        if self.engine.has_context:
            refined = self._refine(pos, first) if len(first) else np.zeros(0)
        early_score = self.score
        score = decision.final_score(self.case_rule, self.top_k, early_score,
                                     None if refined is None else refined.tolist())
        ood_score = self.ood_score
        reasons = decision.cannot_call_reasons(tiles=self.tiles, patches_scored=self._folded,
                                               patches_seen=self.patches_seen,
                                               qc_reasons=self.qc.reasons() + decision.ood_reasons(
                                                   ood_score, self._ood_limit),
                                               min_patches=self.min_patches)
        verdict, reasons, warnings = decision.make_call(early_positive=self.early_positive, reasons=reasons,
                                                        score=score, threshold=self.threshold)
        self._patches = self._patch_scores(pos, first, refined)
        clock.lap("result")
        timings = clock.timings()
        timings["total"] = round((time.perf_counter() - self._started) * 1e3, 3)
        return TriageResult(
            verdict=verdict,
            score=round(score, 6),
            threshold=self.threshold,
            patch_threshold=self.patch_threshold,
            reasons=reasons,
            model=self.engine.model_ref,
            timings_ms=timings,
            patches=list(self._patches),
            tiles=self.tiles,
            patches_seen=self.patches_seen,
            early_positive=self.early_positive,
            early_positive_after_tiles=self.early_positive_after_tiles,
            top_k=self.top_k,
            case_rule=self.case_rule,
            early_rule=self.early.rule,
            early_top_k=self.early.top_k,
            early_threshold=self.thresholds.early_threshold,
            early_score=round(early_score, 6),
            threshold_source=self.thresholds.source,
            site_accepted_at=self.thresholds.site_accepted_at,
            site_report_sha256=self.thresholds.site_report_sha256,
            qc={**self.qc.summary(), "ood_score": ood_score, "ood_max_score": self._ood_limit},
            measures=self._measures(ood_score),
            warnings=warnings,
            microns_per_pixel=self.mpp,
            origin=list(self.origin),
        )

    def _patch_scores(self, pos: Positions, first: np.ndarray, refined: np.ndarray | None) -> list[PatchScore]:
        """The scored patches in the input's pixels, sorted by row then column (the refined probability beside
        the first stage's, when the model has a context stage)."""
        where = self.frame.to_input(pos)
        order = np.lexsort((where[:, 0], where[:, 1]))  # stable: as sorting the cut order by (y, x)
        columns = [c.tolist() for c in where[order].T]
        if refined is None:
            return [PatchScore(*c) for c in zip(*columns, first[order].tolist())]
        return [PatchScore(*c) for c in zip(*columns, refined[order].tolist(), first[order].tolist())]

    @property
    def _ood_limit(self) -> float | None:
        spec = self.engine.manifest.ood
        return spec.max_score if spec is not None and self.engine.has_ood else None

    @property
    def ood_score(self) -> float | None:
        """The case's out-of-distribution score so far (the median of its scored patches' distances; None for a
        model without the gate, or before any patch is scored)."""
        return ood.case_score(np.concatenate(self._folded_ood)) if self._folded_ood else None

    def _measures(self, ood_score: float | None) -> dict[str, float | None]:
        """What the drift watch follows for this case (appliance.service.drift). Tissue area counts each scored
        patch's stride x stride cell at the model's resolution (the patches tile the tissue)."""
        angles = self.qc.stain_angles()
        cell_mm = self.stride * self.mpp / 1000.0
        return {"stain_h_deg": round(angles[0], 2) if angles else None,
                "stain_e_deg": round(angles[1], 2) if angles else None,
                "focus": self.qc.focus_median,
                "tissue_mm2": round(self._folded * cell_mm * cell_mm, 4),
                "ood": ood_score}

    def _refine(self, pos: Positions, first: np.ndarray) -> np.ndarray:
        """The context stage over the whole case grid: each patch's refined probability (the final rule's input
        when it is the refined rule); the heatmap is drawn from them."""
        self._clock.lap("result")
        refined = refine(self.engine, pos[:, 0] // self.stride, pos[:, 1] // self.stride, first)
        self.heatmap.add_many(pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], refined)
        self._clock.lap("context")
        return refined

    def write_outputs(self, out_dir: Path, case_id: str, summary: dict, *, geojson_tiles: bool = False,
                      scan: ScanGrid | None = None) -> dict[CaseFile, str]:
        """The case's files (``CaseFile``) into ``out_dir``; returns their paths. ``summary`` is the finished
        result's ``to_dict()`` plus ``input`` and ``skipped_inputs``; it is left as it is (summary.json adds the
        case id and the list of files), so the file and the result a caller holds never differ. With
        ``geojson_tiles`` every scored patch is also a tile object in regions.geojson. ``scan``: the scanner's
        tiles on their grid; when the scan is finer than the model's resolution, case.ome.tif is the scan as
        it arrived (appliance.pipeline.scanpyramid) and the top patches and regions are in its pixels."""
        if scan is not None and not self.scale < 1:
            scan = None  # the model-resolution mosaic already holds every scanned pixel
        top = heapq.nsmallest(self.top_k, self._patches, key=lambda p: (-p.probability, p.y, p.x))
        rects = [self.frame.to_model(p.x, p.y, p.w, p.h) for p in top]
        crops = [self.mosaic.read(*r) for r in rects]
        shown = [(p.x, p.y, p.w, p.h) for p in top] if scan is not None else rects  # in case.ome.tif's pixels

        def top_records() -> list[dict]:  # called beside the other files: the CAM head compiles at its first use
            cams = self._cams(crops)
            return [{"x": r[0], "y": r[1], "w": r[2], "h": r[3], "probability": p.probability,
                     "first_stage": p.first_stage, "cam": cam} for r, p, cam in zip(shown, top, cams)]

        tiles = [(*self.frame.to_model(p.x, p.y, p.w, p.h), p.probability, p.first_stage)
                 for p in self._patches] if geojson_tiles else None
        return write_outputs(out_dir, case_id, summary, heatmap=self.heatmap, thumbnail=self.thumbnail,
                             mosaic=self.mosaic, patch_threshold=self.patch_threshold, top_crops=crops, tiles=tiles,
                             top=top_records if top else None, scan=scan)

    def _cams(self, crops: list[np.ndarray]) -> list[list[list[float]] | None]:
        """The class-activation map of each top patch (the members' mean logit at each position of the last
        feature map, 4 decimals), or None each when the model has no CAM head. Only the top-k, once: cheap."""
        if not crops or not self.engine.has_cam:
            return [None] * len(crops)
        maps = self.engine.cam(np.stack([pad_to(c, self.size, self.pad_value) for c in crops])).mean(axis=1)
        return [np.round(m, 4).tolist() for m in maps]

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
