"""The scanner's send window without a transport: which frames are in flight, which are due again and when
the scanner gives up (PROTOCOL.md 8.3 - 8.5, 8.8). Time is passed in; nothing sleeps."""

from __future__ import annotations

import pytest

from firmware_bridge.errors import DeliveryError, LinkTimeoutError
from firmware_bridge.frames import UNKNOWN_SEQ
from firmware_bridge.messages import Ack, Nack, NackReason
from firmware_bridge.window import CRC_GRACE_SHARE, HelloRetry, SendWindow

ACK_TIMEOUT = 2.0
RETRY_DELAY = 0.05


def _window(size: int = 4, max_retries: int = 2) -> SendWindow:
    return SendWindow(size, ack_timeout=ACK_TIMEOUT, max_retries=max_retries, retry_delay=RETRY_DELAY)


def _send_tiles(window: SendWindow, indices, now: float = 0.0) -> list:
    """Put tiles in flight and record one transmission each, seq = 10 + index, in the given order."""
    sent = []
    for index in indices:
        p = window.add(10 + index, f"tile {index}", f"wire-{index}".encode(), "C1", index)
        assert window.sent(p, now) is False  # a first transmission, not a retransmission
        sent.append(p)
    return sent


def test_a_frame_stays_in_flight_with_its_exact_bytes_until_its_ack() -> None:
    window = _window(size=2)
    a, b = _send_tiles(window, [0, 1], now=5.0)
    assert not window.has_room and len(window) == 2 and 10 in window
    assert a.deadline == 5.0 + ACK_TIMEOUT and a.attempts == 1
    assert window.on_ack(Ack(10, "C1", 0)) is a
    assert 10 not in window and window.has_room and b.wire == b"wire-1"
    assert window.on_ack(Ack(11, "C1", 1)) is b
    assert window.empty


@pytest.mark.parametrize(
    "stray",
    [Ack(99, "C1", 0), Ack(10, "C2", 0), Ack(10, "C1", 1)],
    ids=["unknown seq", "other case", "other tile"],
)
def test_a_stray_ack_changes_nothing(stray: Ack) -> None:
    window = _window()
    (a,) = _send_tiles(window, [0])
    assert window.on_ack(stray) is None
    assert 10 in window and a.attempts == 1


def test_a_resend_is_counted_as_one_and_restarts_the_timer() -> None:
    window = _window()
    (a,) = _send_tiles(window, [0], now=0.0)
    assert window.sent(a, 3.0) is True
    assert a.attempts == 2 and a.deadline == 3.0 + ACK_TIMEOUT
    assert a.first_order < a.last_order


def test_ordering_rule_resends_only_frames_sent_before_the_answered_one() -> None:
    window = _window()
    a, b, c = _send_tiles(window, [0, 1, 2])
    answered = window.on_ack(Ack(12, "C1", 2))  # c's answer overtook a's and b's
    assert window.overtaken(answered) == [a, b]
    # a frame written again after c's first transmission is not overtaken by c
    window.sent(a, 1.0)
    assert window.overtaken(answered) == [b]
    # nor is one a NACK already scheduled for a retry
    window.on_nack(Nack(11, NackReason.STORAGE, "disk busy"), 1.0)
    assert window.overtaken(answered) == []


def test_an_answer_to_the_oldest_frame_overtakes_nothing() -> None:
    window = _window()
    _send_tiles(window, [0, 1, 2])
    answered = window.on_ack(Ack(10, "C1", 0))
    assert window.overtaken(answered) == []


def test_unknown_seq_nack_shortens_every_timer_to_the_crc_grace() -> None:
    window = _window()
    a, b = _send_tiles(window, [0, 1], now=0.0)
    window.sent(b, 1.9)  # b's own timer would run to 3.9
    assert window.on_nack(Nack(UNKNOWN_SEQ, NackReason.CRC), 0.1) is None
    grace = 0.1 + ACK_TIMEOUT * CRC_GRACE_SHARE
    assert a.deadline == pytest.approx(grace) and b.deadline == pytest.approx(grace)
    assert list(window.due(grace - 0.01)) == []
    assert [p for p, _ in window.due(grace)] == [a, b]


def test_crc_grace_leaves_a_scheduled_retry_alone() -> None:
    window = SendWindow(4, ack_timeout=ACK_TIMEOUT, max_retries=2, retry_delay=1.0)  # retry later than the grace
    a, b = _send_tiles(window, [0, 1], now=0.0)
    window.on_nack(Nack(10, NackReason.BUSY, "later"), 0.0)
    window.on_nack(Nack(UNKNOWN_SEQ, NackReason.CRC), 0.0)
    assert a.deadline == 1.0 and b.deadline == ACK_TIMEOUT * CRC_GRACE_SHARE


def test_storage_nack_schedules_a_resend_after_retry_delay_then_gives_up() -> None:
    window = _window(max_retries=2)
    (a,) = _send_tiles(window, [0], now=0.0)
    now = 0.0
    for attempt in (1, 2):
        assert a.attempts == attempt
        assert window.on_nack(Nack(10, NackReason.STORAGE, "disk full"), now) is a
        assert a.retry_scheduled and a.deadline == now + RETRY_DELAY
        assert list(window.due(now + RETRY_DELAY - 0.001)) == []
        assert list(window.due(now + RETRY_DELAY)) == [(a, False)]  # a scheduled resend, not a timeout
        now += RETRY_DELAY
        assert window.sent(a, now) is True
    # the third transmission (1 + max_retries) is NACKed too: the scanner gives up on the case
    with pytest.raises(DeliveryError, match=r"the host refused tile 0 3 times; last: STORAGE: disk full"):
        window.on_nack(Nack(10, NackReason.STORAGE, "disk full"), now)


