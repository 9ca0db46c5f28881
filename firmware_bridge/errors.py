"""Named errors for the scanner link, in one hierarchy so an edge can catch BridgeError."""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error raised by firmware_bridge."""


# --- framing: a chunk between two 0x00 delimiters could not be turned into a frame ---


class FrameError(BridgeError):
    """A received chunk is not a valid frame; the receiver drops it and resynchronises."""


class CobsError(FrameError):
    """The chunk is not valid COBS (a code byte points past the end, or a stray 0x00)."""


class CrcError(FrameError):
    """The CRC-32 trailer does not match the header and payload: damaged in transit."""


class FrameLengthError(FrameError):
    """The payload length in the header disagrees with the bytes actually present."""


class TruncatedFrameError(FrameLengthError):
    """Fewer bytes than a header + CRC, or fewer payload bytes than the header declares."""


class FrameTooLargeError(FrameError):
    """A frame (or a run of bytes without a delimiter) exceeds the agreed maximum size."""


class UnknownVersionError(FrameError):
    """The first byte is not the v1 magic/version byte 0xB1."""


# --- messages and tiles: the frame was fine, its payload is not ---


class MessageDecodeError(BridgeError):
    """A frame payload does not match the layout of its message type."""


class TileDecodeError(BridgeError):
    """A TILE payload cannot be turned into uint8 pixels of the declared size."""


class TileEncodeError(BridgeError, ValueError):
    """Pixels handed to the scanner side are not a uint8 HxWx3 array."""


# --- the device boundary ---


class TransportError(BridgeError):
    """Opening, reading or writing the serial port / file descriptor failed."""


# --- the session ---


class LinkError(BridgeError):
    """The protocol session could not do its job."""


class LinkTimeoutError(LinkError):
    """The peer did not answer a frame after every allowed retransmission."""


class LinkLostError(LinkError):
    """The transport failed underneath a running session."""


class DeliveryError(LinkError):
    """The host refused a frame for a reason that retransmitting cannot fix."""


class NegotiationError(LinkError):
    """The HELLO exchange found the two ends incompatible."""


class RemoteError(LinkError):
    """The peer sent an ERROR message."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"peer reported error {code}: {text}")
        self.code = code
        self.text = text
