"""Cases: the history of triaged cases and one case's summary."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from ...store import CaseStore
from ..schemas import CaseList, CasePublic

router = APIRouter(prefix="/cases", tags=["cases"])


def get_store(request: Request) -> CaseStore:
    return request.app.state.store


StoreDep = Annotated[CaseStore, Depends(get_store)]


@router.get("", response_model=CaseList)
def list_cases(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> CaseList:
    rows = store.list_cases(limit=limit, offset=offset)
    return CaseList(cases=[CasePublic.model_validate(_clean(r)) for r in rows], limit=limit, offset=offset)


@router.get("/{case_id}", response_model=CasePublic)
def get_case(case_id: str, store: StoreDep) -> CasePublic:
    row = store.get_case(case_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"no case with id {case_id!r}")
    return CasePublic.model_validate(_clean(row))


def _clean(row: dict) -> dict:
    row = dict(row)
    row["reasons"] = row.get("reasons") or []
    return row
