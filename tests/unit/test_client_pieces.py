"""The pure client-side pieces: flags, info collection and the error-reply exception mapping."""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol import client_handshake as ch


def test_client_flags_echo_no_zeroes_and_require_fixed_newstyle() -> None:
    assert ch.client_flags(3) == 3
    assert ch.client_flags(1) == 1
    with pytest.raises(ch.NBDProtocolError):
        ch.client_flags(2)


def collector() -> ch.InfoCollector:
    return ch.InfoCollector(ch.ExportDetails("e"))


def test_info_collector_reads_every_info_type_and_ignores_unknown_ones() -> None:
    c = collector()
    c.feed(struct.pack(">HQH", 0, 1 << 30, 0x4B))
    c.feed(b"\x00\x01canon")
    c.feed(b"\x00\x02text")
    c.feed(struct.pack(">HIII", 3, 512, 4096, 1 << 22))
    c.feed(b"\x00\x63whatever")
    d = c.finish()
    assert (d.size, d.transmission_flags, d.canonical_name, d.description) == (
        1 << 30,
        0x4B,
        "canon",
        "text",
    )
    assert (d.minimum_block, d.preferred_block, d.maximum_payload, d.block_size_reported) == (
        512, 4096, 1 << 22, True,
    )  # fmt: skip
    assert d.read_only


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00",
        struct.pack(">HQ", 0, 1),  # INFO_EXPORT of 10 bytes
        struct.pack(">HIII", 3, 3, 4096, 1 << 20),  # minimum not a power of two
        struct.pack(">HIII", 3, 1 << 17, 1 << 17, 1 << 20),  # minimum above 64 KiB
        struct.pack(">HIII", 3, 4096, 512, 1 << 20),  # preferred below minimum
        struct.pack(">HII", 3, 512, 4096),  # too short
    ],
)
def test_malformed_info_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ch.NBDProtocolError):
        collector().feed(payload)


def test_ack_without_info_export_is_a_protocol_error() -> None:
    c = collector()
    c.feed(b"\x00\x01name")
    with pytest.raises(ch.NBDProtocolError, match="NBD_INFO_EXPORT"):
        c.finish()


@pytest.mark.parametrize(
    ("reply", "cls"),
    [
        ((1 << 31) | 6, ch.NBDUnknownExport),
        ((1 << 31) | 5, ch.NBDTLSRequired),
        ((1 << 31) | 2, ch.NBDServerRefused),
        ((1 << 31) | 7, ch.NBDServerRefused),
        ((1 << 31) | 0x77, ch.NBDServerRefused),
    ],
)
def test_error_replies_map_to_exceptions_with_the_servers_message(reply: int, cls: type) -> None:
    exc = ch.option_error(7, reply, b"because")
    assert type(exc) is cls and exc.reply == reply and "NBD_OPT_GO" in str(exc)
    assert str(exc).endswith("because")
