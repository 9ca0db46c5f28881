"""`appliance tui`: the technician's screen, a client of the status API.

Two workers keep it live: one polls GET /status every second, one listens to GET /events and posts each
event as its kind's message (appliance/tui/messages.py). When the daemon cannot be reached both keep retrying,
and a banner on every screen says so until it is back.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import replace
from pathlib import Path

from textual.app import App
from textual.binding import Binding
from textual import work

from appliance.terms import RESEARCH_USE_NOTICE
from appliance.tui.client import ApiClient, ApiUnavailable, BadAnswer
from appliance.tui.messages import (CalledEarly, ConnectionChanged, EventsLost, StatusUpdated, UnknownEvent,
                                    VerdictGiven, live_event)
from appliance.tui.screens import CaseScreen, HistoryScreen, LiveScreen
from appliance.tui.widgets import Banner

RETRY_MAX_S = 2.0


class TriageApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "Bench triage appliance"
    SUB_TITLE = RESEARCH_USE_NOTICE
    BINDINGS = [Binding("l", "live", "Live"), Binding("h", "history", "History"), Binding("q", "quit", "Quit")]

    def __init__(self, api_url: str, token_path: Path | None = None, *, poll_s: float = 1.0,
                 open_verdicts: bool = True, verify: ssl.SSLContext | bool = True) -> None:
        super().__init__()
        self.client = ApiClient(api_url, token_path, verify=verify)
        self.poll_s = poll_s
        self.open_verdicts = open_verdicts  # push the verdict card when a case is called
        self.connected: bool | None = None
        self.down_reason: str | None = None
        self.live = LiveScreen()

    def on_mount(self) -> None:
        self.push_screen(self.live)
        self.poll()
        self.listen()

    async def on_unmount(self) -> None:
        await self.client.close()

    # -- workers --------------------------------------------------------------------------------------
    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        delay = self.poll_s
        while True:
            try:
                status = await self.client.status()
            except ApiUnavailable as exc:
                self.post_message(ConnectionChanged(False, str(exc)))
                delay = min(delay * 2, RETRY_MAX_S)
            except BadAnswer as exc:  # shown on the banner, and retried: never fatal to the screen
                self.post_message(ConnectionChanged(False, f"unexpected answer from the appliance: {exc}"))
                delay = min(delay * 2, RETRY_MAX_S)
            else:
                self.post_message(ConnectionChanged(True))
                self.post_message(StatusUpdated(status))
                delay = self.poll_s
            await asyncio.sleep(delay)

    @work(exclusive=True, group="events")
    async def listen(self) -> None:
        while True:
            try:
                async for kind, data in self.client.events():
                    # read once; a copy each for the app and every screen in the stack: whoever cares handles it
                    message = live_event(kind, data)
                    for node in (self, *self.screen_stack):
                        node.post_message(replace(message))
            except ApiUnavailable:
                pass  # the poller owns the banner; just come back
            except BadAnswer as exc:  # a malformed event: said on screen and in the log, then the stream is reopened
                self.log.warning(str(exc))
                self.notify(str(exc), severity="warning")
            await asyncio.sleep(RETRY_MAX_S / 2)

    # -- messages -------------------------------------------------------------------------------------
    def on_connection_changed(self, msg: ConnectionChanged) -> None:
        if msg.up == self.connected and (msg.up or msg.detail == self.down_reason):
            return
        self.connected = msg.up
        self.down_reason = None if msg.up else msg.detail
        for screen in self.screen_stack:
            for banner in screen.query(Banner):
                banner.show(self.down_reason)

    def on_status_updated(self, msg: StatusUpdated) -> None:
        # a poll can land before the live screen is composed or after the app has begun to take it down:
        # then there is nothing to draw on, and the next poll draws it
        if not self.live.is_mounted or not self.live.query("#link"):
            return
        self.live.show_status(msg.status)

    def on_called_early(self, _event: CalledEarly) -> None:
        self.bell()

    def on_verdict_given(self, event: VerdictGiven) -> None:
        if self.open_verdicts and self.screen is self.live:
            self.push_screen(CaseScreen(self.client, event.case_id))

    def on_events_lost(self, _event: EventsLost) -> None:
        self.log.warning("the daemon dropped live events this UI was too slow to take; the status poll catches up")

    def on_unknown_event(self, event: UnknownEvent) -> None:
        self.log.warning(f"skipped an event of a kind this terminal UI does not know: {event.kind!r}")

    # -- actions --------------------------------------------------------------------------------------
    def action_live(self) -> None:
        while self.screen is not self.live and len(self.screen_stack) > 1:
            self.pop_screen()

    def action_history(self) -> None:
        if not isinstance(self.screen, HistoryScreen):
            self.push_screen(HistoryScreen(self.client))
