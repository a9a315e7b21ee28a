"""Transmission: every validation rule returns the errno the spec asks for, and every reply
encoder produces the exact bytes of doc/proto.md (literal magics, not the module's constants)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from nbdserver.protocol import wire
from nbdserver.protocol.events import ExportInfo, Negotiated
from nbdserver.protocol.transmission import ReplyEncoder, RequestValidator

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS, RESIZE = range(9)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, F_PAYLOAD_LEN = (1 << i for i in range(6))
EPERM, EINVAL, ENOSPC, EOVERFLOW, ESHUTDOWN = 1, 22, 28, 75, 108
T_RO, T_FLUSH, T_FUA, T_TRIM, T_WZ, T_DF, T_CACHE, T_FASTZ = (
    1 << 1, 1 << 2, 1 << 3, 1 << 5, 1 << 6, 1 << 7, 1 << 10, 1 << 11,
)  # fmt: skip
ALL = 1 | T_FLUSH | T_FUA | T_TRIM | T_WZ | T_CACHE | T_FASTZ
SIZE = 1 << 20


def negotiated(
    flags: int = ALL,
    structured: bool = False,
    extended: bool = False,
    meta: bool = False,
    min_block: int = 1,
    max_payload: int = 65536,
) -> Negotiated:
    if structured or extended:
        flags |= T_DF
    export = ExportInfo("d", SIZE, flags, "", min_block, 4096, max_payload)
    return Negotiated(
        "d", export, flags, structured or extended, extended,
        ((1, "base:allocation"),) if meta else (), True, False, True,
    )  # fmt: skip


def v(**kw: object) -> RequestValidator:
    return RequestValidator(negotiated(**kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "flags", "cmd", "offset", "length", "errno"),
    [
        # valid requests of every command
        ({}, 0, READ, 0, 4096, 0),
        ({}, F_FUA, WRITE, SIZE - 512, 512, 0),
        ({}, 0, DISC, 0, 0, 0),
        ({}, 0, FLUSH, 0, 0, 0),
        ({}, F_FUA, TRIM, 0, SIZE, 0),
        ({}, 0, CACHE, 0, SIZE, 0),
        ({}, F_NO_HOLE | F_FAST_ZERO | F_FUA, WZ, 0, SIZE, 0),
        ({"structured": True, "meta": True}, F_REQ_ONE, BS, 0, SIZE, 0),
        ({"structured": True}, F_DF, READ, 0, 4096, 0),
        ({"extended": True}, F_PAYLOAD_LEN, WRITE, 0, 4096, 0),
        # unknown commands
        ({}, 0, RESIZE, 0, 0, EINVAL),
        ({}, 0, 0xFFFF, 0, 0, EINVAL),
        # read-only export: every write-type command is EPERM, reads are fine
        ({"flags": 1 | T_RO | T_FLUSH}, 0, WRITE, 0, 512, EPERM),
        ({"flags": 1 | T_RO | T_FLUSH}, 0, TRIM, 0, 512, EPERM),
        ({"flags": 1 | T_RO | T_FLUSH}, 0, WZ, 0, 512, EPERM),
        ({"flags": 1 | T_RO | T_FLUSH}, 0, READ, 0, 512, 0),
        # commands that were not advertised or negotiated
        ({"flags": 1}, 0, FLUSH, 0, 0, EINVAL),
        ({"flags": 1}, 0, TRIM, 0, 512, EINVAL),
        ({"flags": 1}, 0, WZ, 0, 512, EINVAL),
        ({"flags": 1}, 0, CACHE, 0, 512, EINVAL),
        ({}, 0, BS, 0, 512, EINVAL),  # no structured replies, no meta context
        ({"structured": True}, 0, BS, 0, 512, EINVAL),  # no meta context selected
        # flags: unknown, wrong command, not negotiated
        ({}, 1 << 9, READ, 0, 512, EINVAL),
        ({"flags": 1 | T_WZ}, F_FUA, WRITE, 0, 512, EINVAL),  # FUA not advertised
        ({}, F_DF, READ, 0, 512, EINVAL),  # DF without structured replies
        ({"structured": True}, F_DF, WRITE, 0, 512, EINVAL),  # DF is only for READ
        ({}, F_NO_HOLE, WRITE, 0, 512, EINVAL),
        ({}, F_FAST_ZERO, WRITE, 0, 512, EINVAL),
        ({"flags": 1 | T_WZ}, F_FAST_ZERO, WZ, 0, 512, EINVAL),  # FAST_ZERO not advertised
        ({}, F_REQ_ONE, READ, 0, 512, EINVAL),
        ({}, F_PAYLOAD_LEN, WRITE, 0, 512, EINVAL),  # PAYLOAD_LEN needs extended headers
        ({"extended": True}, 0, WRITE, 0, 512, EINVAL),  # extended WRITE needs PAYLOAD_LEN
        ({"extended": True}, F_PAYLOAD_LEN, READ, 0, 512, EINVAL),
        ({"extended": True, "meta": True}, F_PAYLOAD_LEN, BS, 0, 512, EINVAL),
        # FLUSH must have zero offset and length
        ({}, 0, FLUSH, 512, 0, EINVAL),
        ({}, 0, FLUSH, 0, 512, EINVAL),
        # zero lengths and alignment to the minimum block size
        ({}, 0, READ, 0, 0, EINVAL),
        ({}, 0, TRIM, 0, 0, EINVAL),
        ({"min_block": 512}, 0, READ, 256, 512, EINVAL),
        ({"min_block": 512}, 0, WRITE, 0, 100, EINVAL),
        ({"min_block": 512}, 0, READ, 1024, 512, 0),
        # payload limits
        ({}, 0, READ, 0, 65537, EINVAL),
        ({"structured": True}, 0, READ, 0, 65537, EOVERFLOW),
        ({}, 0, WRITE, 0, 65537, EINVAL),
        ({}, 0, TRIM, 0, 65537, 0),  # effect lengths may exceed the payload limit
        # ranges: ENOSPC for writes and zeroes, EINVAL for the rest
        ({}, 0, WRITE, SIZE, 512, ENOSPC),
        ({}, 0, WZ, SIZE - 512, 1024, ENOSPC),
        ({}, 0, READ, SIZE - 511, 512, EINVAL),
        ({}, 0, TRIM, SIZE, 1, EINVAL),
        ({}, 0, CACHE, 1 << 63, 1 << 20, EINVAL),
        ({"structured": True, "meta": True}, 0, BS, 0, SIZE + 1, EINVAL),
        ({"extended": True}, 0, TRIM, 1, (1 << 64) - 1, EINVAL),  # would overflow 64 bits
    ],
)
def test_validation_rule(
    kw: dict[str, object], flags: int, cmd: int, offset: int, length: int, errno: int
) -> None:
    assert v(**kw).validate(flags, cmd, offset, length) == errno


def test_soft_shutdown_answers_eshutdown_but_lets_disc_through() -> None:
    val = v()
    val.shutting_down = True
    assert val.validate(0, READ, 0, 512) == ESHUTDOWN
    assert val.validate(0, DISC, 0, 0) == 0


def test_payload_length_compact_counts_only_write() -> None:
    val = v()
    assert val.payload_length(0, WRITE, 512) == 512
    assert val.payload_length(0, READ, 512) == 0
    assert val.payload_length(0, TRIM, 1 << 31) == 0


def test_payload_length_extended_follows_the_payload_len_flag() -> None:
    val = v(extended=True)
    assert val.payload_length(F_PAYLOAD_LEN, READ, 100) == 100  # skipped, then EINVAL
    assert val.payload_length(0, WRITE, 100) == 0
    assert val.header_size == 32


def test_payload_too_large_to_skip_is_fatal() -> None:
    val = v()
    assert val.payload_length(0, WRITE, 1 << 25) == 1 << 25
    with pytest.raises(wire.ProtocolError):
        val.payload_length(0, WRITE, (1 << 25) + 1)


def test_request_headers_decode_at_an_offset_without_copies() -> None:
    one = struct.pack(">IHHQQI", 0x25609513, 1, WRITE, 7, 4096, 512)
    two = struct.pack(">IHHQQI", 0x25609513, 0, READ, 8, 0, 4096)
    buf = bytearray(b"xx" + one + two)
    val = v()
    assert val.header_size == 28
    assert val.unpack(buf, 2) == (1, WRITE, 7, 4096, 512)
    assert val.unpack(memoryview(buf), 30) == (0, READ, 8, 0, 4096)


def test_extended_request_headers_decode() -> None:
    raw = struct.pack(">IHHQQQ", 0x21E41C71, F_PAYLOAD_LEN, WRITE, 9, 1 << 40, 1 << 33)
    assert v(extended=True).unpack(raw, 0) == (F_PAYLOAD_LEN, WRITE, 9, 1 << 40, 1 << 33)


@pytest.mark.parametrize("extended", [False, True])
def test_bad_request_magic_is_a_protocol_error(extended: bool) -> None:
    with pytest.raises(wire.ProtocolError):
        v(extended=extended).unpack(bytes(32), 0)
    with pytest.raises(wire.ProtocolError):  # the other framing's magic is wrong too
        magic = 0x25609513 if extended else 0x21E41C71
        v(extended=extended).unpack(struct.pack(">I", magic) + bytes(28), 0)


# --- reply encoders --------------------------------------------------------------------------
SIMPLE = bytes.fromhex("67446698")
STRUCT = bytes.fromhex("668e33ef")
EXT = bytes.fromhex("6e8a278c")
C = 0x0102030405060708


@dataclass
class Ext:
    length: int
    flags: int


def test_simple_replies() -> None:
    enc = ReplyEncoder(False, False)
    assert enc.ok(C) == SIMPLE + bytes(4) + struct.pack(">Q", C)
    assert enc.read(C, 4096, 512) == SIMPLE + bytes(4) + struct.pack(">Q", C)
    assert enc.error(C, EINVAL, 0, "ignored") == SIMPLE + struct.pack(">IQ", 22, C)
    with pytest.raises(RuntimeError):
        enc.hole_chunk(C, 0, 0, 512, True)


def test_structured_replies() -> None:
    enc = ReplyEncoder(True, False)
    assert enc.ok(C) == SIMPLE + bytes(4) + struct.pack(">Q", C)  # allowed without payload
    assert enc.read(C, 4096, 512) == STRUCT + struct.pack(">HHQIQ", 1, 1, C, 520, 4096)
    assert enc.data_chunk(C, 0, 8192, 100, False) == STRUCT + struct.pack(
        ">HHQIQ", 0, 1, C, 108, 8192
    )
    assert enc.hole_chunk(C, 0, 512, 1024, True) == STRUCT + struct.pack(
        ">HHQIQI", 1, 2, C, 12, 512, 1024
    )
    assert enc.done(C) == STRUCT + struct.pack(">HHQI", 1, 0, C, 0)
    assert (
        enc.error(C, EINVAL, 0, "bad")
        == STRUCT + struct.pack(">HHQIIH", 1, 0x8001, C, 9, 22, 3) + b"bad"
    )
    assert enc.error_offset(C, 0, 5, 4096, "io") == (
        STRUCT + struct.pack(">HHQIIH", 1, 0x8002, C, 16, 5, 2) + b"io" + struct.pack(">Q", 4096)
    )
    chunk = enc.block_status(C, 0, 8192, 1, [Ext(4096, 0), Ext(4096, 3)], False)
    assert chunk == STRUCT + struct.pack(">HHQIIIIII", 1, 5, C, 20, 1, 4096, 0, 4096, 3)


def test_extended_replies_echo_the_request_offset() -> None:
    enc = ReplyEncoder(False, True)
    assert enc.ok(C, 4096) == EXT + struct.pack(">HHQQQ", 1, 0, C, 4096, 0)
    assert enc.read(C, 4096, 512) == EXT + struct.pack(">HHQQQQ", 1, 1, C, 4096, 520, 4096)
    assert enc.hole_chunk(C, 0, 512, 1024, False) == EXT + struct.pack(
        ">HHQQQQI", 0, 2, C, 0, 12, 512, 1024
    )
    assert enc.error(C, EPERM, 512, "") == EXT + struct.pack(">HHQQQIH", 1, 0x8001, C, 512, 6, 1, 0)
    chunk = enc.block_status(C, 0, 1 << 33, 1, [Ext(1 << 33, 3)], False)
    assert chunk == EXT + struct.pack(">HHQQQIIQQ", 1, 6, C, 0, 24, 1, 1, 1 << 33, 3)


def test_block_status_fitting_rules() -> None:
    enc = ReplyEncoder(True, False, min_block=512)
    # REQ_ONE: exactly one descriptor, not longer than the request
    assert enc.fit_extents([Ext(8192, 3), Ext(512, 0)], 1024, True) == [(1024, 3)]
    # stop once the request is covered (the last one may go beyond)
    assert enc.fit_extents([Ext(512, 0), Ext(8192, 3), Ext(512, 0)], 1024, False) == [
        (512, 0),
        (8192, 3),
    ]
    # 32-bit lengths without extended headers, rounded down to the minimum block
    assert enc.fit_extents([Ext(1 << 40, 3)], 1 << 30, False) == [(0xFFFFFE00, 3)]
    # zero-length extents are dropped; nothing left still yields one safe descriptor
    assert enc.fit_extents([Ext(0, 3)], 4096, False) == [(4096, 0)]


@pytest.mark.parametrize(
    "kw",
    [
        {"size": 1 << 64},
        {"flags": 1 << 16},
        {"minimum_block": 3},
        {"minimum_block": 1 << 17, "preferred_block": 1 << 17, "maximum_payload": 1 << 20},
        {"preferred_block": 6000},
        {"maximum_payload": 1024},
        {"maximum_payload": 1 << 32},
        {"name": "n" * 4097},
    ],
)
def test_export_info_refuses_values_the_wire_cannot_carry(kw: dict[str, object]) -> None:
    fields: dict[str, object] = {"name": "d", "size": SIZE}
    fields.update(kw)
    with pytest.raises(ValueError):
        ExportInfo(**fields)  # type: ignore[arg-type]
