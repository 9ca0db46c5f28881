"""Whether the lab-shift augmentations are kept: this build against the recorded build of the other recipe."""
from __future__ import annotations

import json
from pathlib import Path

from .log import log

AUGMENTATION_MAX_AUC_LOSS = 0.005  # an augmentation is kept only if unshifted pooled OOF AUC stays within this
# a full build of the lab-shift recipe (same folds and seed), its figures kept by models/tools/labshift_build.json
LABSHIFT_FILE = Path(__file__).resolve().parents[1] / "labshift_build.json"


def augmentation_decision(aug: str, auc0: float, cores: dict) -> dict:
    """Whether the lab-shift augmentations (training.LAB_SHIFT) are kept. One build trains one recipe, so the
    other recipe's figures come from its recorded build (models/tools/labshift_build.json, same folds and seed).
    An augmentation is kept only if the unshifted pooled out-of-fold AUC (FP32, no TTA) stays within
    AUGMENTATION_MAX_AUC_LOSS of the recipe without it, and only if it does not lower the virtual-core
    specificity at the sensitivity-first threshold, the figure the case call rests on."""
    if not LABSHIFT_FILE.exists():
        return {"augmentation": aug, "rule": "not measured (models/tools/labshift_build.json missing)"}
    other = json.loads(LABSHIFT_FILE.read_text())
    mine = {"pooled_oof_auc": round(auc0, 4), "virtual_core_auc": cores["final"]["auc"],
            "virtual_core_specificity": cores["shipped_call"]["specificity"]}
    with_aug, without = (mine, other) if aug == "labshift" else (other, mine)
    auc_ok = with_aug["pooled_oof_auc"] >= without["pooled_oof_auc"] - AUGMENTATION_MAX_AUC_LOSS
    spec_ok = with_aug["virtual_core_specificity"] >= without["virtual_core_specificity"]
    out = {"this_build": aug, "with_labshift": with_aug, "without_labshift": without,
           "pooled_auc_within_rule": bool(auc_ok), "virtual_core_specificity_kept": bool(spec_ok),
           "kept": bool(auc_ok and spec_ok), "max_loss": AUGMENTATION_MAX_AUC_LOSS,
           "labshift_build": other.get("build", ""), "labshift_lab_shifts": other.get("lab_shifts"),
           "rule": f"kept only if the unshifted pooled out-of-fold AUC (FP32, no TTA) stays within "
                   f"{AUGMENTATION_MAX_AUC_LOSS} of the recipe without it, and the out-of-fold virtual-core "
                   f"specificity at the sensitivity-first threshold does not fall"}
    consistent = out["kept"] == (aug == "labshift")
    log(f"lab-shift augmentation: {out} -> {'consistent with' if consistent else 'NOT the recipe of'} this build")
    return out
