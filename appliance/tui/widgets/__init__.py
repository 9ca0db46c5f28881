"""Widgets of the terminal UI, one per module: the daemon-down banner and pictures drawn with half blocks."""

from appliance.tui.widgets.banner import Banner, chrome
from appliance.tui.widgets.picture import Picture

__all__ = ["Banner", "Picture", "chrome"]