def test_crc_nack_with_a_known_seq_is_resent_at_once() -> None:
    window = _window()
    (a,) = _send_tiles(window, [0], now=0.0)
    window.on_nack(Nack(10, NackReason.CRC), 0.5)
    assert a.deadline == 0.5 and list(window.due(0.5)) == [(a, False)]


def test_bad_tile_drops_only_that_tile() -> None:
    window = _window()
    a, b = _send_tiles(window, [0, 1])
    p = window.on_nack(Nack(10, NackReason.BAD_TILE, "not 50x50"), 0.1)
    assert p is a and a.rejected and a.last_nack == "BAD_TILE: not 50x50"
    assert 10 not in window and 11 in window and not b.rejected


@pytest.mark.parametrize("reason", [NackReason.UNKNOWN_CASE, NackReason.REFUSED])
def test_unknown_case_or_refused_ends_the_case_even_for_a_tile(reason: NackReason) -> None:
    window = _window()
    _send_tiles(window, [0])
    with pytest.raises(DeliveryError, match=f"the host refused tile 0: {reason.name}: no"):
        window.on_nack(Nack(10, reason, "no"), 0.1)


def test_malformed_case_begin_ends_the_case() -> None:
    window = _window()
    begin = window.add(1, "CASE_BEGIN", b"begin", "C1")
    window.sent(begin, 0.0)
    with pytest.raises(DeliveryError, match="the host refused CASE_BEGIN: MALFORMED: other fields"):
        window.on_nack(Nack(1, NackReason.MALFORMED, "other fields"), 0.1)


def test_timeouts_resend_until_the_retries_run_out_then_report_link_timeout() -> None:
    window = _window(max_retries=1)
    a, b = _send_tiles(window, [0, 1], now=0.0)
    window.sent(b, 1.0)  # b has now used its retry too, a has not
    assert list(window.due(ACK_TIMEOUT - 0.001)) == []
    due = window.due(3.0)
    assert next(due) == (a, True)  # a timed out: it is handed back before b is reported
    window.sent(a, 3.0)
    with pytest.raises(LinkTimeoutError, match=r"no answer for tile 1 \(seq 11\) after 2 transmissions, 2.0 s each"):
        next(due)


def test_nearest_deadline() -> None:
    window = _window()
    assert window.nearest_deadline(default=42.0) == 42.0
    a, b = _send_tiles(window, [0, 1], now=1.0)
    window.sent(a, 2.0)
    assert window.nearest_deadline(default=42.0) == 1.0 + ACK_TIMEOUT


def test_a_cut_parks_unacked_tiles_in_index_order_with_a_fresh_retry_budget() -> None:
    window = _window(size=2)
    begin = window.add(1, "CASE_BEGIN", b"begin", "C1")
    window.sent(begin, 0.0)
    t2, t0 = _send_tiles(window, [2, 0])
    window.on_nack(Nack(12, NackReason.STORAGE), 0.1)
    window.park_tiles()
    assert len(window) == 0 and not window.empty  # CASE_BEGIN is gone, the tiles wait
    assert list(window.parked) == [t0, t2]
    assert t2.attempts == 0 and not t2.retry_scheduled
    back = window.unpark()
    assert back is t0 and 10 in window and back.wire == b"wire-0" and back.seq == 10
    assert window.sent(back, 5.0) is False  # the budget starts afresh on the new connection
    assert window.unpark() is t2 and window.unpark() is None


def test_window_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="window=0 must be at least 1"):
        SendWindow(0, ack_timeout=1.0, max_retries=1, retry_delay=0.1)
    with pytest.raises(ValueError, match="max_retries must be >= 0 and ack_timeout > 0"):
        SendWindow(1, ack_timeout=0.0, max_retries=1, retry_delay=0.1)


# --- HELLO, which no window holds ---------------------------------------------------


def test_first_contact_hello_is_sent_max_retries_plus_one_times_ack_timeout_apart() -> None:
    retry = HelloRetry(resuming=False, ack_timeout=2.0, max_retries=2, reconnect_timeout=30.0, initial=0.05, now=0.0)
    assert [retry.next_wait(t, "pty") for t in (0.0, 2.0, 4.0)] == [2.0, 2.0, 2.0]
    with pytest.raises(LinkTimeoutError, match="did not answer HELLO after 3 attempts 2.0 s apart on pty"):
        retry.next_wait(6.0, "pty")


def test_hello_after_a_replug_starts_fast_doubles_to_ack_timeout_and_gives_up_at_reconnect_timeout() -> None:
    retry = HelloRetry(resuming=True, ack_timeout=0.5, max_retries=0, reconnect_timeout=3.0, initial=0.05, now=10.0)
    waits = [retry.next_wait(10.0 + i * 0.1, "cable") for i in range(7)]
    assert waits == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5, 0.5])  # max_retries does not apply
    with pytest.raises(LinkTimeoutError, match=r"within 3.0 s after the cable was plugged back in \(7 attempts\)"):
        retry.next_wait(13.0, "cable")
