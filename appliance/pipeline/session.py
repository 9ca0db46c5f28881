"""TriageSession: the one streaming path from tiles to a verdict, shared by the daemon and `appliance triage`.

Per tile, as it arrives: resample to the model's resolution, paint into the on-disk mosaic, tissue mask
(saturation + closing), QC evidence, thumbnail; then the case-wide patch grid says which patches are
complete. Tissue patches go to the engine in batches without waiting for the result (OpenVINO's async
queue), so the next tile is cut while the last batch is scored. Results feed the top-k MIL score and
the overlap-averaged heatmap.
"""

from __future__ import annotations

import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.durable import fsync_path
from appliance.errors import InputError
from appliance.model.engine import Engine
from appliance.pipeline import decision
from appliance.pipeline.context import refine
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import Heatmap, Thumbnail
from appliance.pipeline.mil import LargestRegion, TopKMean
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.outputs import write_outputs
from appliance.pipeline.patches import pad_to
from appliance.pipeline.qc import CaseQc, QcLimits, laplacian_variance, limits_for
from appliance.pipeline.resample import resample_tile, scale_factor, target_span
from appliance.pipeline.stain import StainFit, apply_map, normalising_map
from appliance.pipeline.result import PatchScore, TriageResult
from appliance.pipeline.tissue import mask_of_subsampled, patch_fractions, subsample, tissue_mask
from appliance.terms import CaseFile, CaseRule

THUMBNAIL_CELL = 10  # model pixels per thumbnail pixel
# Focus is measured on every 2nd tissue patch in the order the patches are cut (a fixed rule, so the same
# tiles give the same out-of-focus fraction): the fraction is an estimate.
FOCUS_SAMPLE = 2

__all__ = ["TriageSession"]


