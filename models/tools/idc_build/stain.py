"""Per-patient Macenko stain fits: the stain reference for the appliance's QC and the macenko ablation."""
from __future__ import annotations

import numpy as np

from .log import log

def _stain_module():
    from appliance.pipeline import stain

    return stain


def stain_reference(images, patients, dev):
    """Macenko fit per patient (the appliance's implementation, appliance/pipeline/stain.py); the reference is
    the median development patient. Returns (fits by patient, reference, angle summary for the stain QC)."""
    stain = _stain_module()
    fits = {}
    for pid in np.unique(patients):
        try:
            fits[pid] = stain.fit_stains(images[patients == pid])
        except stain.StainFitError as exc:
            log(f"macenko: no stain fit for patient {pid} ({exc})")
    dev_pids = [p for p in fits if dev[patients == p][0]]
    he = np.median(np.stack([fits[p].he for p in dev_pids]), axis=0)
    ref = stain.StainFit(he / np.linalg.norm(he, axis=0), np.median(np.stack([fits[p].max_c for p in dev_pids]), 0), 0)

    def angle(a, b):
        return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))

    worst = np.array([max(angle(fits[p].he[:, 0], ref.he[:, 0]), angle(fits[p].he[:, 1], ref.he[:, 1]))
                      for p in dev_pids])
    angles = {"patients": len(dev_pids), "median": round(float(np.median(worst)), 2),
              "p95": round(float(np.percentile(worst, 95)), 2), "max": round(float(worst.max()), 2)}
    return fits, ref, angles


def macenko_per_patient(images, patients, dev):
    """Ablation only: Macenko-normalise each patient's patches to the median development-patient stains."""
    stain = _stain_module()
    fits, ref, _ = stain_reference(images, patients, dev)
    out = images.copy()
    for pid, f in fits.items():
        m = patients == pid
        out[m] = stain.apply_map(images[m], stain.normalising_map(f, ref))
    return out
