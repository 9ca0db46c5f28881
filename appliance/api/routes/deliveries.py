"""Messages to the lab's systems: an operator queues a failed one again (token required, audited)."""

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from appliance.api.answers import store_errors_as_http
from appliance.api.auth import require_token
from appliance.terms import CASE_ID_PATTERN, INITIALS_PATTERN

router = APIRouter(prefix="/deliveries", tags=["deliveries"])

DeliveryId = Annotated[str, Path(pattern=CASE_ID_PATTERN, description="A delivery's id, from GET /cases/{id}")]


class Retry(BaseModel):
    initials: str = Field(min_length=1, max_length=16, pattern=INITIALS_PATTERN)


@router.post("/{delivery_id}/retry", responses={401: {}, 403: {}, 404: {}, 409: {}, 503: {}})
def retry(delivery_id: DeliveryId, body: Retry, request: Request,
          _holder: Annotated[str, Depends(require_token)]) -> dict:
    """Send a failed message again, the same message with the same id (after the receiver is fixed)."""
    with store_errors_as_http():
        return request.app.state.store.retry_delivery(delivery_id, by=body.initials, via="api")
