"""Tile intake: each tile, at the model's resolution, painted into the mosaic and read for QC and the thumbnail,
then cut into the tissue patches the case's patch grid says are complete, in one fixed cut order.

A patch wholly inside its tile is cut straight from the tile's pixels; one that straddles tiles (or the case
edge) is read back from the mosaic once the grid says it is complete. Patches with less tissue than the model's
minimum fraction are dropped, and patches clipped by the case edge are padded with glass as the model was
trained. The cut order, and the focus QC measured on it, depend on the tile sequence alone.
"""

from __future__ import annotations

import numpy as np

from appliance.model.manifest import InputSpec, PatchSpec
from appliance.pipeline.batches import BatchFiller
from appliance.pipeline.clock import StageClock
from appliance.pipeline.grid import PatchGrid
from appliance.pipeline.heatmap import Thumbnail
from appliance.pipeline.mosaic import Mosaic
from appliance.pipeline.patches import Positions, pad_to
from appliance.pipeline.qc import CaseQc, laplacian_variance
from appliance.pipeline.tissue import MASK_STEP, mask_of_subsampled, patch_fractions, subsample, tissue_mask

# Focus is measured on every 2nd tissue patch in the order the patches are cut (a fixed rule, so the same
# tiles give the same out-of-focus fraction): the fraction is an estimate.
FOCUS_SAMPLE = 2

__all__ = ["FOCUS_SAMPLE", "Intake", "focus_sample", "tile_crops"]


def tile_crops(px: np.ndarray, xs: np.ndarray, ys: np.ndarray, ws: np.ndarray, hs: np.ndarray, size: int,
               pad_value: int) -> list[np.ndarray]:
    """The patches of a tile at tile-relative xs, ys (widths ws, heights hs): views into it, or, for patches
    clipped by the case edge, padded with glass to ``size`` x ``size`` as the model was trained."""
    return [px[y0 : y0 + size, x0 : x0 + size] if w == size and h == size
            else pad_to(px[y0 : y0 + h, x0 : x0 + w], size, pad_value)
            for x0, y0, w, h in zip(xs.tolist(), ys.tolist(), ws.tolist(), hs.tolist())]


def focus_sample(crops: list[np.ndarray], cut: int) -> list[np.ndarray]:
    """Of patches cut in order, the first of them being cut number ``cut``: the ones whose cut numbers are
    0, FOCUS_SAMPLE, 2 x FOCUS_SAMPLE, ... (the focus QC's sample)."""
    return crops[(-cut) % FOCUS_SAMPLE :: FOCUS_SAMPLE]


class Intake:
    """Takes a case's tiles at the model's resolution (``add``) and puts their tissue patches into ``batches``
    in cut order; ``cut`` counts them. ``drain`` takes the patches still waiting when the case ends.

    ``patch`` and ``image`` are the model's own (its manifest's ``patch`` and ``input``); the QC, grid, mosaic
    and thumbnail are the session's, shared with the parts that read them; ``clock`` is charged the mosaic's
    and the tissue and QC's time."""

    def __init__(self, patch: PatchSpec, image: InputSpec, batch_size: int, *, qc: CaseQc, grid: PatchGrid,
                 mosaic: Mosaic, thumbnail: Thumbnail, clock: StageClock):
        self.patch, self.image = patch, image
        self.qc, self.grid, self.mosaic, self.thumbnail, self.clock = qc, grid, mosaic, thumbnail, clock
        self.batches = BatchFiller(batch_size, patch.size)  # full ones wait there (for the stain fit, if normalising)
        self.cut = 0  # tissue patches cut so far, in order

    def add(self, x: int, y: int, px: np.ndarray) -> int:
        """One tile at model position x, y: into the mosaic, the QC and the thumbnail, then the patches it
        completes cut. Returns how many grid patches it completed, tissue or not."""
        clock = self.clock
        h, w = px.shape[:2]
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
        return len(inside) + len(completed)

    def drain(self) -> None:
        """The case has ended: the patches the grid still held (waiting for a neighbour tile), from the mosaic."""
        self._take_from_mosaic(self.grid.drain())

    def _cut_tile(self, px: np.ndarray, x: int, y: int, mask: np.ndarray, inside: list[tuple[int, int]]) -> None:
        """The tissue patches wholly inside this tile (at x, y), cut straight from its pixels."""
        if not inside:
            return
        ext = self.grid.extents(inside)
        frac = patch_fractions(mask, ext[:, 1] - y, ext[:, 0] - x, ext[:, 3], ext[:, 2])
        ext = ext[frac >= self.patch.min_tissue_fraction]
        if len(ext):
            self._take(ext, tile_crops(px, ext[:, 0] - x, ext[:, 1] - y, ext[:, 2], ext[:, 3], self.patch.size,
                                       self.image.pad_value))

    def _take_from_mosaic(self, keys: list[tuple[int, int]]) -> None:
        """Patches that straddle tiles (or the case edge): read back from the mosaic."""
        if not keys:
            return
        ext = self.grid.extents(keys)
        crops = [self.mosaic.read(*e) for e in ext.tolist()]
        keep = [i for i, crop in enumerate(crops)
                if float(tissue_mask(crop).mean()) >= self.patch.min_tissue_fraction]
        if keep:
            self._take(ext[keep], [pad_to(crops[i], self.patch.size, self.image.pad_value) for i in keep])

    def _take(self, pos: Positions, crops: list[np.ndarray]) -> None:
        """Tissue patches, in the order they were cut: the focus QC of the sampled ones (before any stain
        normalisation), and into batches."""
        sampled = focus_sample(crops, self.cut)
        if sampled:
            self.qc.add_patches(laplacian_variance(np.stack(sampled)))
        self.cut += len(pos)
        self.batches.add(pos, crops)
