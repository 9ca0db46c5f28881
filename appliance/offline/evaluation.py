"""`appliance models evaluate`: score a labelled IDC-layout folder (<patient>/<label>/*.png) with the model."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from appliance.model.engine import Engine
from appliance.errors import InputError
from appliance.model.metrics import binary_metrics
from appliance.pipeline.context import refine
from appliance.pipeline.decision import whole_case_scores
from appliance.pipeline.patches import pad_to
from appliance.offline.sources import IMAGE_SUFFIXES, read_image, walk_files


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
    good = np.flatnonzero(ok)
    cells = _cells(images, size, m.patch.stride)
    first = probs.astype(np.float64)
    refined = first.copy()
    if engine.has_context:
        refined = _refine_by_patient(engine, images, good, cells, first)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "probability", "predicted", "first_stage"])
        for i in good.tolist():
            w.writerow([str(images[i].path), images[i].label, f"{refined[i]:.6f}", int(refined[i] >= threshold),
                        f"{first[i]:.6f}"])
    rows = [PatchRow(images[i].patient, images[i].label, float(refined[i]), float(first[i]), *cells[i])
            for i in good.tolist()]
    return metrics_from_rows(rows, m.decision) | {
        "unreadable": unreadable, "context_stage": engine.has_context,
        "patches_first_stage": binary_metrics(np.array([r.label for r in rows]), np.array([r.first_stage for r in rows]),
                                              m.decision.region_threshold or threshold) if rows else None}


_COORDS = re.compile(r"_x(\d+)_y(\d+)")


@dataclass(frozen=True)
class PatchRow:
    patient: str
    label: int
    probability: float  # refined by the context stage when the model has one
    first_stage: float
    gx: int | None  # grid cell from the file name's _x<X>_y<Y> (None when the name has no position)
    gy: int | None


def _cells(images: list[LabelledImage], size: int, stride: int) -> list[tuple[int | None, int | None]]:
    """Each image's grid cell, from ``_x<X>_y<Y>`` in its name (the IDC layout); (None, None) without."""
    out = []
    for it in images:
        mt = _COORDS.search(it.path.stem)
        out.append((int(mt.group(1)) // stride, int(mt.group(2)) // stride) if mt else (None, None))
    return out


def _refine_by_patient(engine: Engine, images, good, cells, first) -> np.ndarray:
    """The context stage over each patient's grid of positioned patches; a patch without a position, or a
    second patch on an occupied cell, is refined alone (its own score with no neighbours)."""
    refined = first.copy()
    by_patient: dict[str, list[int]] = {}
    for i in good.tolist():
        by_patient.setdefault(images[i].patient, []).append(i)
    for idx in by_patient.values():
        placed, alone, seen = [], [], set()
        for i in idx:
            c = cells[i]
            (alone if c[0] is None or c in seen else placed).append(i)
            seen.add(c)
        if placed:
            gx = np.array([cells[i][0] for i in placed])
            gy = np.array([cells[i][1] for i in placed])
            refined[placed] = refine(engine, gx, gy, first[placed])
        for i in alone:
            refined[i] = refine(engine, np.array([0]), np.array([0]), first[[i]])[0]
    return refined


def patient_score(decision, gx, gy, first, refined) -> float:
    """A patient's score as the appliance calls a case: the final rule's score, raised to the case threshold
    when the early rule fired (an early positive is suspicious whatever the final rule says)."""
    final, early_score = whole_case_scores(decision, gx, gy, first, refined)
    return max(final, decision.case_threshold) if early_score >= decision.early_rule.threshold else final


def metrics_from_rows(rows: list[PatchRow], decision) -> dict:
    """Patch-level metrics over all rows (the refined probability against the patch threshold), and
    patient-level metrics.

    Patient level: a patient is positive if any of its patches is IDC; its score is the model's decision as
    the appliance applies it to a case (patient_score; a region rule needs the patches' positions, and a patch
    without one counts as a region of its own). Also the per-patient mean
    of patch-level balanced accuracy, so one large patient cannot dominate.
    """
    patch_threshold, case_threshold, top_k = decision.patch_threshold, decision.case_threshold, decision.top_k
    if not rows:
        raise InputError("no readable images to evaluate")
    patients = sorted({r.patient for r in rows})
    labels = np.array([r.label for r in rows])
    scores = np.array([r.probability for r in rows])
    first = np.array([r.first_stage for r in rows])
    patch = binary_metrics(labels, scores, patch_threshold)
    p_labels, p_scores, per_patient_bal = [], [], []
    for pid in patients:
        sel = np.array([r.patient == pid for r in rows])
        p_labels.append(int(labels[sel].max()))
        own = [r for r in rows if r.patient == pid]
        # unpositioned patches get cells far apart (each its own region)
        gx = np.array([r.gx if r.gx is not None else -10 * (j + 1) for j, r in enumerate(own)])
        gy = np.array([r.gy if r.gy is not None else -10 * (j + 1) for j, r in enumerate(own)])
        p_scores.append(patient_score(decision, gx, gy, first[sel], scores[sel]))
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
        "case_rule": decision.case_rule,
    }