@dataclass
class _Batch:
    positions: list[tuple[int, int, int, int]] = field(default_factory=list)
    pixels: list[np.ndarray] = field(default_factory=list)


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
        # the model's thresholds, or a site's accepted operating point (appliance.site.points)
        self.thresholds = thresholds or decision.ThresholdInForce.of_model(m.decision)
        self.threshold = self.thresholds.threshold
        self.patch_threshold = m.decision.patch_threshold
        self.mpp = m.input.microns_per_pixel
        self.scale = scale_factor(scanner_mpp, self.mpp)
        self.origin = origin
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
        self._held: list[_Batch] = []  # patches waiting for the stain fit (only when normalising)
        self._batch = _Batch()
        self._inflight: dict[int, list[tuple[int, int, int, int]]] = {}
        self._next_id = 0
        self._arrived: dict[int, np.ndarray] = {}  # results that came back ahead of an earlier batch
        self._next_fold = 0  # the batch whose results are folded next
        self._cut = 0  # tissue patches cut so far, in order
        self._folded = 0  # of those, scored and folded into the score
        self._focus: list[np.ndarray] = []  # the sampled patches of the tile being cut, for the focus QC
        self._checkpoints: deque[_Checkpoint] = deque()
        self._scores: list[PatchScore] = []
        self._model_pos: list[tuple[int, int, int, int]] = []  # model-resolution x, y, w, h of each score
        self._timings: dict[str, float] = defaultdict(float)
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
        return len(self._scores)

    # ---------------------------------------------------------------------------------------- tiles in
    def add_tile(self, x: int, y: int, pixels: np.ndarray) -> None:
        """Take one tile (scanner pixels at scanner position x, y); scores batches as they fill."""
        if self._finished:
            raise RuntimeError("this session is finished; start a new one for the next case")
        _check_tile(pixels)
        if x < 0 or y < 0:
            raise InputError(f"tile position ({x}, {y}) is negative")
        t0 = time.perf_counter()
        x, y = x - self.origin[0], y - self.origin[1]
        if x < 0 or y < 0:
            raise InputError(f"tile position ({x + self.origin[0]}, {y + self.origin[1]}) is left of or above "
                             f"the case origin {self.origin}")
        x, y, px = resample_tile(pixels, x, y, self.scale)
        h, w = px.shape[:2]
        t1 = time.perf_counter()
        self.mosaic.write(x, y, px)
        t2 = time.perf_counter()
        sub = subsample(px)
        mask = mask_of_subsampled(sub)
        self.qc.add_tile(sub, mask)
        self.thumbnail.add(x, y, px)
        inside, completed = self.grid.add_tile(x, y, w, h)
        t3 = time.perf_counter()
        submitting = self._timings["prepare"] + self._timings["submit_wait"]  # timed apart, inside _take
        if inside:
            pos = [self.grid.extent(gx, gy) for gx, gy in inside]
            frac = patch_fractions(mask, [p[1] - y for p in pos], [p[0] - x for p in pos],
                                   [p[3] for p in pos], [p[2] for p in pos])
            for (ppx, ppy, pw, ph), f in zip(pos, frac):
                if f >= self.min_tissue:
                    crop = px[ppy - y : ppy - y + ph, ppx - x : ppx - x + pw]
                    self._take((ppx, ppy, pw, ph), pad_to(crop, self.size, self.pad_value))
        self._take_from_mosaic(completed)
        self._check_focus()
        self.tiles += 1
        self.patches_seen += len(inside) + len(completed)
        clean = self.qc.stain_judged and not self.qc.reasons()
        self._checkpoints.append(_Checkpoint(self.tiles, self._cut, clean))
        t4 = time.perf_counter()
        self._timings["resample"] += (t1 - t0) * 1e3
        self._timings["mosaic"] += (t2 - t1) * 1e3
        self._timings["tissue_qc"] += (t3 - t2) * 1e3
        self._timings["patching"] += (t4 - t3) * 1e3 - (self._timings["prepare"] + self._timings["submit_wait"]
                                                        - submitting)
        self._collect()

    def _take_from_mosaic(self, keys: list[tuple[int, int]]) -> None:
        """Patches that straddle tiles (or the case edge): read back from the mosaic."""
        for gx, gy in keys:
            ppx, ppy, pw, ph = self.grid.extent(gx, gy)
            crop = self.mosaic.read(ppx, ppy, pw, ph)
            if float(tissue_mask(crop).mean()) >= self.min_tissue:
                self._take((ppx, ppy, pw, ph), pad_to(crop, self.size, self.pad_value))

    def _take(self, pos: tuple[int, int, int, int], patch: np.ndarray) -> None:
        if self._cut % FOCUS_SAMPLE == 0:
            self._focus.append(patch)
        self._cut += 1
        self._batch.positions.append(pos)
        self._batch.pixels.append(patch)
        if len(self._batch.positions) >= self.batch_size:
            self._submit()

    def _check_focus(self) -> None:
        """Focus QC of the sampled patches cut since the last call (before any stain normalisation)."""
        if self._focus:
            self.qc.add_patches(laplacian_variance(np.stack(self._focus)))
            self._focus = []

    def _submit(self, final: bool = False) -> None:
        batch, self._batch = self._batch, _Batch()
        if batch.positions:
            self._held.append(batch)
        if self.normalise and self._stain_map is None:
            if not self.qc.fits and not final:
                return  # hold the patches until the stain's first judgement (finish() judges a small case)
            # one map per case, from the first judgement: which tile that is depends on the tiles alone
            fit = self.qc.first_fit
            self._stain_map = (normalising_map(fit, self.stain_reference) if fit is not None
                               else np.eye(3, dtype=np.float32))
        held, self._held = self._held, []
        for b in held:
            t0 = time.perf_counter()
            pixels = np.stack(b.pixels)
            if self._stain_map is not None:
                pixels = apply_map(pixels, self._stain_map)
            batch_id, self._next_id = self._next_id, self._next_id + 1
            self._inflight[batch_id] = b.positions
            t1 = time.perf_counter()
            self.scorer.submit(pixels, batch_id)
            self._timings["prepare"] += (t1 - t0) * 1e3
            self._timings["submit_wait"] += (time.perf_counter() - t1) * 1e3

    def _collect(self, results=None) -> None:
        """Fold finished batches, in the order they were submitted, into the MIL score and heatmap, and judge
        the early call at every tile whose patches are all folded."""
        t0 = time.perf_counter()
        for batch_id, probs in (self.scorer.done() if results is None else results):
            self._arrived[batch_id] = probs
        while self._next_fold in self._arrived:
            batch_id, self._next_fold = self._next_fold, self._next_fold + 1
            self._fold(self._inflight.pop(batch_id), self._arrived.pop(batch_id))
        self._judge_checkpoints()
        self._timings["aggregation"] += (time.perf_counter() - t0) * 1e3

    def _fold(self, pos: list[tuple[int, int, int, int]], probs: np.ndarray) -> None:
        probs = np.round(probs.astype(np.float64), 6)
        values = probs.tolist()
        start = 0
        while True:
            self._judge_checkpoints()
            if start == len(values):
                break
            # up to the end of the next tile's patches, so each tile is judged on exactly its own prefix
            end = len(values)
            if self._checkpoints:
                end = min(end, start + self._checkpoints[0].patches - self._folded)
            for (ppx, ppy, pw, ph), p in zip(pos[start:end], values[start:end]):
                self._scores.append(PatchScore(*self._to_input(ppx, ppy, pw, ph), p))
                self._model_pos.append((ppx, ppy, pw, ph))
                self.mil.add(p)
                if self.region is not None:
                    self.region.add(ppx // self.stride, ppy // self.stride, p)
            self._folded += end - start
            start = end
        if not self.engine.has_context:  # with a context stage the heatmap is drawn once, from the refined values
            a = np.asarray(pos, dtype=np.int64)
            self.heatmap.add_many(a[:, 0], a[:, 1], a[:, 2], a[:, 3], probs)

    def _judge_checkpoints(self) -> None:
        """The early positive at each tile N whose patches are all folded, first N first."""
        while self._checkpoints and self._checkpoints[0].patches <= self._folded:
            cp = self._checkpoints.popleft()
            if not self.early_positive and decision.is_early_positive(
                    qc_clean=cp.qc_clean, patches=cp.patches, min_patches=self.min_patches, mil_full=self.mil.full,
                    score=self.score, threshold=self.thresholds.early_threshold):
                self.early_positive_after_tiles = cp.tile
                self.on_early_positive(self.score, cp.tile)

    def _to_input(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        """Model-resolution case coordinates -> the input's own pixel coordinates."""
        if self.scale == 1.0:
            return x + self.origin[0], y + self.origin[1], w, h
        s = self.scale
        return round(x / s) + self.origin[0], round(y / s) + self.origin[1], round(w / s), round(h / s)

    def _to_model(self, x: int, y: int, w: int, h: int) -> tuple[int, int, int, int]:
        """The input's pixel coordinates -> model-resolution case coordinates (the inverse of _to_input)."""
        x, y = x - self.origin[0], y - self.origin[1]
        if self.scale == 1.0:
            return x, y, w, h
        s = self.scale
        return round(x * s), round(y * s), max(1, round(w * s)), max(1, round(h * s))

    # ---------------------------------------------------------------------------------------- verdict
    def finish(self) -> TriageResult:
        """Score what is left and make the call."""
        if self._finished:
            raise RuntimeError("this session is already finished")
        self._take_from_mosaic(self.grid.drain())
        self._check_focus()
        if self.normalise and self._stain_map is None:
            self.qc.finish()  # a small case: its one map comes from the whole case, before the last patches go
        self._submit(final=True)
        self.qc.finish()  # the whole case's stain, judged while the engine scores the last batches
        t0 = time.perf_counter()
        self._collect(self.scorer.wait())
        self.scorer.close()
        self._timings["wait_inference"] += (time.perf_counter() - t0) * 1e3
        self._finished = True
        refined = None
        if self.engine.has_context:
            refined = self._refine() if self._scores else []
        early_score = self.score
        score = decision.final_score(self.case_rule, self.top_k, early_score, refined)
        reasons = decision.cannot_call_reasons(tiles=self.tiles, patches_scored=len(self._scores),
                                               patches_seen=self.patches_seen, qc_reasons=self.qc.reasons(),
                                               min_patches=self.min_patches)
        verdict, reasons, warnings = decision.make_call(early_positive=self.early_positive, reasons=reasons,
                                                        score=score, threshold=self.threshold)
        self._timings["total"] = (time.perf_counter() - self._started) * 1e3
        self._scores.sort(key=lambda p: (p.y, p.x))
        result = TriageResult(
            verdict=verdict,
            score=round(score, 6),
            threshold=self.threshold,
            patch_threshold=self.patch_threshold,
            reasons=reasons,
            model=self.engine.model_ref,
            timings_ms={k: round(v, 3) for k, v in self._timings.items()},
            patches=list(self._scores),
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
            qc=self.qc.summary(),
            measures=self._measures(),
            warnings=warnings,
            microns_per_pixel=self.mpp,
            origin=list(self.origin),
        )
        return result

    def _measures(self) -> dict[str, float | None]:
        """What the drift watch follows for this case (appliance.site.drift). Tissue area counts each scored
        patch's stride x stride cell at the model's resolution (the patches tile the tissue)."""
        angles = self.qc.stain_angles()
        cell_mm = self.stride * self.mpp / 1000.0
        return {"stain_h_deg": round(angles[0], 2) if angles else None,
                "stain_e_deg": round(angles[1], 2) if angles else None,
                "focus": self.qc.focus_median,
                "tissue_mm2": round(len(self._scores) * cell_mm * cell_mm, 4)}

    def _refine(self) -> list[float]:
        """The context stage over the whole case grid: each patch's probability becomes the refined one (the
        first stage's kept beside it), and the heatmap is drawn from them. Returns the refined probabilities
        (the final rule's input when it is the refined rule)."""
        t0 = time.perf_counter()
        pos = np.asarray(self._model_pos, dtype=np.int64)
        first = np.array([p.probability for p in self._scores])
        refined = refine(self.engine, pos[:, 0] // self.stride, pos[:, 1] // self.stride, first)
        self._scores = [PatchScore(p.x, p.y, p.w, p.h, r, p.probability)
                        for p, r in zip(self._scores, refined.tolist())]
        self.heatmap.add_many(pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], refined)
        self._timings["context"] = (time.perf_counter() - t0) * 1e3
        return refined.tolist()

    def write_outputs(self, out_dir: Path, case_id: str, summary: dict, *, geojson_tiles: bool = False
                      ) -> dict[CaseFile, str]:
        """The case's files (``CaseFile``) into ``out_dir``; returns their paths. ``summary`` is the finished
        result's ``to_dict()`` plus ``input`` and ``skipped_inputs``; it is left as it is (summary.json adds the
        case id and the list of files), so the file and the result a caller holds never differ. With
        ``geojson_tiles`` every scored patch is also a tile object in regions.geojson."""
        top = sorted(self._scores, key=lambda p: (-p.probability, p.y, p.x))[: self.top_k]
        rects = [self._to_model(p.x, p.y, p.w, p.h) for p in top]
        crops = [self.mosaic.read(*r) for r in rects]

        def top_records() -> list[dict]:  # called beside the other files: the CAM head compiles at its first use
            cams = self._cams(crops)
            return [{"x": r[0], "y": r[1], "w": r[2], "h": r[3], "probability": p.probability,
                     "first_stage": p.first_stage, "cam": cam} for r, p, cam in zip(rects, top, cams)]

        tiles = [(*self._to_model(p.x, p.y, p.w, p.h), p.probability, p.first_stage)
                 for p in self._scores] if geojson_tiles else None
        return write_outputs(out_dir, case_id, summary, heatmap=self.heatmap, thumbnail=self.thumbnail,
                             mosaic=self.mosaic, patch_threshold=self.patch_threshold, top_crops=crops, tiles=tiles,
                             top=top_records if top else None)

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


def _check_tile(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray):
        raise InputError(f"a tile must be a numpy array, got {type(pixels).__name__}")
    if pixels.dtype != np.uint8:
        raise InputError(f"a tile must be uint8 RGB, got dtype {pixels.dtype}")
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise InputError(f"a tile must have shape (height, width, 3), got {pixels.shape}")
