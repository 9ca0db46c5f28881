"""The screens of the terminal UI, one per module: live scan, verdict card, history, sign-off dialog."""

from .case import CaseScreen
from .history import HistoryScreen
from .live import LiveScreen
from .signoff import SignOffDialog

__all__ = ["CaseScreen", "HistoryScreen", "LiveScreen", "SignOffDialog"]
