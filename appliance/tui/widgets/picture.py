"""A picture drawn with half blocks by a function of the space it has, redrawn when the terminal is resized."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual.widget import Widget


class Picture(Widget):
    """Draws whatever ``draw(width, lines)`` returns, redrawn to fit when the terminal is resized."""

    def __init__(self, draw: Callable[[int, int], Text] | None = None, *, empty: str = "", **kw) -> None:
        super().__init__(**kw)
        self._draw = draw
        self._empty = empty

    def set_draw(self, draw: Callable[[int, int], Text] | None, empty: str = "") -> None:
        self._draw, self._empty = draw, empty
        self.refresh(layout=True)

    def render(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        if self._draw is None or width < 2 or height < 1:
            return Text(self._empty, style="italic")
        return self._draw(width, height)

    def get_content_height(self, container, viewport, width: int) -> int:
        """For ``height: auto``: as many lines as the picture drawn at this width."""
        if self._draw is None or width < 2:
            return 1
        return len(self._draw(width, viewport.height).split())
