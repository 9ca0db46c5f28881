"""Progress lines a technician can read, on a terminal (one updating line) or in a log (every ~10%)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last_step = -1
        self._last_time = 0.0
        self._started = time.monotonic()

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if self.total:
            pct = 100.0 * done / self.total
            text = f"{self.label}: {done}/{self.total} ({pct:.0f}%)"
            step = int(pct // 10)
        else:
            text = f"{self.label}: {done}"
            step = done // 50
        if extra:
            text += f"  {extra}"
        if self.tty:
            if now - self._last_time >= 0.1 or (self.total and done >= self.total):
                self.stream.write("\r\033[K" + text)
                self.stream.flush()
                self._last_time = now
        elif step != self._last_step:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_step = step

    def close(self, summary: str = "") -> None:
        elapsed = time.monotonic() - self._started
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"{self.label}: done in {elapsed:.1f} s{'  ' + summary if summary else ''}\n")
        self.stream.flush()
