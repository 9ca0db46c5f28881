"""The screens of the terminal UI, one per module: live scan, verdict card, history, sign-off dialog."""

from appliance.tui.screens.case import CaseScreen
from appliance.tui.screens.history import HistoryScreen
from appliance.tui.screens.live import LiveScreen
from appliance.tui.screens.signoff import SignOffDialog

__all__ = ["CaseScreen", "HistoryScreen", "LiveScreen", "SignOffDialog"]
