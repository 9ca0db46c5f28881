"""Liveness: cheap, touches nothing but the process."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from appliance import __version__
from appliance.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/ready", responses={503: {"description": "not ready, with the reasons"}})
def ready(request: Request) -> JSONResponse:
    """Ready once the model is loaded and the scanner port is open; 503 with the reasons until then."""
    reasons = request.app.state.ready()
    if reasons:
        return JSONResponse(status_code=503, content={"ready": False, "reasons": reasons})
    return JSONResponse(content={"ready": True, "reasons": []})
