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

ANGLES = (0, 5, 10, 15, 20, 25, 30, 35, 40, 45)
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


def shift_curve(images, labels, patients, folds, predict, fits, angles=ANGLES, log=print):
    """Rows {angle_deg, pooled_auc, fold_auc}; predict(fold, uint8 patches) -> probabilities of that fold's
    member (the member that did not train on the fold's patients)."""
    from appliance.pipeline.stain import turn_haematoxylin

    k = int(folds.max()) + 1
    rows = []
    for angle in angles:
        shifted = images.copy()
        if angle:
            for pid, fit in fits.items():
                sel = patients == pid
                shifted[sel] = turn_haematoxylin(images[sel], fit, angle)
        p = np.full(len(images), np.nan)
        for f in range(k):
            sel = folds == f
            p[sel] = predict(f, shifted[sel])
        row = {"angle_deg": float(angle), "pooled_auc": round(auc(labels, p), 4),
               "fold_auc": [round(auc(labels[folds == f], p[folds == f]), 4) for f in range(k)]}
        rows.append(row)
        log(f"stain shift: H turned {angle:>2} deg, pooled OOF AUC {row['pooled_auc']:.4f} {row['fold_auc']}")
    return rows


def limit_from_curve(rows, max_drop: float = MAX_AUC_DROP) -> tuple[float, bool]:
    """(limit in degrees, crossed): where the pooled AUC first falls by more than max_drop below the 0 deg row;
    (the last angle, False) when it never does within the measured angles."""
    base = rows[0]["pooled_auc"]
    assert rows[0]["angle_deg"] == 0
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
