"""`appliance models evaluate`: score a labelled IDC-layout folder (<patient>/<label>/*.png) with the model."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .engine import Engine
from .errors import InputError
from .metrics import binary_metrics, top_k_mean
from .pipeline.patches import pad_to
from .sources import IMAGE_SUFFIXES, read_image, walk_files


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    patient: str
    label: int


def find_labelled_images(root: Path) -> list[LabelledImage]:
    """Images at ``<patient>/<0|1>/<file>`` under ``root`` (or ``<0|1>/<file>`` when ``root`` is one patient).

    Anything else, such as files outside a label folder, is ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    found = []
    for p in walk_files(root):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = p.relative_to(root).parts
        # <patient>/<label>/<file> at any depth; ROOT may itself be one patient's folder (<label>/<file>)
        if len(rel) >= 3 and rel[-2] in ("0", "1"):
            found.append(LabelledImage(p, rel[-3], int(rel[-2])))
        elif len(rel) == 2 and rel[0] in ("0", "1"):
            found.append(LabelledImage(p, root.resolve().name, int(rel[0])))
    if not found:
        raise InputError(f"{root}: no images laid out as <patient>/<0|1>/<image>")
    return found


def evaluate_folder(
    engine: Engine,
    root: Path,
    out_csv: Path,
    *,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score every image, write ``path,label,probability,predicted`` rows and return the metrics."""
    m = engine.manifest
    size, pad = m.patch.size, m.input.pad_value
    threshold = m.decision.patch_threshold
    images = find_labelled_images(root)
    probs = np.zeros(len(images), dtype=np.float32)
    unreadable: list[str] = []
    ok = np.ones(len(images), dtype=bool)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch, idx = [], []
        for i, item in enumerate(chunk, start):
            try:
                img = read_image(item.path)
            except InputError as exc:
                unreadable.append(str(exc))
                ok[i] = False
                continue
            if img.shape[0] > size or img.shape[1] > size:
                img = img[:size, :size]  # larger than a patch: score its top-left patch, as documented
            batch.append(pad_to(img, size, pad))
            idx.append(i)
        if batch:
            probs[idx] = engine.infer(np.stack(batch))
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability", "predicted"])
        for item, p, good in zip(images, probs, ok):
            if good:
                w.writerow([str(item.path), item.label, f"{p:.6f}", int(p >= threshold)])
    return metrics_from_rows(
        [(it.patient, it.label, float(p)) for it, p, good in zip(images, probs, ok) if good],
        patch_threshold=threshold,
        case_threshold=m.decision.case_threshold,
        top_k=m.decision.top_k,
    ) | {"unreadable": unreadable}


def metrics_from_rows(rows: list[tuple[str, int, float]], *, patch_threshold: float, case_threshold: float,
                      top_k: int) -> dict:
    """Patch-level metrics over all rows, and patient-level metrics.

    Patient level: a patient is positive if any of its patches is IDC; its score is the top-k mean of
    its patch probabilities (the same MIL rule the appliance uses for a case). Also the per-patient
    mean of patch-level balanced accuracy, so one large patient cannot dominate.
    """
    if not rows:
        raise InputError("no readable images to evaluate")
    patients = sorted({r[0] for r in rows})
    labels = np.array([r[1] for r in rows])
    scores = np.array([r[2] for r in rows])
    patch = binary_metrics(labels, scores, patch_threshold)
    p_labels, p_scores, per_patient_bal = [], [], []
    for pid in patients:
        sel = np.array([r[0] == pid for r in rows])
        p_labels.append(int(labels[sel].max()))
        p_scores.append(top_k_mean(scores[sel], top_k))
        bm = binary_metrics(labels[sel], scores[sel], patch_threshold)
        if bm["balanced_accuracy"] is not None:
            per_patient_bal.append(bm["balanced_accuracy"])
    patient = binary_metrics(np.array(p_labels), np.array(p_scores), case_threshold)
    return {
        "patches": patch,
        "patients": patient,
        "n_patients": len(patients),
        "mean_patient_balanced_accuracy": float(np.mean(per_patient_bal)) if per_patient_bal else None,
        "patients_with_both_classes": len(per_patient_bal),
        "patch_threshold": patch_threshold,
        "case_threshold": case_threshold,
        "top_k": top_k,
    }
