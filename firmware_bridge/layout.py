"""Wire layout descriptors: a message's fields in PROTOCOL.md's type names, and the struct they pack with."""

from __future__ import annotations

import struct

# PROTOCOL.md field type -> struct code. Variable-length types (str8, str16, bytes) only
# ever follow the fixed part, so the fixed part of any layout is a single struct.
FIXED_TYPES = {"u8": "B", "u16": "H", "u32": "I", "i32": "i", "f64": "d"}
VAR_TYPES = frozenset({"str8", "str16", "bytes"})

Wire = tuple[tuple[str, str], ...]  # ((field name, PROTOCOL.md type), ...) in wire order


def fixed_layout(wire: Wire) -> struct.Struct:
    """The little-endian struct of the leading fixed-size fields; one named "reserved" is a pad byte."""
    codes = []
    for name, kind in wire:
        if kind in VAR_TYPES:
            break
        if kind not in FIXED_TYPES:
            raise ValueError(f"field {name!r} has unknown wire type {kind!r}")
        codes.append("x" if name == "reserved" else FIXED_TYPES[kind])
    return struct.Struct("<" + "".join(codes))
