"""The banner across the top of every screen while the daemon cannot be reached, and the chrome that holds it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Header, Static


class Banner(Static):
    """Shown across the top of every screen while the daemon cannot be reached."""

    def show(self, message: str | None) -> None:
        self.set_class(message is not None, "-shown")
        self.update(f"⚠ DAEMON NOT REACHABLE: {message}. Retrying by itself; the screen updates when it is back."
                    if message else "")


def chrome() -> ComposeResult:
    """The top of every screen: the header and the daemon-down banner."""
    yield Header(show_clock=False)
    yield Banner(id="banner")
