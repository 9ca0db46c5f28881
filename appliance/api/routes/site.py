"""The site operating point: what threshold decides (GET), accepting a validation report's threshold and
undoing it (POST, token required, audited with the initials given)."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from appliance.api.auth import require_token
from appliance.errors import CaseStateError, InputError, ManifestError, StoreError
from appliance.model.manifest import read_manifest
from appliance.store.points import point_from_report, thresholds_in_force
from appliance.site.report import report_digest
from appliance.terms import INITIALS_PATTERN

router = APIRouter(prefix="/site", tags=["site"])


class Accept(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=INITIALS_PATTERN)
    report: dict  # report.json of `appliance site validate`, as written


class Reset(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=INITIALS_PATTERN)


def _public(point: dict) -> dict:
    """A site point with the report's headline figures (AUC, the recommendation) instead of all of it."""
    report = point.get("report") or {}
    return {k: v for k, v in point.items() if k != "report"} | {
        "auc": report.get("auc"), "recommended": report.get("recommended"), "report_created_at": report.get("created_at")}


@router.get("")
def site(request: Request) -> dict:
    """The threshold in force (the site's, with its date, or the model's) and every site point accepted."""
    store = request.app.state.store
    manifest = _manifest(request)
    point = store.site_point()
    thresholds = thresholds_in_force(point, manifest)
    return {"threshold": {"value": thresholds.threshold, "early_threshold": thresholds.early_threshold,
                          "source": thresholds.source, "site_accepted_at": thresholds.site_accepted_at,
                          "site_report_sha256": thresholds.site_report_sha256, "words": thresholds.words()},
            "model_threshold": manifest.decision.case_threshold,
            "points": [_public(p) for p in store.site_points()]}


def _manifest(request: Request):
    try:
        return read_manifest(request.app.state.settings.model_dir)
    except ManifestError as exc:
        raise HTTPException(status_code=503, detail=f"the model's manifest cannot be read: {exc}") from None


def _changed(request: Request, change) -> dict:
    """Make ``change(store)`` (accept or reset), tell the daemon (it re-judges drift), return the point."""
    try:
        stored = change(request.app.state.store)
    except CaseStateError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except StoreError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    hook = request.app.state.site_changed
    if hook is not None:
        hook()
    return _public(stored)


@router.post("/accept", responses={401: {}, 403: {}, 422: {}, 503: {}})
def accept(body: Accept, request: Request, _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Put the report's recommended threshold in force from the next case on. Refused (422) when the report
    was changed after it was written, is of another model, or recommends nothing."""
    report = body.report
    try:
        digest = report_digest(report)
    except (TypeError, ValueError):  # NaN or a value JSON cannot hold: not something write_report wrote
        digest = None
    if report.get("report_sha256") != digest:
        raise HTTPException(status_code=422, detail="the report's sha256 does not match its content: it was changed "
                                                    "after it was written; run the validation again")
    try:
        point = point_from_report(report, _manifest(request))
    except InputError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return _changed(request, lambda store: store.accept_site_point(point, by=body.initials, via="api"))


@router.post("/reset", responses={401: {}, 403: {}, 409: {}, 503: {}})
def reset(body: Reset, request: Request, _holder: Annotated[str, Depends(require_token)]) -> dict:
    """End the site point in force: the model's threshold decides from the next case on (409 if none)."""
    return _changed(request, lambda store: store.reset_site_point(by=body.initials, via="api"))
