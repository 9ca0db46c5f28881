"""The scanner link: an operator's reconnect (token required, audited)."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field

from appliance.api.auth import require_token

router = APIRouter(prefix="/link", tags=["link"])


class Reconnect(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=r"^[A-Za-z][A-Za-z .'-]*$")
    reason: str = Field("", max_length=500)


@router.post("/reconnect", status_code=202, responses={401: {}, 403: {}, 409: {}, 503: {}})
def reconnect(body: Reconnect, request: Request, _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Close and reopen the scanner port now (the open case is kept and resumed); lands in the audit table."""
    do = request.app.state.reconnect
    if do is None:
        raise HTTPException(status_code=503, detail="this API has no scanner link to reconnect")
    try:
        state = do(body.reason or f"asked by {body.initials} over the API")
    except Exception as exc:  # noqa: BLE001 - LinkError and friends: say why, in words
        raise HTTPException(status_code=409, detail=f"cannot reconnect the scanner link: {exc}") from None
    request.app.state.store.audit(body.initials, "link-reconnect", detail={"reason": body.reason, "state": state},
                                  via="api")
    return {"requested": True, "state": state}
