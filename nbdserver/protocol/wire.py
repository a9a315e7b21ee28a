"""Byte layouts of every NBD message, as precompiled ``struct.Struct`` objects and tiny helpers.

Why: the server, the client handshake and the tests must agree on each byte, and the hot path
(request headers, reply headers) must cost one ``unpack_from``/``pack`` call. Everything is
big-endian ("network byte order") as doc/proto.md requires.

What this module must not do: no I/O, no state, no policy. It does not decide whether a message
is allowed (that is ``handshake`` and ``transmission``); it only turns fields into bytes and back.
Decoders raise ``ProtocolError`` for bytes that can never be valid (bad magic, short payloads).
"""

from __future__ import annotations

import struct
from typing import Final

from nbdserver.protocol.constants import (
    IHAVEOPT,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_MAX_STRING,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    Info,
)


class ProtocolError(Exception):
    """The peer sent bytes that violate the protocol; the connection cannot continue."""


# --- Handshake -------------------------------------------------------------------------------
GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags: 18 bytes
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length: 16 bytes
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length: 20
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
EXPORT_NAME_ZEROES: Final = bytes(124)
INFO_EXPORT: Final = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
U64: Final = struct.Struct(">Q")

# --- Transmission ----------------------------------------------------------------------------
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length: 28
EXTENDED_REQUEST: Final = struct.Struct(">IHHQQQ")  # same with a 64-bit length: 32
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie: 16
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length: 20
EXTENDED_REPLY: Final = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, len: 32
# Structured/extended chunk headers fused with the fixed part of their payload, so one pack()
# produces everything but the data itself (the edge sends header and data with writev).
STRUCTURED_OFFSET_DATA: Final = struct.Struct(">IHHQIQ")  # header + offset: 28
EXTENDED_OFFSET_DATA: Final = struct.Struct(">IHHQQQQ")  # header + offset: 40
STRUCTURED_OFFSET_HOLE: Final = struct.Struct(">IHHQIQI")  # header + offset + hole size: 32
EXTENDED_OFFSET_HOLE: Final = struct.Struct(">IHHQQQQI")  # header + offset + hole size: 44
BLOCK_DESCRIPTOR: Final = struct.Struct(">II")  # extent length, status flags
BLOCK_DESCRIPTOR_EXT: Final = struct.Struct(">QQ")
BLOCK_STATUS_EXT_HEAD: Final = struct.Struct(">II")  # context id, descriptor count
ERROR_HEAD: Final = struct.Struct(">IH")  # error, message length


# --- Handshake encoders/decoders ------------------------------------------------------------
def pack_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def unpack_greeting(data: bytes) -> int:
    """Return the handshake flags of an 18-byte fixed-newstyle greeting."""
    magic, opt, flags = GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise ProtocolError(f"bad greeting magic {magic:#x}")
    if opt != IHAVEOPT:
        raise ProtocolError(f"not a newstyle server (magic {opt:#x})")
    return int(flags)


def pack_option(option: int, payload: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(payload)) + payload


def pack_option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(NBD_OPT_REPLY_MAGIC, option, reply, len(payload)) + payload


def unpack_option_reply_header(data: bytes) -> tuple[int, int, int]:
    """Return (option, reply type, payload length) of a 20-byte option reply header."""
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(data)
    if magic != NBD_OPT_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply, length


def pack_string(text: str) -> bytes:
    """A length-prefixed (32-bit) UTF-8 string, as in NBD_OPT_GO and meta context requests."""
    raw = text.encode()
    return U32.pack(len(raw)) + raw


def check_string(raw: bytes) -> str:
    """Decode a wire string, enforcing the spec's rules (UTF-8, no NUL, at most 4096 bytes)."""
    if len(raw) > NBD_MAX_STRING:
        raise ValueError(f"string of {len(raw)} bytes exceeds {NBD_MAX_STRING}")
    if b"\0" in raw:
        raise ValueError("string contains NUL")
    return raw.decode("utf-8")  # UnicodeDecodeError is a ValueError


