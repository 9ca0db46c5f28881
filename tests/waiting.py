"""The one way the tests wait for something to happen (instead of fixed sleeps and local polling loops).

`wait_until` polls a predicate and returns its first truthy value; when the timeout passes first it fails the
test with an AssertionError that says what was waited for, so a caller never needs to assert on its result.
(Textual's Pilot tests wait with the async `tests.tui.conftest.wait_for`, which lets the app run meanwhile.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "the condition",
               detail: Callable[[], object] | None = None) -> T:
    """Call ``predicate()`` every ``interval`` s until it returns something truthy, and return that.

    If ``timeout`` s pass first, raise AssertionError("timed out after <timeout> s waiting for <what>"), with
    ``detail()`` appended when given (the last log lines, a captured pane, ...). An exception raised by the
    predicate is not caught: a predicate may assert that waiting still makes sense (the process is alive)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            message = f"timed out after {timeout:g} s waiting for {what}"
            if detail is not None:
                message += f"\n{detail()}"
            raise AssertionError(message)
        time.sleep(min(interval, left))
