"""Every custom message of the terminal UI, in one place."""

from __future__ import annotations

from textual.message import Message


class StatusUpdated(Message):
    """A fresh GET /status."""

    def __init__(self, status: dict) -> None:
        super().__init__()
        self.status = status


class DaemonEvent(Message):
    """One event from GET /events (case-started, early-positive, finished, ...)."""

    def __init__(self, kind: str, data: dict) -> None:
        super().__init__()
        self.kind = kind
        self.data = data


class ConnectionChanged(Message):
    """The daemon became reachable, or stopped being reachable (with why)."""

    def __init__(self, up: bool, detail: str = "") -> None:
        super().__init__()
        self.up = up
        self.detail = detail
