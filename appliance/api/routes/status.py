"""Live status: link state and error counters, the case in flight, the model and the disk."""

from fastapi import APIRouter, Request

from appliance.api.schemas import StatusPublic

router = APIRouter(tags=["status"])


@router.get("/status", response_model=StatusPublic)
def status(request: Request) -> StatusPublic:
    return StatusPublic.model_validate(dict(request.app.state.status().to_dict(),
                                            deliveries=request.app.state.store.delivery_counts()))
