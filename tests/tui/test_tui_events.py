"""The daemon's live events as typed messages: the table from kind to message, and the real app under Pilot
hearing an unknown kind, a malformed event and the early-positive alert over real HTTP."""

import asyncio
import json
import queue
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from textual.widgets import Static

import appliance.tui.app
from appliance.api.app import ApiServer
from appliance.terms import EventKind
from appliance.tui.app import TriageApp
from appliance.tui.client import BadAnswer
from appliance.tui.messages import (LIVE_EVENTS, CalledEarly, FilesWritten, LinkEventReported, QcWarningFound,
                                    ScanResumed, UnknownEvent, live_event)
from appliance.tui.screens import CaseScreen
from tests.tui.conftest import wait_for

# kinds that never reach GET /events: kept in the store's events table only
NOT_LIVE = {EventKind.PURGED, EventKind.PURGE_FAILED, EventKind.SITE_ACCEPTED, EventKind.SITE_RESET}


def test_every_kind_on_the_stream_has_its_message_class():
    assert set(LIVE_EVENTS) <= set(EventKind)
    assert set(EventKind) - set(LIVE_EVENTS) == NOT_LIVE, "a new kind on the stream wants its message class"
    assert len(set(LIVE_EVENTS.values())) == len(LIVE_EVENTS)  # one class per kind


@pytest.mark.parametrize("kind, data, expected", [
    ("link", {"kind": "down", "detail": "port lost"}, LinkEventReported(what="down", detail="port lost")),
    ("resumed", {"case_id": "C", "tiles": 7, "ended": True}, ScanResumed("C", tiles_received=7, ended=True)),
    ("early-positive", {"case_id": "C", "score": 0.9, "tiles": 4}, CalledEarly("C", 0.9, after_tiles=4)),
    ("qc-warning", {"case_id": "C", "code": "out-of-focus", "message": "Rescan"},
     QcWarningFound("C", "out-of-focus", text="Rescan")),
    ("outputs", {"case_id": "C", "files": ["heatmap.png"]}, FilesWritten("C", ["heatmap.png"], rebuilt=False)),
])
def test_an_event_becomes_its_kinds_message_with_the_wire_fields_as_attributes(kind, data, expected):
    assert live_event(kind, {"at": 1765000000.0, **data}) == expected  # "at", on every event, is not kept


def test_an_unknown_kind_is_an_unknown_event_and_a_malformed_one_a_bad_answer():
    assert live_event("from-a-newer-daemon", {"x": 1}) == UnknownEvent("from-a-newer-daemon", {"x": 1})
    with pytest.raises(BadAnswer, match="a 'finished' event without verdict"):
        live_event("finished", {"case_id": "C", "score": 0.5, "early_positive_after_tiles": None, "warnings": []})


def test_the_tui_imports_nothing_of_the_appliance_but_its_terms_status_and_colour_map():
    """Its only way to the daemon is the API: loading it pulls in no store, service or model (``appliance``
    itself is the package's root, loaded for any of its modules; the TUI takes the research-use notice from it;
    appliance.status is the status value it reads the API's JSON into)."""
    code = ("import sys, appliance.tui.app, appliance.tui.screens, appliance.tui.messages\n"
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in ('appliance', 'firmware_bridge')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    others = [m for m in loaded if not m.startswith("appliance.tui")]
    assert sorted(others) == ["appliance", "appliance.colormap", "appliance.status", "appliance.terms"]


class StandInDaemon:
    """The daemon's GET /status and GET /events over real HTTP, with events the real one would not send:
    each /events connection streams what ``send`` puts on it, framed as the API frames it."""

    STATUS = {"version": "0.1.0", "link": {"state": "up", "port": "/dev/scanner"}, "case": None}

    def __init__(self) -> None:
        self.streams: list[queue.Queue] = []
        self.case_reads = 0
        api = FastAPI()
        api.get("/status")(lambda: self.STATUS)
        api.get("/events")(self.events)
        api.get("/cases/{case_id}")(self.case)
        self.server = ApiServer(api, "127.0.0.1", 0)

    async def events(self, request: Request) -> StreamingResponse:
        mine: queue.Queue = queue.Queue()
        self.streams.append(mine)

        async def stream():
            yield ": connected\n\n"
            n = 0
            while not await request.is_disconnected():
                try:
                    kind, data = mine.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.02)
                    continue
                n += 1
                yield f"id: {n}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    def case(self, case_id: str) -> dict:
        self.case_reads += 1
        raise HTTPException(404, f"no case {case_id}")

    def send(self, kind: str, data: dict) -> None:
        """On the latest /events connection."""
        self.streams[-1].put((kind, data))


class ObservedApp(TriageApp):
    """The real app; it also counts the bells it rings and keeps the notices it shows."""

    CSS_PATH = Path(appliance.tui.app.__file__).with_name(TriageApp.CSS_PATH)  # relative would be to this file

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bells = 0
        self.notices: list[str] = []

    def bell(self) -> None:
        self.bells += 1
        super().bell()

    def notify(self, message: str, **kwargs) -> None:
        self.notices.append(message)
        super().notify(message, **kwargs)


@pytest.fixture
def stand_in():
    daemon = StandInDaemon()
    daemon.server.start()
    try:
        yield daemon
    finally:
        daemon.server.stop()


def test_unknown_and_malformed_events_do_not_stop_the_alert_the_bell_or_the_verdict_card(stand_in):
    async def scenario():
        app = ObservedApp(f"http://127.0.0.1:{stand_in.server.port}", None, poll_s=0.1)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.connected and stand_in.streams, what="the event stream")
            stand_in.send("from-a-newer-daemon", {"case_id": "NEW-1", "anything": [1, 2]})
            stand_in.send("case-started", {"case_id": "NEW-1", "tiles_expected": 10})
            stand_in.send("early-positive", {"case_id": "NEW-1", "score": 0.97, "tiles": 4})
            alert = app.live.query_one("#alert", Static)
            await wait_for(pilot, lambda: alert.has_class("-fired") and app.bells, what="the alert and the bell")

            stand_in.send("finished", {"case_id": "NEW-1", "score": 0.97})  # no verdict: unreadable
            await wait_for(pilot, lambda: len(stand_in.streams) == 2, what="the event stream to be reopened")
            stand_in.send("finished", {"case_id": "NEW-1", "verdict": "suspicious", "score": 0.97,
                                       "early_positive_after_tiles": 4, "warnings": []})
            await wait_for(pilot, lambda: isinstance(app.screen, CaseScreen) and stand_in.case_reads,
                           what="the verdict card")
            card, reads = app.screen, stand_in.case_reads
            await wait_for(pilot, lambda: "no case NEW-1" in str(card.query_one("#verdict", Static).content),
                           what="the card to say it found no record")
            stand_in.send("outputs", {"case_id": "NEW-1", "files": ["heatmap.png"]})
            await wait_for(pilot, lambda: stand_in.case_reads > reads, what="the card to reload for its files")
            last = await wait_for(pilot, lambda: str(app.live.query_one("#last", Static).content),
                                  what="the last call on the live screen")
            return str(alert.content), app.bells, app.notices, card.case_id, last, app.is_running

    alert, bells, notices, card_case, last, running = asyncio.run(scenario())
    assert running
    assert "EARLY POSITIVE after 4 tiles: case NEW-1" in alert  # the tile count comes in the event only
    assert bells == 1
    assert notices == ["the event stream sent a 'finished' event without verdict, early_positive_after_tiles, "
                       "warnings"]
    assert card_case == "NEW-1" and "SUSPICIOUS for case NEW-1" in last