def pack_info_go(name: str, info_requests: tuple[int, ...] = ()) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    reqs = b"".join(U16.pack(i) for i in info_requests)
    return pack_string(name) + U16.pack(len(info_requests)) + reqs


def pack_meta_context_request(name: str, queries: tuple[str, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    body = b"".join(pack_string(q) for q in queries)
    return pack_string(name) + U32.pack(len(queries)) + body


def pack_rep_server(name: str, description: str = "") -> bytes:
    """Payload of NBD_REP_SERVER: 32-bit name length, name, then free text (description)."""
    return pack_string(name) + description.encode()


def unpack_rep_server(payload: bytes) -> tuple[str, str]:
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_SERVER shorter than 4 bytes")
    (n,) = U32.unpack_from(payload)
    if n > len(payload) - 4:
        raise ProtocolError("NBD_REP_SERVER name length exceeds the reply")
    return payload[4 : 4 + n].decode(errors="replace"), payload[4 + n :].decode(errors="replace")


def pack_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.NBD_INFO_EXPORT, size, flags)


def pack_info_string(info: int, text: str) -> bytes:
    return U16.pack(info) + text.encode()


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum)


def pack_rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def unpack_rep_meta_context(payload: bytes) -> tuple[int, str]:
    if len(payload) < 4:
        raise ProtocolError("NBD_REP_META_CONTEXT shorter than 4 bytes")
    (cid,) = U32.unpack_from(payload)
    return cid, payload[4:].decode(errors="replace")


# --- Transmission: requests ------------------------------------------------------------------
def pack_request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def pack_extended_request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return EXTENDED_REQUEST.pack(NBD_EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# --- Transmission: replies -------------------------------------------------------------------
def pack_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def pack_structured_header(flags: int, rtype: int, cookie: int, length: int) -> bytes:
    return STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def error_payload(error: int, message: str = "") -> bytes:
    """Payload of NBD_REPLY_TYPE_ERROR (add a 64-bit offset for ERROR_OFFSET)."""
    # Cut at 4096 bytes without splitting a UTF-8 sequence (the spec wants valid strings).
    raw = message.encode()[:NBD_MAX_STRING].decode(errors="ignore").encode()
    return ERROR_HEAD.pack(error, len(raw)) + raw


def block_status_payload(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """Payload of NBD_REPLY_TYPE_BLOCK_STATUS: context id then (length, flags) descriptors."""
    pack = BLOCK_DESCRIPTOR.pack
    return U32.pack(context_id) + b"".join([pack(n, f) for n, f in extents])


def block_status_ext_payload(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """Payload of NBD_REPLY_TYPE_BLOCK_STATUS_EXT: id, count, then 64-bit descriptors."""
    pack = BLOCK_DESCRIPTOR_EXT.pack
    head = BLOCK_STATUS_EXT_HEAD.pack(context_id, len(extents))
    return head + b"".join([pack(n, f) for n, f in extents])


def unpack_simple_or_chunk_header(
    buf: bytes | bytearray | memoryview, pos: int = 0
) -> tuple[int, int, int, int]:
    """Client side: decode a 16-byte simple reply or 20-byte structured header prefix.

    Returns (magic, a, b, cookie) where for a simple reply (a, b) = (error, 0) and for a
    structured chunk (a, b) = (flags, type); the caller reads 4 more bytes of length for a
    structured chunk. Kept here so the userspace client and the tests share one decoder.
    """
    magic, word, cookie = SIMPLE_REPLY.unpack_from(buf, pos)
    if magic == NBD_SIMPLE_REPLY_MAGIC:
        return magic, word, 0, cookie
    if magic == NBD_STRUCTURED_REPLY_MAGIC:
        return magic, word >> 16, word & 0xFFFF, cookie
    raise ProtocolError(f"bad reply magic {magic:#x}")
