"""Table-driven payload codec: one encoder and one decoder for every message, driven by its WIRE table.

A message class (messages.py) declares its fields in wire order with their PROTOCOL.md type
names (WIRE) and subclasses WireMessage; encode() and decode() here do the rest. The few
places where an attribute is not its wire field as is are declared next to the table:
FIELD_ATTRS (wire name -> attribute name), TO_WIRE / FROM_WIRE (value converters),
APPENDABLE (a later protocol version may append fields, so trailing bytes are not an error) and
OPTIONAL (trailing fields a later document revision added: sent only when non-empty, so a message
that does not use them has the bytes an older peer expects, and read as empty when absent).
check_uint and check_str are the field checks the message classes run against their wire types.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from firmware_bridge.errors import MessageDecodeError
from firmware_bridge.layout import VAR_TYPES, Wire, fixed_layout

__all__ = ["STR16_MAX", "STR8_MAX", "Cursor", "WireMessage", "check_str", "check_uint"]

STR8_MAX = 0xFF
STR16_MAX = 0xFFFF

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_LENGTH_PREFIX = {"str8": _U8, "str16": _U16}
_EMPTY = {"str8": "", "str16": "", "bytes": b""}  # an absent optional field's value

M = TypeVar("M", bound="WireMessage")


class Cursor:
    """Bounds-checked reader over one payload; every failure names the message and field."""

    def __init__(self, payload: bytes, what: str) -> None:
        self.data = bytes(payload)
        self.pos = 0
        self.what = what

    def unpack(self, layout: struct.Struct, fields: str) -> tuple[Any, ...]:
        if len(self.data) - self.pos < layout.size:
            raise MessageDecodeError(
                f"{self.what}: {len(self.data) - self.pos} bytes left at offset {self.pos}, "
                f"need {layout.size} for {fields}"
            )
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def take(self, n: int, name: str) -> bytes:
        if len(self.data) - self.pos < n:
            raise MessageDecodeError(
                f"{self.what}: {name} needs {n} bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def text(self, name: str, *, wide: bool = False) -> str:
        (n,) = self.unpack(_U16 if wide else _U8, f"length of {name}")
        raw = self.take(n, name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageDecodeError(f"{self.what}: {name} is not valid UTF-8 ({exc})") from exc

    @property
    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MessageDecodeError(
                f"{self.what}: {len(self.data) - self.pos} unexpected bytes after offset {self.pos}"
            )


def check_uint(name: str, value: int, bits: int) -> None:
    """Raise ValueError unless value fits an unsigned wire field of `bits` bits (a message's field check)."""
    if not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value!r} must be an integer in 0..{(1 << bits) - 1}")


