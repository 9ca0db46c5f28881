"""A stand-in for the daemon around an API under test (appliance.service.controls.DaemonControls): a status,
readiness reasons, a link to reconnect and a latency histogram the test chooses, so the API's own handling of
each is what the test exercises. Tests of the daemon itself use the real one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from appliance import __version__
from appliance.service.events import EventHub
from appliance.status import DaemonStatus


@dataclass
class DaemonStandIn:
    live: DaemonStatus | dict = field(default_factory=lambda: DaemonStatus(version=__version__))
    reasons: list[str] = field(default_factory=list)  # not ready while it holds any
    reconnect: Callable[[str], str] | None = None
    latency: object = None
    events: EventHub = field(default_factory=EventHub)
    site_changes: int = 0

    def status(self) -> DaemonStatus:
        return self.live if isinstance(self.live, DaemonStatus) else DaemonStatus.from_dict(self.live)

    def not_ready(self) -> list[str]:
        return list(self.reasons)

    def reconnect_link(self, why: str) -> str:
        if self.reconnect is None:
            raise RuntimeError("no scanner link in this test")
        return self.reconnect(why)

    def site_changed(self) -> None:
        self.site_changes += 1
