"""Protocol v1 code tables: message types, roles, capability bits, NACK reasons, ERROR and dtype codes.

The numbers every message carries, as PROTOCOL.md's tables list them (7.1 - 7.7, 8.3), and
what follows from them: which capability a tile encoding needs and which NACKs are retried.
The message classes (messages.py) use them as field types; test_bridge_protocol_doc.py checks
each table against the document.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from firmware_bridge.pixels import TileEncoding

__all__ = [
    "DTYPE_CODES",
    "ENCODING_CAPABILITY",
    "EVERY_CAPABILITY",
    "RETRYABLE_NACKS",
    "Capability",
    "ErrorCode",
    "MsgType",
    "NackReason",
    "Role",
]


class MsgType(IntEnum):
    """Frame header byte 1."""

    HELLO = 0x01
    CASE_BEGIN = 0x02
    TILE = 0x03
    CASE_END = 0x04
    ACK = 0x05
    NACK = 0x06
    ERROR = 0x07
    HEARTBEAT = 0x08  # only to a peer whose HELLO has Capability.HEARTBEAT


class Role(IntEnum):
    SCANNER = 1
    HOST = 2


class Capability(IntFlag):
    """HELLO capability bits. RAW tiles are always accepted and have no bit."""

    NONE = 0
    ZLIB = 1 << 0
    PNG = 1 << 1
    HEARTBEAT = 1 << 2  # understands HEARTBEAT (0x08); a host with it answers every one
    RESUME = 1 << 3  # a host with it resumes an open case on a repeated identical CASE_BEGIN
    JPEG = 1 << 4
    ACCESSION = 1 << 5  # understands CASE_BEGIN's accession field (revision 1.3)


# What the reference scanner and host both announce: every feature this revision defines.
EVERY_CAPABILITY = Capability(sum(Capability))


ENCODING_CAPABILITY = {
    TileEncoding.RAW: Capability.NONE,
    TileEncoding.ZLIB: Capability.ZLIB,
    TileEncoding.PNG: Capability.PNG,
    TileEncoding.JPEG: Capability.JPEG,
}


class NackReason(IntEnum):
    CRC = 1  # frame damaged in transit (any framing error); retransmit
    MALFORMED = 2  # frame intact but its payload does not parse; do not retransmit as is
    STORAGE = 3  # the host could not store it durably; retransmit after a short delay
    UNKNOWN_CASE = 4  # no open case with that case_id; send CASE_BEGIN first
    BAD_TILE = 5  # tile pixels do not decode or do not fit the case; do not retransmit
    TOO_LARGE = 6  # frame above the host's max payload; do not retransmit
    BUSY = 7  # host temporarily cannot accept; retransmit after a delay (not sent by v1 hosts)
    REFUSED = 8  # the host will not take this case (e.g. too little free disk space); stop the case


RETRYABLE_NACKS = frozenset({NackReason.CRC, NackReason.STORAGE, NackReason.BUSY})


class ErrorCode(IntEnum):
    UNSUPPORTED_VERSION = 1
    PROTOCOL = 2  # a message that makes no sense in this role or state
    INTERNAL = 3


DTYPE_CODES = {"uint8": 1}  # CASE_BEGIN dtype name -> wire code
