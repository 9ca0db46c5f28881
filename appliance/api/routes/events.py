"""GET /events: Server-Sent Events (case started, progress, early positive, finished, errors, link)."""

import asyncio
import json
import queue

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

router = APIRouter(tags=["events"])

KEEPALIVE_S = 10.0


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def events(request: Request) -> StreamingResponse:
    hub = request.app.state.events
    sub = hub.subscribe()

    async def stream():
        try:
            yield ": connected\n\n"
            idle = 0.0
            while not await request.is_disconnected():
                try:
                    e = sub.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.05)
                    idle += 0.05
                    if idle >= KEEPALIVE_S:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                    continue
                idle = 0.0
                payload = json.dumps({"at": e.at, **e.event.data()}, default=str)
                yield f"id: {e.id}\nevent: {e.event.kind}\ndata: {payload}\n\n"
        finally:
            hub.unsubscribe(sub)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