def check_str(name: str, value: str, max_bytes: int, *, allow_empty: bool = True) -> None:
    """Raise ValueError unless value is a str whose UTF-8 form fits max_bytes (str8: STR8_MAX, str16: STR16_MAX)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value:
        raise ValueError(f"{name} must not be empty")
    size = len(value.encode("utf-8"))
    if size > max_bytes:
        raise ValueError(f"{name} is {size} bytes in UTF-8, the limit is {max_bytes}")


def _pack_var(kind: str, value: Any) -> bytes:
    if kind == "bytes":
        return bytes(value)
    raw = value.encode("utf-8")
    return _LENGTH_PREFIX[kind].pack(len(raw)) + raw


def _fixed_fields_label(what: str, fixed: list[str], has_var: bool) -> str:
    # Word for word what the hand-written decoders said: these texts reach the scanner
    # in NACK details and the technician's logs, so the refactoring must not change them.
    if len(fixed) <= 2:
        return " and ".join(fixed)
    return f"the fixed {what} fields" if has_var else f"the {what} fields"


def _check_optional(cls_name: str, wire: Wire, optional: frozenset[str]) -> None:
    """Optional fields must be variable-length and the last in WIRE: absence can only be told at the end."""
    tail = [name for name, _ in wire[len(wire) - len(optional):]] if optional else []
    if set(tail) != optional:
        raise TypeError(f"{cls_name}: OPTIONAL {sorted(optional)} must be the last fields of WIRE")
    fixed = [name for name, kind in wire if name in optional and kind not in VAR_TYPES]
    if fixed:
        raise TypeError(f"{cls_name}: optional fields {fixed} must be variable-length")


class WireMessage:
    """Mixin for the frozen message dataclasses: encode() and decode() from the class's WIRE table.

    Subclasses set MSG_TYPE and WIRE; LAYOUT (the struct of the fixed-size leading fields)
    is derived from WIRE when the class is created.
    """

    MSG_TYPE: ClassVar[Any]  # a messages.MsgType; typed loosely to keep this module below messages.py
    WIRE: ClassVar[Wire]
    LAYOUT: ClassVar[struct.Struct]
    FIELD_ATTRS: ClassVar[Mapping[str, str]] = {}
    TO_WIRE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    FROM_WIRE: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    APPENDABLE: ClassVar[bool] = False
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()  # names of trailing variable fields that may be absent
    # Derived once per class from WIRE, so encode and decode only walk precomputed lists.
    _FIXED: ClassVar[tuple[str, ...]]
    _VAR: ClassVar[tuple[tuple[str, str], ...]]
    _FIXED_LABEL: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wire = cls.__dict__.get("WIRE")
        if wire is None:
            raise TypeError(f"{cls.__name__} must declare its WIRE table")
        split = next((i for i, (_, kind) in enumerate(wire) if kind in VAR_TYPES), len(wire))
        if any(kind not in VAR_TYPES for _, kind in wire[split:]):
            raise TypeError(f"{cls.__name__}: a fixed-size field follows a variable one in WIRE")
        _check_optional(cls.__name__, wire, cls.OPTIONAL)
        cls.LAYOUT = fixed_layout(wire)
        cls._FIXED = tuple(name for name, _ in wire[:split] if name != "reserved")
        cls._VAR = tuple(wire[split:])
        cls._FIXED_LABEL = _fixed_fields_label(cls.MSG_TYPE.name, list(cls._FIXED), bool(cls._VAR))

    def _wire_value(self, name: str) -> Any:
        value = getattr(self, self.FIELD_ATTRS.get(name, name))
        convert = self.TO_WIRE.get(name)
        return value if convert is None else convert(value)

    def encode(self) -> bytes:
        """The frame payload: the fixed fields packed little-endian, then the variable ones, less any empty
        optional fields at the end (the bytes a peer that predates them expects)."""
        parts = [self.LAYOUT.pack(*(self._wire_value(name) for name in self._FIXED))]
        var = [(name, kind, self._wire_value(name)) for name, kind in self._VAR]
        while var and var[-1][0] in self.OPTIONAL and not var[-1][2]:
            var.pop()
        parts.extend(_pack_var(kind, value) for _, kind, value in var)
        return b"".join(parts)

    @classmethod
    def decode(cls: type[M], payload: bytes) -> M:
        """Parse a frame payload; raises MessageDecodeError naming the message and the field."""
        what = cls.MSG_TYPE.name
        cur = Cursor(payload, what)
        values = dict(zip(cls._FIXED, cur.unpack(cls.LAYOUT, cls._FIXED_LABEL)))
        for name, kind in cls._VAR:
            if name in cls.OPTIONAL and cur.at_end:
                values[name] = _EMPTY[kind]
            else:
                values[name] = cur.rest() if kind == "bytes" else cur.text(name, wide=kind == "str16")
        if not cls.APPENDABLE:
            cur.end()
        for name, convert in cls.FROM_WIRE.items():
            values[name] = convert(values[name])
        kwargs = {cls.FIELD_ATTRS.get(name, name): value for name, value in values.items()}
        try:
            return cls(**kwargs)
        except ValueError as exc:
            # The constructor's field checks are the decoder's too (an enum code out of range, say).
            raise MessageDecodeError(f"{what}: {exc}") from exc
