"""A finished case's files from the session's parts: the top patches picked and cut from the mosaic with their
class-activation maps, the scored patches as regions.geojson tiles when asked, all written by
appliance.pipeline.outputs.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from appliance.model.engine import Engine
from appliance.pipeline.heatmap import Heatmap, Thumbnail
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.outputs import write_outputs
from appliance.pipeline.patches import pad_to
from appliance.pipeline.resample import CaseFrame
from appliance.pipeline.result import PatchScore
from appliance.pipeline.scanpyramid import ScanGrid
from appliance.terms import CaseFile

__all__ = ["CaseFiles", "patch_cams", "top_patches"]


def top_patches(patches: list[PatchScore], k: int) -> list[PatchScore]:
    """The ``k`` most probable patches, highest first (ties: the upper, then the left one first)."""
    return heapq.nsmallest(k, patches, key=lambda p: (-p.probability, p.y, p.x))


def patch_cams(engine: Engine, crops: list[np.ndarray]) -> list[list[list[float]] | None]:
    """The class-activation map of each top patch (the members' mean logit at each position of the last
    feature map, 4 decimals), or None each when the model has no CAM head. Only the top-k, once: cheap."""
    if not crops or not engine.has_cam:
        return [None] * len(crops)
    m = engine.manifest
    batch = np.stack([pad_to(c, m.patch.size, m.input.pad_value) for c in crops])
    return [np.round(cam, 4).tolist() for cam in engine.cam(batch).mean(axis=1)]


class CaseFiles:
    """Writes a finished case's files (``write``) from the session's mosaic, heatmap and thumbnail; ``frame``
    maps the reported patches back to the mosaic's pixels, ``scale`` is model pixels per scanner pixel."""

    def __init__(self, engine: Engine, *, frame: CaseFrame, scale: float, mosaic: Mosaic, heatmap: Heatmap,
                 thumbnail: Thumbnail):
        self.engine, self.decision = engine, engine.manifest.decision
        self.frame, self.scale, self.mosaic, self.heatmap, self.thumbnail = frame, scale, mosaic, heatmap, thumbnail

    def write(self, out_dir: Path, case_id: str, summary: dict, patches: list[PatchScore], *,
              geojson_tiles: bool = False, scan: ScanGrid | None = None) -> dict[CaseFile, str]:
        """The case's files into ``out_dir`` (see TriageSession.write_outputs); ``patches`` are the result's."""
        if scan is not None and not self.scale < 1:
            scan = None  # the model-resolution mosaic already holds every scanned pixel
        top = top_patches(patches, self.decision.top_k)
        rects = [self.frame.to_model(p.x, p.y, p.w, p.h) for p in top]
        crops = [self.mosaic.read(*r) for r in rects]
        shown = [(p.x, p.y, p.w, p.h) for p in top] if scan is not None else rects  # in case.ome.tif's pixels

        def top_records() -> list[dict]:  # called beside the other files: the CAM head compiles at its first use
            cams = patch_cams(self.engine, crops)
            return [{"x": r[0], "y": r[1], "w": r[2], "h": r[3], "probability": p.probability,
                     "first_stage": p.first_stage, "cam": cam} for r, p, cam in zip(shown, top, cams)]

        tiles = [(*self.frame.to_model(p.x, p.y, p.w, p.h), p.probability, p.first_stage)
                 for p in patches] if geojson_tiles else None
        return write_outputs(out_dir, case_id, summary, heatmap=self.heatmap, thumbnail=self.thumbnail,
                             mosaic=self.mosaic, patch_threshold=self.decision.patch_threshold, top_crops=crops,
                             tiles=tiles, top=top_records if top else None, scan=scan)
