"""`appliance site validate`: the appliance measured on a lab's own labelled cases.

The cases run through the batch engine (appliance.offline.batch: Dask, resumable, every case recorded in the
case store), with the model's own threshold, so the validation measures the model and not a site point
accepted earlier. The report is then computed from the store's records of those cases: AUC with DeLong's CI,
sensitivity and specificity at the shipped threshold with Wilson CIs, the threshold the written rule
recommends for the target sensitivity (none below 30 callable cases of each label), the cannot-call rate by
reason, the model card's figures beside the lab's, and the drift reference of these cases.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from appliance import RESEARCH_USE_NOTICE
from appliance.config import Settings
from appliance.errors import InputError
from appliance.model.manifest import read_manifest
from appliance.offline.batch import BatchInput, BatchRow, run_batch
from appliance.site import stats
from appliance.service.drift import reference_of, reason_codes
from appliance.store import CaseStore
from appliance.terms import BatchStatus, Verdict

LABELS = {"malignant": 1, "1": 1, "benign": 0, "0": 0}
MINIMUM_PER_LABEL = 30


@dataclass(frozen=True)
class SiteCase:
    path: Path
    label: int  # 1 malignant, 0 benign
    specimen: str = ""


def read_site_cases(manifest: Path) -> list[SiteCase]:
    """The cases of a validation CSV: ``path`` (slide file, image or tile folder; relative to the CSV),
    ``label`` (malignant/benign or 1/0) and an optional ``specimen``. Any bad row stops it, named."""
    try:
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{manifest}: cannot read the case list ({exc})") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise InputError(f"{manifest}: no {' or '.join(missing)} column (the CSV needs path, label and may "
                         f"have specimen)")
    cases = []
    for n, row in enumerate(rows, start=2):
        raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip().lower()
        if not raw:
            raise InputError(f"{manifest}, line {n}: no path")
        if label not in LABELS:
            raise InputError(f"{manifest}, line {n}: label {row.get('label')!r} is not malignant, benign, 1 or 0")
        path = Path(raw) if Path(raw).is_absolute() else Path(manifest).parent / raw
        cases.append(SiteCase(path, LABELS[label], (row.get("specimen") or "").strip()))
    if not cases:
        raise InputError(f"{manifest}: no cases")
    return cases


def run_cases(cases: list[SiteCase], settings: Settings, client, *, threads: int = 1,
              on_row: Callable[[BatchRow, int, int], None] | None = None) -> list[BatchRow]:
    """Triage the cases on ``client``'s cluster (a rerun skips what is recorded; failed cases are tried again)."""
    inputs = [BatchInput(c.path, c.specimen) for c in cases]
    return run_batch(inputs, settings, client, threads=threads, retry_failed=True, on_row=on_row)


