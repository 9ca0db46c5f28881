"""Cases: the history of triaged cases, one case's record with the files it has, and those files."""

import logging
import os
from datetime import datetime, timezone
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from appliance.store.database import CaseStore
from appliance.api.answers import store_errors_as_http
from appliance.api.auth import require_token
from appliance.api.schemas import CaseFileLink, CaseList, CasePublic
from appliance.terms import CASE_ID, CASE_ID_PATTERN, INITIALS_PATTERN, CaseFile, Verdict

log = logging.getLogger(__name__)

CaseId = Annotated[str, Path(pattern=CASE_ID_PATTERN, description="case id")]
# The names as a set: on Python 3.11 `str in CaseFile` raises TypeError, while the members hash as their strings.
FILE_NAMES = frozenset(CaseFile)

router = APIRouter(prefix="/cases", tags=["cases"])


def get_store(request: Request) -> CaseStore:
    return request.app.state.store


StoreDep = Annotated[CaseStore, Depends(get_store)]


@router.get("", response_model=CaseList)
def list_cases(
    request: Request,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    verdict: Annotated[Verdict | None, Query()] = None,
    since: Annotated[datetime | None, Query(description="received at or after (ISO-8601)")] = None,
    until: Annotated[datetime | None, Query(description="received before (ISO-8601)")] = None,
    signed_off: Annotated[bool | None, Query()] = None,
) -> CaseList:
    rows = store.list_cases(limit=limit, offset=offset, verdict=verdict, since=_iso(since), until=_iso(until),
                            signed_off=signed_off)
    deliveries = store.deliveries_of([r["id"] for r in rows])  # one query for the page, not one per case
    return CaseList(cases=[_public(r, request, deliveries[r["id"]]) for r in rows], limit=limit, offset=offset)


@router.get("/{case_id}", response_model=CasePublic)
def get_case(case_id: CaseId, request: Request, store: StoreDep) -> CasePublic:
    row = store.get_case(case_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    return _public(row, request, store.deliveries_of([case_id])[case_id])


@router.get("/{case_id}/{name}", response_class=FileResponse,
            responses={200: {"content": {t: {} for t in sorted({f.media_type for f in CaseFile})}}, 404: {}})
def case_file(case_id: CaseId, name: Annotated[str, Path(description=", ".join(CaseFile))],
              request: Request, store: StoreDep) -> FileResponse:
    """One of the case's output files, streamed with its media type."""
    # name stays a plain str (not the enum) so an unknown name is a 404 that lists the known ones, not a 422
    if name not in FILE_NAMES:
        raise HTTPException(status_code=404, detail=f"no such case file {name!r}; one of {', '.join(CaseFile)}")
    if store.get_case(case_id) is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    path = request.app.state.settings.cases_dir / case_id / name
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"case {case_id} has no {name} (not written yet, or removed "
                                                    f"by retention)")
    return FileResponse(path, media_type=CaseFile(name).media_type, filename=f"{case_id}-{name}")


class SignOff(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=INITIALS_PATTERN)
    comment: str = Field("", max_length=2000)


@router.post("/{case_id}/signoff", responses={401: {}, 403: {}, 404: {}, 409: {}, 503: {}})
def sign_off(case_id: CaseId, body: SignOff, store: StoreDep,
             _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Sign a finished case off (token required); lands in the audit table."""
    with store_errors_as_http():
        return store.sign_off(case_id, by=body.initials, comment=body.comment, via="api")


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


def _public(row: dict, request: Request, deliveries: list[dict]) -> CasePublic:
    """A case row as clients see it, with the files its folder holds right now and its deliveries (without
    their payloads)."""
    row = dict(row)
    row["reasons"] = row.get("reasons") or []
    row["warnings"] = row.get("warnings") or []
    row["files"] = case_files(request.app.state.settings.cases_dir, row["id"], request)
    row["deliveries"] = deliveries
    return CasePublic.model_validate(row)


def case_files(cases_dir: FsPath, case_id: str, request: Request) -> list[CaseFileLink]:
    """The case's files that exist, in CaseFile order. Existing means complete: the pipeline writes each to a
    hidden temporary name and renames it into place (appliance/pipeline/outputs.py), and those temporary
    names are not CaseFile names, so they are never listed."""
    if not CASE_ID.fullmatch(case_id):  # never build a path from an id the scanner could not have sent
        return []
    found: dict[str, int] = {}
    try:
        # one directory read per case, not one stat per possible file: GET /cases lists up to 500 cases
        with os.scandir(cases_dir / case_id) as entries:
            for entry in entries:
                if entry.name in FILE_NAMES and entry.is_file():
                    found[entry.name] = entry.stat().st_size
    except FileNotFoundError:
        return []  # nothing written yet, or all removed by retention
    except OSError as exc:  # an unreadable folder must not make the case record itself fail
        log.warning("cannot list the files of case %s: %s", case_id, exc)
        return []
    return [CaseFileLink(name=f, url=str(request.app.url_path_for("case_file", case_id=case_id, name=f)),
                         media_type=f.media_type, bytes=found[f])
            for f in CaseFile if f in found]
