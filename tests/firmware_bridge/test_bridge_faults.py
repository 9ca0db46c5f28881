"""Faults: every kind does what it says to the bytes, counts itself, and a seed reproduces a run."""

from __future__ import annotations

import pytest

from firmware_bridge.faults import BitFlipFaults, FaultKind, Faults
from firmware_bridge.frames import FrameReader, encode_frame

WIRE = encode_frame(3, 9, bytes(range(1, 256)) * 4)


def _only(kind: FaultKind, **kw) -> Faults:
    return Faults(1.0, seed=5, kinds=[kind], **kw)


def test_same_seed_same_faults_and_counts() -> None:
    frames = [encode_frame(3, i, bytes([i]) * (50 + i)) for i in range(1, 200)]
    runs = []
    for _ in range(2):
        faults = Faults(0.5, seed=42)
        out = [faults.apply(f, can_disconnect=True) for f in frames]
        runs.append(([(i.data, i.kind, i.disconnect) for i in out], dict(faults.counts)))
    assert runs[0] == runs[1]
    counts = runs[0][1]
    assert set(counts) == {str(k) for k in FaultKind}
    assert all(counts[str(k)] > 0 for k in FaultKind if k != FaultKind.DISCONNECT)
    assert sum(counts.values()) > 60


def test_total_and_rate_zero() -> None:
    faults = Faults(0.0, seed=1)
    assert all(faults.apply(WIRE).data == WIRE for _ in range(100))
    assert faults.total == 0
    faults = Faults(1.0, seed=1)
    for _ in range(50):
        faults.apply(WIRE)
        faults.release()
    assert faults.total == 50 == sum(faults.counts.values())


def test_bit_flip_changes_one_to_three_bits() -> None:
    out = _only(FaultKind.BIT_FLIP).apply(WIRE)
    flipped = sum(bin(a ^ b).count("1") for a, b in zip(out.data, WIRE))
    assert len(out.data) == len(WIRE) and 1 <= flipped <= 3 and out.kind == FaultKind.BIT_FLIP


def test_drop_removes_bytes() -> None:
    out = _only(FaultKind.DROP).apply(WIRE)
    assert len(WIRE) - 8 <= len(out.data) < len(WIRE)


def test_truncate_keeps_a_prefix_without_the_delimiter() -> None:
    out = _only(FaultKind.TRUNCATE).apply(WIRE)
    assert WIRE.startswith(out.data) and 0 < len(out.data) < len(WIRE)


def test_duplicate_sends_the_frame_twice() -> None:
    out = _only(FaultKind.DUPLICATE).apply(WIRE)
    assert out.data == WIRE + WIRE
    frames = FrameReader().feed(out.data)
    assert [f.seq for f in frames] == [9, 9]


def test_reorder_holds_a_frame_until_after_the_next() -> None:
    faults = Faults(1.0, seed=3, kinds=["reorder", "duplicate"], weights={"reorder": 1, "duplicate": 1e-9})
    first, second = encode_frame(3, 1, b"first"), encode_frame(3, 2, b"second")
    held = faults.apply(first)
    assert held.data == b"" and held.kind == FaultKind.REORDER and faults.holding
    # With a frame held, REORDER is not drawn again: the next write goes out ahead of it.
    out = faults.apply(second)
    assert out.data.startswith(second + second) and out.data.endswith(first)
    assert not faults.holding
    assert faults.release() == b""


def test_release_and_discard() -> None:
    faults = _only(FaultKind.REORDER)
    faults.apply(WIRE)
    assert faults.release() == WIRE and not faults.holding
    faults.apply(WIRE)
    faults.discard()
    assert not faults.holding and faults.release() == b""


def test_disconnect_only_where_the_transport_can_be_unplugged() -> None:
    faults = Faults(1.0, seed=8, kinds=[FaultKind.DISCONNECT, FaultKind.BIT_FLIP])
    for _ in range(50):
        assert not faults.apply(WIRE, can_disconnect=False).disconnect
    assert faults.counts["disconnect"] == 0
    out = _only(FaultKind.DISCONNECT).apply(WIRE, can_disconnect=True)
    assert out.disconnect and WIRE.startswith(out.data) and len(out.data) < len(WIRE)
    # Only disconnects allowed and none possible: the write goes through untouched.
    assert _only(FaultKind.DISCONNECT).apply(WIRE).data == WIRE


def test_every_damaged_frame_is_rejected_by_the_receiver() -> None:
    faults = Faults(1.0, seed=11, kinds=[FaultKind.BIT_FLIP, FaultKind.DROP, FaultKind.TRUNCATE])
    for i in range(300):
        wire = encode_frame(3, i, bytes(range(256)) * 3)
        damaged = faults.apply(wire).data
        items = FrameReader().feed(damaged + b"\x00")
        assert not any(getattr(item, "seq", None) == i for item in items), f"frame {i} survived {faults.counts}"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        Faults(1.5)
    with pytest.raises(ValueError, match="at least one"):
        Faults(0.1, kinds=[])
    with pytest.raises(ValueError):
        Faults(0.1, kinds=["lightning"])
    with pytest.raises(ValueError, match="not all 0"):
        Faults(0.1, kinds=["drop"], weights={"drop": 0})


def test_bit_flip_faults_is_a_compatible_faults() -> None:
    faults = BitFlipFaults(1e-3, seed=11)
    assert isinstance(faults, Faults)
    data = bytes(range(256)) * 40
    out = faults.apply(data)
    assert out.data != data and faults.flips > 0
    assert faults.counts["bit_flip"] == faults.frames_damaged == faults.total == 1