def build_report(cases: list[SiteCase], rows: list[BatchRow], store: CaseStore, manifest, *,
                 target: float, source: str) -> dict:
    """The report's figures from the store's records of the validation's cases."""
    table, labels, scores, finished = [], [], [], []
    for case, row in zip(cases, rows):
        record = store.get_case(row.case_id) if row.case_id else None
        done = record is not None and record.get("verdict") is not None
        called = done and record["verdict"] != Verdict.CANNOT_CALL
        table.append({"case_id": row.case_id, "input": row.input, "specimen": case.specimen, "label": case.label,
                      "status": row.status if row.status == BatchStatus.FAILED else (record or {}).get("status", row.status),
                      "verdict": (record or {}).get("verdict") or "", "score": (record or {}).get("score"),
                      "reasons": reason_codes(record) if done else ([row.reasons] if row.reasons else []),
                      "callable": called})
        if done:
            finished.append(record)
        if called:
            labels.append(case.label)
            scores.append(float(record["score"]))
    n_mal, n_ben = sum(labels), len(labels) - sum(labels)
    shipped_threshold = manifest.decision.case_threshold
    note = stats.cases_needed(n_mal, n_ben, MINIMUM_PER_LABEL)
    both = n_mal > 0 and n_ben > 0
    auc = None
    if both:
        value, ci = stats.auc_delong(labels, scores)
        auc = {"value": round(value, 4), "ci95": [round(ci[0], 4), round(ci[1], 4)], "method": "DeLong"}
    recommended = None if note is not None else stats.recommend_threshold(labels, scores, target)
    if recommended is not None:
        note = (f"Recommended site threshold {recommended['threshold']:.4f} (the model's is {shipped_threshold:.4f}): "
                f"sensitivity {recommended['sensitivity']:.3f}, at least {recommended['bar']:.3f} with 95% "
                f"confidence on these {n_mal} malignant cases.")
    fpr, tpr, _ = stats.roc_curve(labels, scores) if both else (None, None, None)
    reference = reference_of(finished, stats.spread)
    card = _model_card(manifest)
    shipped = stats.at_threshold(labels, scores, shipped_threshold)
    lab = {"auc": auc["ci95"] if auc else None, "sensitivity": shipped["sensitivity_ci95"] if n_mal else None,
           "specificity": shipped["specificity_ci95"] if n_ben else None}
    agreement = {k: stats.ci_overlap(v, card[f"{k}_ci95"]) for k, v in lab.items()
                 if v is not None and card.get(f"{k}_ci95")}
    failed = sum(r.status == BatchStatus.FAILED for r in rows)
    return {
        "kind": "appliance-site-validation", "schema": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notice": RESEARCH_USE_NOTICE,
        "model": {"name": manifest.name, "version": manifest.version, "sha256": manifest.digest},
        "manifest_csv": source, "target_sensitivity": target,
        "counts": {"cases": len(cases), "malignant": sum(c.label for c in cases),
                   "benign": sum(1 - c.label for c in cases), "callable_malignant": n_mal,
                   "callable_benign": n_ben, "cannot_call": len(finished) - len(labels), "failed": failed},
        "cannot_call": {"n": len(finished) - len(labels), "cases": len(finished),
                        "rate": round((len(finished) - len(labels)) / len(finished), 4) if finished else None,
                        "by_reason": reference["cannot_call"]["by_reason"]},
        "auc": auc, "shipped": shipped, "recommended": recommended, "recommendation_note": note,
        "model_card": card, "agreement": agreement,
        "roc": {"fpr": [round(v, 4) for v in fpr], "tpr": [round(v, 4) for v in tpr]} if both else None,
        "distributions": reference["measures"], "drift_reference": reference,
        "cases": table,
    }


def _model_card(manifest) -> dict:
    """The model card's case-level figures (its virtual cores, out of fold) at the shipped threshold."""
    cores = manifest.metrics.get("virtual_cores") or {}
    final, call = cores.get("final") or {}, cores.get("shipped_call") or {}
    return {"auc": final.get("auc"), "auc_ci95": final.get("auc_ci95"), "threshold": final.get("threshold"),
            "sensitivity": call.get("sensitivity"), "sensitivity_ci95": call.get("sensitivity_ci95"),
            "specificity": call.get("specificity"), "specificity_ci95": call.get("specificity_ci95"),
            "source": f"{manifest.name} {manifest.version} model card: {cores.get('cores', '?')} virtual cores of "
                      f"{cores.get('slides', '?')} development slides, out of fold, CIs by bootstrap over patients"}


def validate(manifest_csv: Path, out_dir: Path, settings: Settings, client, *, target: float = 0.98,
             threads: int = 1, on_row=None) -> tuple[dict, dict]:
    """Run the validation and write its report; returns (report, {"json", "html", "sha256"})."""
    from appliance.site.report import write_report

    if not 0 < target <= 1:
        raise InputError(f"the target sensitivity must be in (0, 1], got {target}")
    cases = read_site_cases(manifest_csv)
    manifest = read_manifest(settings.model_dir)
    rows = run_cases(cases, settings, client, threads=threads, on_row=on_row)
    store = CaseStore(settings.db_path)
    try:
        report = build_report(cases, rows, store, manifest, target=target, source=str(manifest_csv))
    finally:
        store.close()
    return report, write_report(Path(out_dir), report)
