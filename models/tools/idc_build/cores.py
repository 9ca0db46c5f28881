"""Virtual core-needle biopsies cut from the complete slides: the case-level unit the case rule and its
threshold are chosen on.

A core-needle biopsy is a strip of tissue about 1 mm wide, which is what the bench scans. From each complete
slide (every patch of the patient, reassembled on its grid of 50 px cells at 4 um/px) we cut strips 1 mm
wide across the whole slide, every 1 mm, in four directions: horizontal and vertical (5 cells wide) and the
two diagonals (7 cells along the diagonal coordinate: 7 / sqrt 2 = 4.95 cells = 1 mm across). A strip is a
core when it holds at least MIN_CORE_PATCHES tissue patches. Its label:

* positive when it holds an IDC patch (recorded with how many: 1-2, 3-10, more);
* negative when neither it nor a one-cell margin on both sides holds one;
* left out otherwise (IDC just outside a strip's edge: a real core there would be ambiguous).

Pure numpy, no model: the scoring is the caller's (idc_build/corerules.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CORE_CELLS = 5  # 1 mm = 250 px at 4 um/px = 5 patches of 50 px
DIAGONAL_CELLS = 7  # along gx -+ gy: a band 7 steps wide is 7 / sqrt(2) = 4.95 cells across
MIN_CORE_PATCHES = 15  # as the appliance's decision.min_patches: fewer and the appliance cannot call
# direction -> (coordinate along which strips are stacked, band width in that coordinate)
DIRECTIONS = {
    "horizontal": (lambda gx, gy: gy, CORE_CELLS),
    "vertical": (lambda gx, gy: gx, CORE_CELLS),
    "diagonal": (lambda gx, gy: gx - gy, DIAGONAL_CELLS),
    "antidiagonal": (lambda gx, gy: gx + gy, DIAGONAL_CELLS),
}
IDC_BINS = ((1, 2, "1-2"), (3, 10, "3-10"), (11, None, ">10"))


@dataclass(frozen=True)
class Core:
    """One virtual core: its patient, direction and band, the positions (into the caller's patch arrays) of
    its patches, its label (1 = holds IDC) and its IDC patch count."""

    patient: int
    direction: str
    band: int
    idx: np.ndarray
    label: int
    idc_patches: int

    @property
    def name(self) -> str:
        return f"{self.patient}-{self.direction[0]}{self.band}"

    @property
    def idc_bin(self) -> str | None:
        """'1-2', '3-10' or '>10' for a positive core, None for a negative one."""
        for lo, hi, name in IDC_BINS:
            if self.idc_patches >= lo and (hi is None or self.idc_patches <= hi):
                return name
        return None


def cut_cores(patient: int, idx: np.ndarray, gx: np.ndarray, gy: np.ndarray, labels: np.ndarray,
              min_patches: int = MIN_CORE_PATCHES, directions=tuple(DIRECTIONS), offset: int = 0
              ) -> tuple[list[Core], int]:
    """The cores of one complete slide. idx: the slide's patch positions in the caller's arrays; gx, gy their
    grid cells; labels their patch labels. ``offset`` (cells) moves the strips' edges: strips cut at each
    offset 0..width-1 are all the cores a needle could take in that direction, overlapping. Returns (cores,
    strips left out as ambiguous)."""
    idx, gx, gy, labels = (np.asarray(a) for a in (idx, gx, gy, labels))
    cores, ambiguous = [], 0
    for direction in directions:
        coord, width = DIRECTIONS[direction]
        u = coord(gx, gy)
        u0 = int(u.min()) - offset % width
        band = (u - u0) // width
        for b in range(int(band.max()) + 1):
            inside = band == b
            if int(inside.sum()) < min_patches:
                continue
            n_idc = int(labels[inside].sum())
            if n_idc:
                label = 1
            else:
                lo, hi = u0 + b * width, u0 + (b + 1) * width  # the band is lo <= u < hi
                margin = (u == lo - 1) | (u == hi)
                if labels[margin].any():
                    ambiguous += 1
                    continue
                label = 0
            cores.append(Core(int(patient), direction, b, idx[inside], label, n_idc))
    return cores, ambiguous


def cut_all(slides: list[int], cell_map: dict, labels: np.ndarray, **kw) -> tuple[list[Core], dict]:
    """The cores of every listed complete slide; cell_map: patient -> (idx, gx, gy). Returns (cores, counts)."""
    cores, ambiguous = [], 0
    for p in slides:
        idx, gx, gy = cell_map[p]
        c, a = cut_cores(p, idx, gx, gy, labels[idx], **kw)
        cores += c
        ambiguous += a
    pos = [c for c in cores if c.label]
    counts = {"slides": len(slides), "cores": len(cores), "positive": len(pos), "negative": len(cores) - len(pos),
              "left_out_ambiguous": ambiguous,
              "positive_by_idc_patches": {name: sum(c.idc_bin == name for c in pos) for *_, name in IDC_BINS},
              "by_direction": {d: sum(c.direction == d for c in cores) for d in DIRECTIONS},
              "patches_per_core": {"median": int(np.median([len(c.idx) for c in cores])),
                                   "min": int(min(len(c.idx) for c in cores)),
                                   "max": int(max(len(c.idx) for c in cores))}}
    return cores, counts
