"""The site operating point: a threshold a lab accepted from its own validation report, and the thresholds in
force for the next case (the site's when one is accepted for this very model, else the model's own)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.errors import InputError
from appliance.pipeline.decision import ThresholdInForce

# what of a report the store keeps beside the point (the case list stays in the report's own folder)
KEPT = ("created_at", "model", "target_sensitivity", "counts", "auc", "shipped", "recommended", "cannot_call",
        "drift_reference", "report_sha256")


def point_from_report(report: dict, manifest) -> dict:
    """The site_points row a verified report gives (``site.report.read_report`` checked its sha256). Refuses a
    report of another model, or one that recommends nothing, with the reason."""
    missing = [k for k in ("model", "recommended", "counts", "target_sensitivity", "report_sha256") if k not in report]
    if missing or not isinstance(report.get("model"), dict) or not isinstance(report.get("counts"), dict):
        raise InputError(f"not a site validation report (appliance site validate): no {', '.join(missing) or 'model'}")
    model_sha = report["model"].get("sha256")
    if model_sha != manifest.digest:
        raise InputError(f"the report validated model {str(model_sha)[:12]}..., but the appliance runs "
                         f"{manifest.name} {manifest.version} ({manifest.digest[:12]}...): validate this model first")
    rec = report.get("recommended")
    if not rec:
        raise InputError(f"the report recommends no threshold: {report.get('recommendation_note') or 'too few cases'}")
    counts = report["counts"]
    try:
        return {"model_sha256": model_sha, "threshold": float(rec["threshold"]),
                "target_sensitivity": float(report["target_sensitivity"]),
                "malignant": int(counts["callable_malignant"]), "benign": int(counts["callable_benign"]),
                "report_sha256": str(report["report_sha256"]), "report": {k: report.get(k) for k in KEPT}}
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"not a site validation report (appliance site validate): {exc!r}") from None


def thresholds_in_force(point: dict | None, manifest) -> ThresholdInForce:
    """The site's threshold when ``point`` (the store's site point in force) was validated on this model; the
    model's own otherwise (a new model needs its own validation)."""
    if point is None or point.get("model_sha256") != manifest.digest:
        return ThresholdInForce.of_model(manifest.decision)
    return ThresholdInForce.of_site(manifest.decision, float(point["threshold"]), point["accepted_at"],
                                    point["report_sha256"])


def read_point(db_path: Path) -> dict | None:
    """The site point in force in the case store at ``db_path``, read-only (None when there is no store yet,
    or none is in force): for `appliance triage`, which must not become a second writer."""
    path = Path(db_path)
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error:
        return None
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("select * from site_points where ended_at is null order by id desc limit 1").fetchone()
        return dict(row) if row is not None else None
    except sqlite3.OperationalError:  # a store from before migration 0007: no site points
        return None
    finally:
        conn.close()
