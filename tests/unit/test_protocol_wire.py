"""Wire codecs: exact bytes of the fixed layouts, and refusal of bytes that can never be valid."""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol import wire


def test_struct_sizes_match_the_spec() -> None:
    sizes = {
        wire.GREETING: 18, wire.OPTION_HEADER: 16, wire.OPTION_REPLY_HEADER: 20,
        wire.EXPORT_NAME_REPLY: 10, wire.INFO_EXPORT: 12, wire.INFO_BLOCK_SIZE: 14,
        wire.REQUEST: 28, wire.EXTENDED_REQUEST: 32, wire.SIMPLE_REPLY: 16,
        wire.STRUCTURED_REPLY: 20, wire.EXTENDED_REPLY: 32, wire.BLOCK_DESCRIPTOR: 8,
        wire.BLOCK_DESCRIPTOR_EXT: 16,
    }  # fmt: skip
    assert {s.format: s.size for s in sizes} == {s.format: n for s, n in sizes.items()}
    assert len(wire.EXPORT_NAME_ZEROES) == 124


def test_greeting_and_option_bytes() -> None:
    assert wire.pack_greeting(3) == b"NBDMAGICIHAVEOPT\x00\x03"
    assert wire.unpack_greeting(b"NBDMAGICIHAVEOPT\x00\x01") == 1
    assert wire.pack_option(7, b"ab") == b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x02ab"
    assert wire.pack_option_reply(3, 1) == bytes.fromhex("0003e889045565a9") + struct.pack(
        ">III", 3, 1, 0
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"NBDMAGIX" + b"IHAVEOPT\x00\x03", "bad greeting magic"),
        (b"NBDMAGIC" + bytes.fromhex("0000420281861253") + b"\x00\x00", "not a newstyle"),
    ],
)
def test_bad_greetings_are_protocol_errors(data: bytes, message: str) -> None:
    with pytest.raises(wire.ProtocolError, match=message):
        wire.unpack_greeting(data)


def test_option_reply_header_checks_its_magic() -> None:
    assert wire.unpack_option_reply_header(wire.pack_option_reply(7, 3, b"xy")[:20]) == (7, 3, 2)
    with pytest.raises(wire.ProtocolError):
        wire.unpack_option_reply_header(bytes(20))


def test_info_payloads() -> None:
    assert wire.pack_info_export(1 << 40, 0x0123) == struct.pack(">HQH", 0, 1 << 40, 0x0123)
    assert wire.pack_info_string(2, "d\u00e9sc") == b"\x00\x02" + "d\u00e9sc".encode()
    assert wire.pack_info_block_size(512, 4096, 1 << 25) == struct.pack(
        ">HIII", 3, 512, 4096, 1 << 25
    )
    assert wire.pack_info_go("ab", (3, 1)) == b"\x00\x00\x00\x02ab\x00\x02\x00\x03\x00\x01"
    assert wire.pack_meta_context_request("e", ("base:",)) == (
        b"\x00\x00\x00\x01e\x00\x00\x00\x01\x00\x00\x00\x05base:"
    )


def test_rep_server_round_trip_and_bounds() -> None:
    assert wire.unpack_rep_server(wire.pack_rep_server("disk", "desc")) == ("disk", "desc")
    with pytest.raises(wire.ProtocolError):
        wire.unpack_rep_server(b"\x00\x00\x00\x09abc")
    with pytest.raises(wire.ProtocolError):
        wire.unpack_rep_server(b"\x00")


def test_meta_context_reply_round_trip() -> None:
    payload = wire.pack_rep_meta_context(7, "base:allocation")
    assert payload == b"\x00\x00\x00\x07base:allocation"
    assert wire.unpack_rep_meta_context(payload) == (7, "base:allocation")


@pytest.mark.parametrize("raw", [b"a\x00b", b"\xff", b"x" * 4097])
def test_strings_follow_the_spec_rules(raw: bytes) -> None:
    with pytest.raises(ValueError):
        wire.check_string(raw)
    assert wire.check_string(b"x" * 4096) == "x" * 4096


def test_error_and_block_status_payloads() -> None:
    assert wire.error_payload(22, "no") == b"\x00\x00\x00\x16\x00\x02no"
    assert wire.block_status_payload(1, [(4096, 3)]) == struct.pack(">III", 1, 4096, 3)
    assert wire.block_status_ext_payload(1, [(1 << 33, 3)]) == struct.pack(
        ">IIQQ", 1, 1, 1 << 33, 3
    )


def test_reply_header_decoder_for_clients() -> None:
    simple = wire.pack_simple_reply(9, 22)
    assert wire.unpack_simple_or_chunk_header(simple) == (0x67446698, 22, 0, 9)
    chunk = wire.pack_structured_header(1, 0x8001, 9, 6)
    assert wire.unpack_simple_or_chunk_header(chunk) == (0x668E33EF, 1, 0x8001, 9)
    with pytest.raises(wire.ProtocolError):
        wire.unpack_simple_or_chunk_header(bytes(16))


def test_error_messages_are_cut_at_4096_bytes_on_a_character_boundary() -> None:
    payload = wire.error_payload(5, "x" + "\u00e9" * 4000)
    (length,) = struct.unpack_from(">H", payload, 4)
    assert length == 4095 and payload[6:].decode() == "x" + "\u00e9" * 2047
