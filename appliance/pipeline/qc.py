"""Quality control per tile, per patch and per case. A case that fails gets `cannot-call` with reasons.

Thresholds are at the model's resolution and were set on the IDC development patches (see
`QcLimits`); each reason has a stable code for machines and a sentence, with the action, for people.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from appliance.pipeline.stain import StainFit, StainFitError, fit_stains_od, stained_od, take_rows
from appliance.pipeline.tissue import SATURATION_THRESHOLD
from appliance.terms import ReasonCode


@dataclass(frozen=True)
class Reason:
    """Why a case cannot be called: a stable code for machines and a sentence for people."""

    code: str
    message: str


@dataclass(frozen=True)
class QcLimits:
    # Variance of the 4-neighbour Laplacian of the green channel (0-255; in H&E green carries most of the
    # nuclear contrast) on a 50x50 patch at 4 um/px. On 4,000 random IDC tissue patches: 1st percentile 1,219
    # when sharp; 99th percentile 547 after a Gaussian blur of sigma 1 px, 139 after sigma 1.5 px. Below
    # 500 a patch counts as out of focus.
    focus_min: float = 500.0
    max_blurred_fraction: float = 0.30  # of tissue patches
    # Tissue pixels (saturation > 20) with a channel clipped at 255 mean over-exposure.
    max_clipped_fraction: float = 0.30
    # Angle between the case's fitted H (or E) stain vector and the model's reference, in degrees, judged only
    # when the fit had at least stain_min_pixels tissue pixels. A model's manifest sets it (stain.max_angle_deg:
    # where the model's out-of-fold AUC falls by more than 0.02 under a turned haematoxylin, measured by the
    # build); this default is only for a model without one. Sparse development patients (~100 patches)
    # spread further than whole slides because the fit is noisy on few pixels, hence the pixel minimum.
    max_stain_angle: float = 15.0
    # The stain is judged progressively, first once stain_first_judgement stained tissue pixels have gone into
    # the sample, then each time that count doubles, and always on the whole case when it ends. The sample keeps
    # at most stain_sample_max, which bounds what a fit costs on the path to every verdict (docs/performance.md,
    # "Why the code is shaped so").
    stain_first_judgement: int = 50_000
    stain_sample_per_tile: int = 10_000
    stain_sample_max: int = 100_000
    # When the stain cannot be assessed, a case with tissue is refused (fail closed), never called:
    # - fewer stained pixels than stain_min_pixels in the whole case's fit. A case of min_patches (15) patches
    #   at the QC's half resolution offers about 9,000 tissue pixels, a third or more of them stained on every
    #   development slide. Fitted on 2,000 of a complete development slide's stained pixels drawn at random, H
    #   and E lie within 1.5 deg of the whole slide's fit (95th percentile of 20 draws, median of 27 slides;
    #   within 10 deg on the worst slide; 5,000 pixels: 1.0 and 5.8 deg).
    stain_min_pixels: int = 2_000
    # - fewer than this fraction of the tissue pixels stained (optical density >= BETA in every channel): a
    #   stain too pale, or too far off, to be measured (development slides: 0.33 and more)
    stain_min_stained_fraction: float = 0.10
    # - fits of the same case that disagree: an earlier fit (on the tiles up to it) further than this from the
    #   whole case's fit, in H or E (the stain changed during the scan, or the fit is unstable). Unshifted
    #   complete development slides, their patches as tiles, disagreed by up to 16 deg (2 of 26 over 10 deg)
    stain_max_disagreement: float = 20.0


def limits_for(manifest, base: QcLimits | None = None) -> QcLimits:
    """The QC limits for a model: ``base`` (default QcLimits()) with the manifest's stain limit, if it has one."""
    base = base or QcLimits()
    limit = manifest.stain.max_angle_deg
    return base if limit is None else replace(base, max_stain_angle=float(limit))


