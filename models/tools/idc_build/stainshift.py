"""Out-of-fold AUC against synthetic stain shifts, and the stain-out-of-range limit taken from it.

Each development patient's patches are re-coloured as another lab's staining might look: the patient's own
Macenko fit (the stain reference when a patient has too little stained tissue to fit) with the haematoxylin
vector turned in the H&E plane, away from eosin, in optical density, concentrations kept
(`appliance.pipeline.stain.turn_haematoxylin`). Every patch is scored by the fold member that did not train on
its patient, and the pooled out-of-fold AUC is taken per angle.

The limit: the angle at which that AUC has fallen by MAX_AUC_DROP from its unshifted value (linear
interpolation between the measured angles), rounded down to 0.5 deg. The appliance refuses a case whose
fitted H or E vector lies further than that from the reference (`stain-out-of-range`).
"""
from __future__ import annotations

import numpy as np

from .metrics import auc

ANGLES = (0, 10, 15, 20, 25, 30, 35, 40)
MAX_AUC_DROP = 0.02


def patient_fits(images, patients, reference):
    """patient -> its Macenko fit (the reference when it cannot be fitted); and the patients that fell back."""
    from appliance.pipeline.stain import StainFitError, fit_stains

    fits, fallback = {}, []
    for pid in np.unique(patients):
        try:
            fits[int(pid)] = fit_stains(images[patients == pid])
        except StainFitError:
            fits[int(pid)] = reference
            fallback.append(int(pid))
    return fits, fallback


def own_fit_shift(fits):
    """The first stain shift: each patient's own Macenko fit (fits: patient -> StainFit) with its H vector
    turned in its H&E plane (`appliance.pipeline.stain.turn_haematoxylin`)."""
    from appliance.pipeline.stain import turn_haematoxylin

    return lambda x, pid, angle: turn_haematoxylin(x, fits[pid], angle)


def rj_shift(x, pid, angle):
    """The second stain shift (turn_haematoxylin_rj), the same for every patient."""
    return turn_haematoxylin_rj(x, angle)


def judged_angles(images, patients, slides, reference, shift, angles) -> list[dict]:
    """What the appliance's stain QC reads on the listed (complete) slides under a shift: per angle, the
    haematoxylin angle it judges (min, median, max over the slides) and the largest of H and E."""
    rows = []
    for angle in angles:
        sel = np.isin(patients, slides)
        x, pats = images[sel], patients[sel]
        if angle:
            x = x.copy()
            for pid in slides:
                m = pats == pid
                x[m] = shift(x[m], int(pid), angle)
        judged = [a for a in qc_stain_angles(x, pats, slides, reference).values() if a is not None]
        h, hm = [a[0] for a in judged], [max(a) for a in judged]
        rows.append({"angle_deg": float(angle), "slides_judged": len(judged),
                     "h_deg": [round(float(v), 1) for v in (min(h), np.median(h), max(h))],
                     "max_h_e_deg": [round(float(v), 1) for v in (min(hm), np.median(hm), max(hm))]})
    return rows


def shift_curve(images, labels, patients, folds, predict, shift, angles=ANGLES, log=print, name=""):
    """Rows {angle_deg, pooled_auc, fold_auc}; predict(fold, uint8 patches) -> probabilities of that fold's
    member (the member that did not train on the fold's patients); shift(patches, patient, angle) -> the
    patient's patches re-coloured."""
    k = int(folds.max()) + 1
    rows = []
    for angle in angles:
        shifted = images.copy()
        if angle:
            for pid in np.unique(patients):
                sel = patients == pid
                shifted[sel] = shift(images[sel], int(pid), angle)
        p = np.full(len(images), np.nan)
        for f in range(k):
            sel = folds == f
            p[sel] = predict(f, shifted[sel])
        row = {"angle_deg": float(angle), "pooled_auc": round(auc(labels, p), 4),
               "fold_auc": [round(auc(labels[folds == f], p[folds == f]), 4) for f in range(k)]}
        rows.append(row)
        log(f"stain shift {name}: H turned {angle:>2} deg, pooled OOF AUC {row['pooled_auc']:.4f} {row['fold_auc']}")
    return rows


def limit_from_curve(rows, max_drop: float = MAX_AUC_DROP) -> tuple[float, bool]:
    """(limit in degrees, crossed): where the pooled AUC first falls by more than max_drop below the 0 deg row;
    (the last angle, False) when it never does within the measured angles."""
    if not rows or rows[0]["angle_deg"] != 0:
        raise ValueError(f"a stain-shift curve must start at 0 deg (the unturned data it falls from); this one "
                         f"starts at {rows[0]['angle_deg'] if rows else 'nothing'}")
    base = rows[0]["pooled_auc"]
    for a, b in zip(rows, rows[1:]):
        if base - b["pooled_auc"] > max_drop:
            da, db = base - a["pooled_auc"], base - b["pooled_auc"]
            t = (max_drop - da) / (db - da) if db > da else 0.0
            angle = a["angle_deg"] + t * (b["angle_deg"] - a["angle_deg"])
            return float(np.floor(angle * 2) / 2), True
    return float(rows[-1]["angle_deg"]), False


def qc_stain_angles(images, patients, pids, reference):
    """Each listed patient's patches through the appliance's own QC (each patch as a tile: tissue mask, stain
    sample, progressive fits, whole-case fit): patient -> (H angle, E angle) if the stain was judged
    (enough stained pixels), else None."""
    from appliance.pipeline.qc import CaseQc
    from appliance.pipeline.tissue import mask_of_subsampled, subsample

    out = {}
    for pid in pids:
        qc = CaseQc(reference=reference)
        for patch in images[patients == pid]:
            sub = subsample(patch)
            qc.add_tile(sub, mask_of_subsampled(sub))
        qc.finish()
        out[int(pid)] = qc.stain_angles() if qc.stain_assessed else None
    return out


def turn_haematoxylin_rj(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """The second, independent stain shift: uint8 RGB unmixed on the fixed Ruifrok & Johnston H, E, DAB basis
    (skimage.color's HED matrices, the same for every patient, not the patient's own fit), the H vector turned
    by ``degrees`` in the plane of H and E, away from eosin (its length kept), and the pixels recombined with
    the turned basis. Training never sees this transform (its stain turn works on the build's own reference in
    its own optical density), so the curve it gives does not flatter the model."""
    from skimage.color import combine_stains, rgb_from_hed, separate_stains

    basis = np.array(rgb_from_hed, dtype=np.float64)
    h, e = basis[0] / np.linalg.norm(basis[0]), basis[1] / np.linalg.norm(basis[1])
    u = e - (e @ h) * h
    u /= np.linalg.norm(u)
    t = np.radians(degrees)
    turned = basis.copy()
    turned[0] = (np.cos(t) * h - np.sin(t) * u) * np.linalg.norm(basis[0])
    flat = rgb.reshape(-1, 3)
    stains = separate_stains(flat, np.linalg.inv(basis))
    out = combine_stains(stains, turned)
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8).reshape(rgb.shape)
