"""The tests' shared wait helper (tests/waiting.py)."""

import threading

import pytest

from tests.waiting import wait_until


def test_returns_the_predicates_first_truthy_value_as_soon_as_it_holds():
    values = iter([0, None, "", "ready", "later"])
    calls = []

    def predicate():
        calls.append(1)
        return next(values)

    assert wait_until(predicate, timeout=10, interval=0.001, what="a value") == "ready"
    assert len(calls) == 4  # not called again once it held


def test_waits_for_another_thread_without_a_fixed_sleep():
    done = threading.Event()
    threading.Timer(0.05, done.set).start()
    assert wait_until(done.is_set, timeout=30, what="the timer") is True


def test_fails_naming_what_was_awaited_and_the_detail():
    calls = []
    with pytest.raises(AssertionError, match=r"^timed out after 0.2 s waiting for the scanner port\nlast: 3$"):
        wait_until(lambda: calls.append(1), timeout=0.2, interval=0.01, what="the scanner port",
                   detail=lambda: f"last: {3}")
    assert len(calls) >= 2  # polled more than once before giving up (how often depends on the machine)


def test_a_predicates_own_failure_is_not_swallowed():
    calls = []

    def predicate():
        calls.append(1)
        raise AssertionError("the scanner thread died")

    with pytest.raises(AssertionError, match="the scanner thread died"):
        wait_until(predicate, timeout=60, what="tiles")
    assert calls == [1]  # it failed on the first call, without polling on