def laplacian_variance(patches: np.ndarray) -> np.ndarray:
    """Focus measure per patch: variance of the 4-neighbour Laplacian of green, (N, S, S, 3) -> (N,) float64.

    From exact integer sums (n * sum(L^2) - sum(L)^2) / n^2: exact, where a float32 mean and squared
    deviations are off by up to 0.06. The Laplacian is OpenCV's filter over the patches' green
    stacked into one image (a patch's inner pixels have all their neighbours in the patch, so the rows where two
    patches meet are never used), quicker than numpy's shifted sums (docs/performance.md, "Why the code is
    shaped so")."""
    n, s = len(patches), patches.shape[1]
    if patches.dtype == np.uint8 and patches.flags.c_contiguous and n:
        green = cv2.extractChannel(patches.reshape(n * s, patches.shape[2], 3), 1)
        lap = cv2.filter2D(green, cv2.CV_16S, _LAPLACIAN).reshape(n, s, -1)[:, 1:-1, 1:-1]
    else:
        g = patches[..., 1].astype(np.int16)
        lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    lap = lap.astype(np.int32).reshape(n, -1)  # a square (at most 1020^2) fits; sums are taken in int64
    m = lap.shape[1]
    s1 = lap.sum(axis=1, dtype=np.int64)
    s2 = np.multiply(lap, lap, out=lap).sum(axis=1, dtype=np.int64)
    return (s2 * m - s1 * s1) / (m * m)


_LAPLACIAN = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32)  # the 4-neighbour kernel, as above


def unclipped_in(sub: np.ndarray, mask: np.ndarray) -> int:
    """How many pixels of the mask have no channel at 255 (one OpenCV range test, quicker than numpy's)."""
    if sub.ndim == 3 and sub.dtype == np.uint8 and sub.flags.c_contiguous and mask.flags.c_contiguous:
        below = cv2.inRange(sub, (0, 0, 0), (254, 254, 254))  # 255 where every channel is below 255
        return cv2.countNonZero(cv2.bitwise_and(below, mask.view(np.uint8)))
    return int(np.count_nonzero(mask & (sub[..., 0] < 255) & (sub[..., 1] < 255) & (sub[..., 2] < 255)))


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    c = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


