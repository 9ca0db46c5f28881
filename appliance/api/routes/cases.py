"""Cases: the history of triaged cases and one case's summary."""

from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from appliance.errors import StoreError
from appliance.store.database import CaseStore
from appliance.api.auth import require_token
from appliance.api.schemas import CaseList, CasePublic

CaseId = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="case id")]
OUTPUT_TYPES = {"overlay.png": "image/png", "regions.geojson": "application/geo+json",
                "case.ome.tif": "image/tiff", "heatmap.ome.tif": "image/tiff", "summary.json": "application/json",
                "thumbnail.png": "image/png", "heatmap.png": "image/png", "top_patches.png": "image/png"}

router = APIRouter(prefix="/cases", tags=["cases"])


def get_store(request: Request) -> CaseStore:
    return request.app.state.store


StoreDep = Annotated[CaseStore, Depends(get_store)]


@router.get("", response_model=CaseList)
def list_cases(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    verdict: Annotated[Literal["suspicious", "benign-appearing", "cannot-call"] | None, Query()] = None,
    since: Annotated[datetime | None, Query(description="received at or after (ISO-8601)")] = None,
    until: Annotated[datetime | None, Query(description="received before (ISO-8601)")] = None,
    signed_off: Annotated[bool | None, Query()] = None,
) -> CaseList:
    rows = store.list_cases(limit=limit, offset=offset, verdict=verdict, since=_iso(since), until=_iso(until),
                            signed_off=signed_off)
    return CaseList(cases=[CasePublic.model_validate(_clean(r)) for r in rows], limit=limit, offset=offset)


@router.get("/{case_id}", response_model=CasePublic)
def get_case(case_id: CaseId, store: StoreDep) -> CasePublic:
    row = store.get_case(case_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    return CasePublic.model_validate(_clean(row))


@router.get("/{case_id}/{name}", response_class=FileResponse,
            responses={200: {"content": {t: {} for t in set(OUTPUT_TYPES.values())}}, 404: {}})
def case_file(case_id: CaseId, name: Annotated[str, Path(description=", ".join(OUTPUT_TYPES))],
              request: Request, store: StoreDep) -> FileResponse:
    """One of the case's output files, streamed with its media type."""
    if name not in OUTPUT_TYPES:
        raise HTTPException(status_code=404, detail=f"no such case file {name!r}; one of {', '.join(OUTPUT_TYPES)}")
    if store.get_case(case_id) is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    path = request.app.state.settings.cases_dir / case_id / name
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"case {case_id} has no {name} (not written yet, or removed "
                                                    f"by retention)")
    return FileResponse(path, media_type=OUTPUT_TYPES[name], filename=f"{case_id}-{name}")


class SignOff(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z][A-Za-z .'-]*$")
    comment: str = Field("", max_length=2000)


@router.post("/{case_id}/signoff", responses={401: {}, 403: {}, 404: {}, 409: {}})
def sign_off(case_id: CaseId, body: SignOff, store: StoreDep,
             _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Sign a finished case off (token required); lands in the audit table."""
    try:
        return store.sign_off(case_id, by=body.initials, comment=body.comment, via="api")
    except StoreError as exc:
        raise HTTPException(status_code=404 if "no case" in str(exc) else 409, detail=str(exc)) from None


@router.post("/{case_id}/comment", responses={401: {}, 403: {}, 404: {}})
def comment(case_id: CaseId, body: SignOff, store: StoreDep,
            _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Add a comment to a case (token required); lands in the audit table."""
    if store.get_case(case_id) is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    store.audit(body.initials, "comment", case_id=case_id, detail={"comment": body.comment}, via="api")
    return {"case_id": case_id, "comment": body.comment, "by": body.initials}


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _clean(row: dict) -> dict:
    row = dict(row)
    row["reasons"] = row.get("reasons") or []
    row["warnings"] = row.get("warnings") or []
    return row
