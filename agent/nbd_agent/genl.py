"""Generic netlink framing: netlink headers, the genl header and typed attributes, with no I/O.

Why it exists: the agent talks to exactly one kernel family (``nbd``) plus the generic netlink
controller (to resolve that family's id and multicast group). That needs a few hundred bytes of
framing, declared here as data (attribute spaces with the kernel's names and types) so that
``netlink.py`` stays a thin socket edge and tests can compare messages byte for byte.

What it must not do: open sockets, know anything about NBD, or guess at byte order. Netlink is
host byte order; this module uses the native order (``=``), which is what the kernel expects on
the machine the agent runs on.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# include/uapi/linux/netlink.h
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
NETLINK_GENERIC = 16  # protocol number; Python's socket module does not export it
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11

# include/uapi/linux/genetlink.h
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_GENLMSGHDR = struct.Struct("=BBH")  # cmd, version, reserved
_NLATTR = struct.Struct("=HH")  # len, type


class NlaType(Enum):
    """Attribute payload types, named like the kernel's NLA_* policy types."""

    U8 = "B"
    U16 = "H"
    U32 = "I"
    U64 = "Q"
    S32 = "i"
    STRING = "string"  # NUL-terminated on the wire, str in Python
    NESTED = "nested"  # one nested attribute set, a dict in Python
    NESTED_LIST = "nested_list"  # repeated nested items, a list of dicts in Python


@dataclass(frozen=True)
class Attr:
    """One attribute of a space: its kernel id, the Python name and the payload type.

    For ``NESTED`` the payload is ``space``. For ``NESTED_LIST`` each item is wrapped in an
    attribute of type ``item_type`` holding ``space``; ``item_type=None`` means the kernel numbers
    the items 1, 2, 3... (as the genl controller does for multicast groups).
    """

    id: int
    name: str
    type: NlaType
    space: AttrSpace | None = None
    item_type: int | None = None


@dataclass
class AttrSpace:
    """A set of attributes, addressable by kernel id and by Python name."""

    name: str
    attrs: list[Attr]
    by_id: dict[int, Attr] = field(init=False)
    by_name: dict[str, Attr] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {a.id: a for a in self.attrs}
        self.by_name = {a.name: a for a in self.attrs}


class GenlDecodeError(ValueError):
    """The bytes are not a well-formed netlink message (truncated or lying about lengths)."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


def pack_attr(attr_type: int, payload: bytes) -> bytes:
    """One netlink attribute: header, payload, zero padding to 4 bytes."""
    length = _NLATTR.size + len(payload)
    return _NLATTR.pack(length, attr_type) + payload + b"\0" * (_align4(length) - length)


def encode_attrs(space: AttrSpace, values: Mapping[str, Any]) -> bytes:
    """Encode ``values`` (Python names) in the order the space declares them; None is omitted."""
    unknown = set(values) - set(space.by_name)
    if unknown:
        raise KeyError(f"{space.name} has no attribute {sorted(unknown)}")
    out = bytearray()
    for attr in space.attrs:
        value = values.get(attr.name)
        if value is None:
            continue
        out += pack_attr(attr.id, _encode_payload(attr, value))
    return bytes(out)


def _encode_payload(attr: Attr, value: Any) -> bytes:
    if attr.type is NlaType.STRING:
        return str(value).encode() + b"\0"
    if attr.type is NlaType.NESTED:
        assert attr.space is not None
        return encode_attrs(attr.space, value)
    if attr.type is NlaType.NESTED_LIST:
        assert attr.space is not None
        items = bytearray()
        for i, item in enumerate(value, start=1):
            item_type = attr.item_type if attr.item_type is not None else i
            items += pack_attr(item_type, encode_attrs(attr.space, item))
        return bytes(items)
    return struct.pack("=" + attr.type.value, value)


def iter_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (type without flag bits, payload) for each attribute in ``data``."""
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, attr_type = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            raise GenlDecodeError(f"attribute length {length} at offset {offset} is out of range")
        yield attr_type & NLA_TYPE_MASK, data[offset + _NLATTR.size : offset + length]
        offset += _align4(length)


def decode_attrs(space: AttrSpace, data: bytes) -> dict[str, Any]:
    """Decode attributes into a dict by Python name; ids the space does not know are skipped
    (newer kernels add attributes, and an old agent must keep working)."""
    out: dict[str, Any] = {}
    for attr_type, payload in iter_attrs(data):
        attr = space.by_id.get(attr_type)
        if attr is None:
            continue
        out[attr.name] = _decode_payload(attr, payload)
    return out


def _decode_payload(attr: Attr, payload: bytes) -> Any:
    if attr.type is NlaType.STRING:
        return payload.split(b"\0", 1)[0].decode(errors="replace")
    if attr.type is NlaType.NESTED:
        assert attr.space is not None
        return decode_attrs(attr.space, payload)
    if attr.type is NlaType.NESTED_LIST:
        assert attr.space is not None
        return [
            decode_attrs(attr.space, item)
            for item_type, item in iter_attrs(payload)
            if attr.item_type is None or item_type == attr.item_type
        ]
    fmt = "=" + attr.type.value
    if len(payload) < struct.calcsize(fmt):
        raise GenlDecodeError(f"{attr.name}: {len(payload)} bytes is too short for {attr.type}")
    return struct.unpack_from(fmt, payload)[0]


def pack_genl(
    family_id: int, cmd: int, version: int, attrs: bytes, *, seq: int, flags: int
) -> bytes:
    """A complete request: nlmsghdr + genlmsghdr + attributes. The port id is 0 (the kernel
    fills in the sender's)."""
    body = _GENLMSGHDR.pack(cmd, version, 0) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), family_id, flags, seq, 0) + body


@dataclass(frozen=True)
class NlMsg:
    """One netlink message as received: header fields and the payload after the header."""

    type: int
    flags: int
    seq: int
    pid: int
    payload: bytes

    def error_code(self) -> int:
        """For NLMSG_ERROR: 0 for an ACK, else a negative errno."""
        if len(self.payload) < 4:
            raise GenlDecodeError("NLMSG_ERROR without an error code")
        return int(struct.unpack_from("=i", self.payload)[0])

    def genl(self) -> tuple[int, int, bytes]:
        """(cmd, version, attribute bytes) of a generic netlink message."""
        if len(self.payload) < _GENLMSGHDR.size:
            raise GenlDecodeError("message too short for a genl header")
        cmd, version, _ = _GENLMSGHDR.unpack_from(self.payload)
        return cmd, version, self.payload[_GENLMSGHDR.size :]


def parse_messages(data: bytes) -> list[NlMsg]:
    """Split a datagram into netlink messages."""
    out = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise GenlDecodeError(f"message length {length} at offset {offset} is out of range")
        out.append(
            NlMsg(msg_type, flags, seq, pid, data[offset + _NLMSGHDR.size : offset + length])
        )
        offset += _align4(length)
    return out


# The generic netlink controller: resolves a family name to its id and multicast groups.
CTRL_MCAST_GROUP = AttrSpace(
    "ctrl_mcast_group",
    [Attr(1, "name", NlaType.STRING), Attr(2, "id", NlaType.U32)],
)
CTRL_ATTRS = AttrSpace(
    "ctrl",
    [
        Attr(1, "family_id", NlaType.U16),
        Attr(2, "family_name", NlaType.STRING),
        Attr(3, "version", NlaType.U32),
        Attr(4, "hdrsize", NlaType.U32),
        Attr(5, "maxattr", NlaType.U32),
        Attr(7, "mcast_groups", NlaType.NESTED_LIST, CTRL_MCAST_GROUP),
    ],
)