class StainSample:
    """The stained tissue pixels the stain is fitted on, as optical density: an even sample of every tile seen
    so far, bounded in size.

    The rule is fixed, so the same tiles always give the same sample (and so the same stain angles): each tile
    offers up to ``per_tile`` of its tissue pixels, evenly spaced in raster order, and the stained ones of
    those are kept; when the sample would pass ``max_pixels``, every second pixel already kept is dropped and
    later tiles offer half as many. Every tile of the case is then equally represented, not only the first.
    """

    def __init__(self, per_tile: int, max_pixels: int):
        if per_tile < 1 or max_pixels < per_tile:
            raise ValueError("need 1 <= per_tile <= max_pixels")
        self.per_tile = per_tile
        self.max_pixels = max_pixels
        self._chunks: list[np.ndarray] = []
        self.size = 0  # pixels in the sample now
        self.taken = 0  # pixels ever put in (never falls: the judgement points count these)
        self.offered = 0  # tissue pixels ever offered, stained or not

    def add(self, pixels: np.ndarray, tissue: np.ndarray) -> None:
        """One tile: its pixels, (m, 3) uint8 in raster order, and the indices of the tissue ones among them
        (ascending). Only the offered pixels are gathered: the tile's others are never copied."""
        n = len(tissue)
        if n == 0:
            return
        take = min(self.per_tile, n)
        od = stained_od(take_rows(pixels, tissue[(np.arange(take, dtype=np.int64) * n) // take]))
        self.offered += take
        self._chunks.append(od)
        self.size += len(od)
        self.taken += len(od)
        while self.size > self.max_pixels:
            self._chunks = [c[::2] for c in self._chunks]
            self.size = sum(len(c) for c in self._chunks)
            self.per_tile = max(1, self.per_tile // 2)

    def od(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0, 3), np.float32)


@dataclass
class CaseQc:
    """QC evidence of tiles 1..N as they stream in; ``reasons`` gives the blocking problems of those tiles.

    Everything here is a function of the tile sequence only (never of how far inference has got), so the
    QC of tiles 1..N is the same in every run. The stain is judged progressively, each time on the whole
    sample of the tiles so far (``StainSample``): first once ``stain_first_judgement`` stained pixels have gone
    into the sample, then each time that count doubles; ``finish`` judges it on the whole case. A finished case
    with tissue whose stain cannot be assessed is refused (``stain_problem``): the QC fails closed.
    """

    limits: QcLimits = field(default_factory=QcLimits)
    reference: StainFit | None = None
    tiles: int = 0
    blank_tiles: int = 0
    tissue_pixels: int = 0
    clipped_pixels: int = 0
    patches_scored: int = 0  # patches focus-checked (the sampled ones)
    patches_blurred: int = 0
    stain: StainFit | None = None  # the latest judgement's fit
    stain_error: str | None = None
    stain_judged_at_tiles: int | None = None  # tiles 1..N the latest stain fit was made on
    first_fit: StainFit | None = None  # the first judgement's fit (a normalising model's map comes from it)
    fits: int = 0
    fit_history: list[StainFit | None] = field(default_factory=list)  # every fit, in order (None: failed)
    finished: bool = False
    focus_values: list[float] = field(default_factory=list)  # every focus-checked patch's Laplacian variance
    sample: StainSample = field(init=False)
    _next_judgement: int = field(init=False)
    _angles: tuple[float, float] | None = field(init=False, default=None)  # of the latest fit, to the reference

    def __post_init__(self) -> None:
        self.sample = StainSample(self.limits.stain_sample_per_tile, self.limits.stain_sample_max)
        self._next_judgement = self.limits.stain_first_judgement

    def add_tile(self, sub: np.ndarray, mask: np.ndarray) -> None:
        """One tile, subsampled, and its tissue mask (same shape): exposure, blank, stain sample; judges the
        stain when this tile brings the stained pixels put into the sample to the next judgement point."""
        self.tiles += 1
        n = int(np.count_nonzero(mask))
        if n == 0:
            self.blank_tiles += 1
            return
        self.tissue_pixels += n
        self.clipped_pixels += n - unclipped_in(sub, mask)
        self.sample.add(sub.reshape(-1, 3), np.flatnonzero(mask))
        if self.sample.taken >= self._next_judgement:
            self.fit_stain()
            self._next_judgement = 2 * self.sample.taken  # few fits, each on all the tiles so far

    def add_patches(self, focus: np.ndarray) -> None:
        self.patches_scored += len(focus)
        self.focus_values.extend(np.asarray(focus, dtype=np.float64).tolist())
        self.patches_blurred += int((focus < self.limits.focus_min).sum())

    def fit_stain(self) -> StainFit | None:
        """Fit the stains on the sample of the tiles so far (None if not measurable)."""
        self.fits += 1
        self.stain_judged_at_tiles = self.tiles
        try:
            self.stain = fit_stains_od(self.sample.od())
            self.stain_error = None
        except StainFitError as exc:
            self.stain, self.stain_error = None, str(exc)
        # measured once per fit (the session asks for the QC's reasons at every tile)
        self._angles = None if self.stain is None or self.reference is None else (
            angle_degrees(self.stain.he[:, 0], self.reference.he[:, 0]),
            angle_degrees(self.stain.he[:, 1], self.reference.he[:, 1]))
        self.fit_history.append(self.stain)
        if self.fits == 1:
            self.first_fit = self.stain
        return self.stain

    def finish(self) -> None:
        """Judge the stain on the whole case (unless the last judgement already covered every tile)."""
        if self.tissue_pixels and self.stain_judged_at_tiles != self.tiles:
            self.fit_stain()
        self.finished = True

    @property
    def blurred_fraction(self) -> float:
        return self.patches_blurred / self.patches_scored if self.patches_scored else 0.0

    @property
    def focus_median(self) -> float | None:
        """The median Laplacian variance of the focus-checked patches (None before any): how sharp the case is."""
        return round(float(np.median(self.focus_values)), 2) if self.focus_values else None

    @property
    def clipped_fraction(self) -> float:
        return self.clipped_pixels / self.tissue_pixels if self.tissue_pixels else 0.0

    @property
    def stained_fraction(self) -> float:
        """Of the tissue pixels offered to the stain sample, the fraction stained in every channel."""
        return self.sample.taken / self.sample.offered if self.sample.offered else 0.0

    @property
    def stain_assessed(self) -> bool:
        """The latest fit can be judged: it exists, on enough stained pixels, of a stain not too pale to measure."""
        lim = self.limits
        return (self.stain is not None and self.stain.pixels >= lim.stain_min_pixels
                and self.stained_fraction >= lim.stain_min_stained_fraction)

    @property
    def stain_judged(self) -> bool:
        """Whether the stain of the tiles so far has been judged (always, for a model without a reference)."""
        return self.reference is None or self.stain_assessed

    def fit_disagreement(self) -> float:
        """The largest angle (deg) between an earlier fit's H or E vector and the latest fit's (0 with fewer
        than two fits; an earlier fit that failed, on fewer tiles, is not held against the case)."""
        last = self.stain
        if last is None:
            return 0.0
        return max((max(angle_degrees(f.he[:, 0], last.he[:, 0]), angle_degrees(f.he[:, 1], last.he[:, 1]))
                    for f in self.fit_history[:-1] if f is not None), default=0.0)

    def stain_problem(self) -> str | None:
        """Why the stain of a finished case with tissue cannot be assessed (None when it can, or when there is
        nothing to judge: no reference, no tissue, not finished)."""
        if self.reference is None or not self.finished or not self.tissue_pixels:
            return None
        lim = self.limits
        if self.stained_fraction < lim.stain_min_stained_fraction:
            return (f"only {self.stained_fraction:.0%} of the tissue pixels are stained enough to measure "
                    f"(at least {lim.stain_min_stained_fraction:.0%} needed): the stain is too pale or unlike H&E")
        if self.stain is None:
            return f"the stain fit failed ({self.stain_error})"
        if self.stain.pixels < lim.stain_min_pixels:
            return (f"only {self.stain.pixels} stained pixels (at least {lim.stain_min_pixels} needed) to fit "
                    f"the stains on")
        angles = self._angles
        if self.fit_disagreement() > lim.stain_max_disagreement and not (angles and max(angles) > lim.max_stain_angle):
            return (f"the stain fits of this case disagree by {self.fit_disagreement():.0f} deg (limit "
                    f"{lim.stain_max_disagreement:g} deg): the stain changed during the scan")
        return None

    def h_out_of_plane(self) -> float | None:
        """How far (deg) the latest fit's H vector leaves the reference's H&E plane: a turn within that plane
        (the kind training augments with) keeps it near 0, a turn in another basis does not (None without a
        fit or a reference). Reported, not a gate."""
        if self.stain is None or self.reference is None:
            return None
        normal = np.cross(self.reference.he[:, 0], self.reference.he[:, 1])
        h = self.stain.he[:, 0]
        sine = abs(float(h @ normal)) / (np.linalg.norm(normal) * np.linalg.norm(h))
        return float(np.degrees(np.arcsin(min(1.0, sine))))

    def stain_angles(self) -> tuple[float, float] | None:
        """The latest fit's H and E angles to the model's reference, in degrees (None without either)."""
        return self._angles

    def reasons(self) -> list[Reason]:
        """Blocking problems of the tiles so far (tissue quantity is judged by the session)."""
        lim, out = self.limits, []
        if self.patches_scored and self.blurred_fraction > lim.max_blurred_fraction:
            out.append(Reason(ReasonCode.OUT_OF_FOCUS, f"Rescan: out of focus in {self.blurred_fraction:.0%} of tissue "
                                              f"(limit {lim.max_blurred_fraction:.0%})."))
        if self.tissue_pixels and self.clipped_fraction > lim.max_clipped_fraction:
            out.append(Reason(ReasonCode.OVER_EXPOSED, f"Rescan: {self.clipped_fraction:.0%} of tissue pixels are clipped "
                                              f"white (over-exposed; limit {lim.max_clipped_fraction:.0%}); "
                                              f"check the illumination."))
        problem = self.stain_problem()
        angles = self.stain_angles()
        if problem is None and angles is not None and self.stain_assessed and max(angles) > lim.max_stain_angle:
            out.append(Reason(ReasonCode.STAIN_OUT_OF_RANGE,
                              f"Check the staining: the case's stain colours differ from the expected H&E "
                              f"by {angles[0]:.0f} deg (haematoxylin) and {angles[1]:.0f} deg (eosin); "
                              f"limit {lim.max_stain_angle:g} deg."))
        elif problem is not None:
            out.append(Reason(ReasonCode.STAIN_NOT_ASSESSABLE,
                              f"Check the staining and rescan: the stain could not be assessed, so the model's "
                              f"reading cannot be trusted: {problem}."))
        return out

    def summary(self) -> dict:
        angles = self.stain_angles()
        return {
            "tiles": self.tiles,
            "blank_tiles": self.blank_tiles,
            "tissue_pixels_sampled": self.tissue_pixels,
            "clipped_fraction": round(self.clipped_fraction, 4),
            "patches_focus_checked": self.patches_scored,
            "patches_out_of_focus": self.patches_blurred,
            "out_of_focus_fraction": round(self.blurred_fraction, 4),
            "focus_median": self.focus_median,
            "stain": self.stain.to_dict() if self.stain is not None else None,
            "stain_error": self.stain_error,
            "stain_angles_deg": [round(a, 1) for a in angles] if angles else None,
            "stain_assessed": self.stain_assessed,
            "stain_problem": self.stain_problem(),
            "stained_fraction": round(self.stained_fraction, 4),
            "stain_fit_disagreement_deg": round(self.fit_disagreement(), 1),
            "stain_h_out_of_plane_deg": None if self.h_out_of_plane() is None else round(self.h_out_of_plane(), 1),
            "stain_sample_pixels": self.sample.size,
            "stain_fits": self.fits,
            "saturation_threshold": SATURATION_THRESHOLD,
        }
