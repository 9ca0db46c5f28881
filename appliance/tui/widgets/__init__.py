"""Widgets of the terminal UI, one per module: the daemon-down banner and pictures drawn with half blocks."""

from .banner import Banner, chrome
from .picture import Picture

__all__ = ["Banner", "Picture", "chrome"]
