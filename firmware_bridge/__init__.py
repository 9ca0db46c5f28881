"""Serial link between the slide scanner and the bench daemon: frames, messages, host session, emulator."""

from firmware_bridge.emulator import EmulatorResult, ScannerEmulator, TileOnDemand, TileToSend
from firmware_bridge.errors import (
    BridgeError,
    CobsError,
    CrcError,
    DeliveryError,
    FrameError,
    FrameTooLargeError,
    LinkError,
    LinkLostError,
    LinkTimeoutError,
    TileDecodeError,
    TransportError,
    TruncatedFrameError,
    UnknownVersionError,
)
from firmware_bridge.faults import BitFlipFaults, FaultKind, Faults
from firmware_bridge.frames import PROTOCOL_VERSION
from firmware_bridge.host import HostLink
from firmware_bridge.ptycable import PtyCable
from firmware_bridge.sink import CaseInfo, CaseRefused, TileReceived, TileSink
from firmware_bridge.status import LinkEvent, LinkState
from firmware_bridge.transport import FdTransport, open_port

__all__ = [
    "PROTOCOL_VERSION",
    "BitFlipFaults",
    "BridgeError",
    "CaseInfo",
    "CaseRefused",
    "CobsError",
    "CrcError",
    "DeliveryError",
    "EmulatorResult",
    "FaultKind",
    "Faults",
    "FdTransport",
    "FrameError",
    "FrameTooLargeError",
    "HostLink",
    "LinkError",
    "LinkEvent",
    "LinkLostError",
    "LinkState",
    "LinkTimeoutError",
    "PtyCable",
    "ScannerEmulator",
    "TileDecodeError",
    "TileReceived",
    "TileSink",
    "TileOnDemand",
    "TileToSend",
    "TransportError",
    "TruncatedFrameError",
    "UnknownVersionError",
    "open_port",
]
