"""What the layers above the daemon (the API, and through it the terminal UI and the command line) may read
from it and ask of it: ``DaemonControls``, which appliance.service.daemon.Daemon is."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from appliance.status import DaemonStatus

if TYPE_CHECKING:
    from appliance.model.latency import LatencyHistogram
    from appliance.service.events import EventHub

__all__ = ["DaemonControls"]


class DaemonControls(Protocol):
    """The daemon as the API sees it: its status and readiness, its live events, its link and latency."""

    events: EventHub

    def status(self) -> DaemonStatus:
        """The live status."""

    def not_ready(self) -> list[str]:
        """Why the daemon is not ready (empty when it is)."""

    def reconnect_link(self, why: str) -> str:
        """Ask the scanner link to reopen its port; returns the link's state."""

    def site_changed(self) -> None:
        """A site operating point was accepted or reset: re-judge drift against the new reference."""

    @property
    def latency(self) -> LatencyHistogram | None:
        """The engine's inference latency histogram (None without a working engine)."""
