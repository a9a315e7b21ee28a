"""Server handshake, byte for byte: feed the client's bytes, assert the server's exact bytes.

Expected bytes are spelled with literal magics (not the module under test) so a wrong constant
in the protocol package fails here.
"""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol.events import (
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    Negotiated,
    StartTLS,
)
from nbdserver.protocol.handshake import ServerHandshake

IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
ERR = 1 << 31
ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID = ERR | 1, ERR | 2, ERR | 3
ERR_TLS_REQD, ERR_UNKNOWN, ERR_SHUTDOWN, ERR_EXT_HEADER_REQD = ERR | 5, ERR | 6, ERR | 7, ERR | 10
FLUSH, FUA, RO, TRIM, WZ, DF, FASTZ = 1 << 2, 1 << 3, 1 << 1, 1 << 5, 1 << 6, 1 << 7, 1 << 11

DISK = ExportInfo(
    "disk", 1 << 20, FLUSH | FUA | TRIM | WZ | FASTZ, "a test disk", 512, 4096, 1 << 20
)
RODISK = ExportInfo("ro", 8192, RO | FLUSH | FUA | TRIM | WZ | FASTZ)
EXPORTS = {"disk": DISK, "": DISK, "ro": RODISK}


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def rep(option: int, rtype: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + struct.pack(">III", option, rtype, len(data)) + data


def s32(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw


def go_data(name: str, *infos: int) -> bytes:
    return s32(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name: str, *queries: str) -> bytes:
    return s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", 0, size, flags)


def block_size(e: ExportInfo) -> bytes:
    return struct.pack(">HIII", 3, e.minimum_block, e.preferred_block, e.maximum_payload)


def started(tls: str = "off", client_flags: int = 3) -> ServerHandshake:
    hs = ServerHandshake(EXPORTS.get, lambda: [DISK, RODISK], tls=tls)  # type: ignore[arg-type]
    assert hs.data_to_send() == b"NBDMAGIC" + IHAVEOPT + b"\x00\x03"
    hs.receive_data(struct.pack(">I", client_flags))
    return hs


def step(hs: ServerHandshake, data: bytes) -> tuple[object, bytes]:
    hs.receive_data(data)
    event = hs.next_event()
    return event, hs.data_to_send()


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    hs = started()
    assert hs.next_event() is NEED_DATA
    assert hs.data_to_send() == b""


@pytest.mark.parametrize("flags", [0, 2, 4, 0x80000001])
def test_client_without_fixed_newstyle_or_with_unknown_flags_is_disconnected(flags: int) -> None:
    hs = started(client_flags=flags)
    event = hs.next_event()
    assert isinstance(event, Closed) and event.violation


def test_bytes_may_arrive_one_at_a_time() -> None:
    hs = ServerHandshake(EXPORTS.get)  # type: ignore[arg-type]
    hs.data_to_send()
    for b in struct.pack(">I", 1) + opt(7, go_data("disk")):
        hs.receive_data(bytes([b]))
        event = hs.next_event()
    assert isinstance(event, Negotiated)


def test_export_name_without_no_zeroes_sends_124_zero_bytes() -> None:
    hs = started(client_flags=1)
    event, out = step(hs, opt(1, b"disk"))
    flags = 1 | FLUSH | FUA | TRIM | WZ | FASTZ
    assert out == struct.pack(">QH", 1 << 20, flags) + bytes(124)
    assert isinstance(event, Negotiated) and not event.via_go and event.transmission_flags == flags


def test_export_name_with_no_zeroes_sends_no_padding_and_keeps_pipelined_bytes() -> None:
    hs = started()
    event, out = step(hs, opt(1, b"disk") + b"REQUEST")
    assert out == struct.pack(">QH", 1 << 20, 1 | FLUSH | FUA | TRIM | WZ | FASTZ)
    assert isinstance(event, Negotiated) and event.leftover == b"REQUEST"


def test_export_name_of_an_unknown_export_disconnects_without_a_reply() -> None:
    hs = started()
    event, out = step(hs, opt(1, b"nope"))
    assert isinstance(event, Closed) and out == b""


def test_abort_is_acknowledged_and_ignores_its_payload() -> None:
    event, out = step(started(), opt(2, b"junk"))
    assert isinstance(event, Aborted) and out == rep(2, ACK)


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    event, out = step(started(), opt(3))
    server1 = rep(3, SERVER, s32("disk") + b"a test disk")
    assert event is NEED_DATA and out == server1 + rep(3, SERVER, s32("ro")) + rep(3, ACK)


def test_list_with_data_is_invalid() -> None:
    _, out = step(started(), opt(3, b"x"))
    assert (
        out.startswith(rep(3, ERR_INVALID)[:16])
        and struct.unpack(">I", out[12:16])[0] == ERR_INVALID
    )


def test_unknown_option_gets_unsup_and_its_payload_is_skipped() -> None:
    event, out = step(started(), opt(0x1234, b"x" * 100) + opt(4))
    assert event is NEED_DATA
    first_len = struct.unpack(">I", out[16:20])[0]
    assert out[:16] == REPLY_MAGIC + struct.pack(">II", 0x1234, ERR_UNSUP)
    second = out[20 + first_len :]
    assert second[:16] == REPLY_MAGIC + struct.pack(">II", 4, ERR_UNSUP)  # PEEK_EXPORT


def test_option_longer_than_the_limit_disconnects() -> None:
    hs = started()
    hs.receive_data(IHAVEOPT + struct.pack(">II", 0x99, 1 << 20))
    event = hs.next_event()
    assert isinstance(event, Closed) and event.violation


def test_bad_option_magic_disconnects() -> None:
    event, _ = step(started(), b"IHAVEOPX" + struct.pack(">II", 3, 0))
    assert isinstance(event, Closed) and event.violation


def test_eof_mid_option_is_a_violation_and_eof_between_options_is_not() -> None:
    hs = started()
    hs.receive_data(opt(3)[:10])
    hs.receive_data(b"")
    assert isinstance(ev := hs.next_event(), Closed) and ev.violation
    hs = started()
    hs.receive_data(b"")
    assert isinstance(ev := hs.next_event(), Closed) and not ev.violation


def test_go_replies_info_export_name_description_block_size_then_ack() -> None:
    event, out = step(started(), opt(7, go_data("", 1, 2, 3)))
    flags = 1 | FLUSH | FUA | TRIM | WZ | FASTZ
    assert out == (
        rep(7, INFO, info_export(1 << 20, flags))
        + rep(7, INFO, b"\x00\x01disk")
        + rep(7, INFO, b"\x00\x02a test disk")
        + rep(7, INFO, block_size(DISK))
        + rep(7, ACK)
    )
    assert isinstance(event, Negotiated)
    assert event.via_go and event.block_size_requested and event.export is DISK
    assert not event.structured_replies and event.meta_contexts == ()


def test_no_padding_after_go_even_without_no_zeroes() -> None:
    event, out = step(started(client_flags=1), opt(7, go_data("disk")) + b"NEXT")
    assert isinstance(event, Negotiated) and event.leftover == b"NEXT"
    assert out.endswith(rep(7, INFO, block_size(DISK)) + rep(7, ACK))


def test_info_and_go_agree_and_info_stays_in_negotiation() -> None:
    hs = started()
    event, info = step(hs, opt(6, go_data("disk", 3)))
    assert event is NEED_DATA
    event, go = step(hs, opt(7, go_data("disk", 3)))
    assert isinstance(event, Negotiated)
    assert go == info.replace(struct.pack(">I", 6), struct.pack(">I", 7))


def test_go_for_an_unknown_export_sends_no_info_before_the_error() -> None:
    event, out = step(started(), opt(7, go_data("nope", 3)))
    assert event is NEED_DATA
    assert out == rep(7, ERR_UNKNOWN, b"export 'nope' not found")


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",  # shorter than 6
        struct.pack(">I", 10) + b"ab\x00\x00",  # name longer than the option
        s32("disk") + struct.pack(">H", 2) + b"\x00\x03",  # count does not match
        s32("disk") + struct.pack(">H", 0) + b"x",  # trailing byte
        s32("d\x00k") + struct.pack(">H", 0),  # NUL in the name
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    ],
)
def test_malformed_go_is_invalid_and_negotiation_continues(data: bytes) -> None:
    hs = started()
    event, out = step(hs, opt(7, data))
    assert event is NEED_DATA
    assert out[8:16] == struct.pack(">II", 7, ERR_INVALID)
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated)


def test_read_only_export_hides_write_flags() -> None:
    event, out = step(started(), opt(7, go_data("ro")))
    assert out.startswith(rep(7, INFO, info_export(8192, 1 | RO | FLUSH)))
    assert isinstance(event, Negotiated) and event.transmission_flags == 1 | RO | FLUSH


def test_structured_reply_adds_df_and_rejects_data() -> None:
    hs = started()
    _, out = step(hs, opt(8, b"x"))
    assert out[8:16] == struct.pack(">II", 8, ERR_INVALID)
    _, out = step(hs, opt(8))
    assert out == rep(8, ACK)
    event, out = step(hs, opt(7, go_data("ro")))
    assert out.startswith(rep(7, INFO, info_export(8192, 1 | RO | FLUSH | DF)))
    assert isinstance(event, Negotiated) and event.structured_replies


def test_extended_headers_win_over_structured_replies_and_forbid_export_name() -> None:
    hs = started()
    assert step(hs, opt(11))[1] == rep(11, ACK)
    _, out = step(hs, opt(8))
    assert out == rep(8, ERR_EXT_HEADER_REQD, b"extended headers in use")
    event, _ = step(hs, opt(1, b"disk"))
    assert isinstance(event, Closed) and event.violation


def test_extended_headers_negotiated_through_go() -> None:
    hs = started()
    step(hs, opt(11))
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.extended_headers and event.structured_replies
    assert event.transmission_flags & DF


def test_list_meta_context_without_queries_and_with_base_wildcard() -> None:
    hs = started()
    step(hs, opt(8))
    expected = rep(9, META, b"\x00\x00\x00\x00base:allocation") + rep(9, ACK)
    assert step(hs, opt(9, meta_data("disk")))[1] == expected
    assert step(hs, opt(9, meta_data("disk", "base:")))[1] == expected
    assert step(hs, opt(9, meta_data("disk", "qemu:dirty-bitmap:x", "base:other")))[1] == rep(
        9, ACK
    )


def test_set_meta_context_selects_base_allocation_for_the_export_used_by_go() -> None:
    hs = started()
    step(hs, opt(8))
    _, out = step(hs, opt(10, meta_data("disk", "base:allocation", "base:")))
    assert out == rep(10, META, b"\x00\x00\x00\x01base:allocation") + rep(10, ACK)
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.meta_contexts == ((1, "base:allocation"),)


def test_set_meta_context_with_no_queries_selects_nothing() -> None:
    hs = started()
    step(hs, opt(8))
    assert step(hs, opt(10, meta_data("disk")))[1] == rep(10, ACK)
    assert step(hs, opt(10, meta_data("disk", "base:")))[1] == rep(10, ACK)  # ignored in SET
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.meta_contexts == ()


def test_set_meta_context_for_another_export_does_not_carry_over() -> None:
    hs = started()
    step(hs, opt(8))
    step(hs, opt(10, meta_data("ro", "base:allocation")))
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.meta_contexts == ()


def test_set_meta_context_replaces_the_selection_even_when_it_fails() -> None:
    hs = started()
    step(hs, opt(8))
    step(hs, opt(10, meta_data("disk", "base:allocation")))
    _, out = step(hs, opt(10, meta_data("disk", "nocolon")))
    assert out[8:16] == struct.pack(">II", 10, ERR_INVALID)
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.meta_contexts == ()


def test_set_meta_context_needs_structured_replies() -> None:
    _, out = step(started(), opt(10, meta_data("disk", "base:allocation")))
    assert out[8:16] == struct.pack(">II", 10, ERR_INVALID)


@pytest.mark.parametrize(
    "data",
    [
        meta_data("disk", "base:allocation")[:-1],  # query runs past the option
        s32("disk") + struct.pack(">I", 3) + s32("base:"),  # count larger than the queries
        meta_data("disk") + b"x",  # trailing bytes
        b"\x00\x00",
    ],
)
def test_malformed_meta_context_requests_are_invalid(data: bytes) -> None:
    hs = started()
    step(hs, opt(8))
    _, out = step(hs, opt(9, data))
    assert out[8:16] == struct.pack(">II", 9, ERR_INVALID)


def test_meta_context_for_an_unknown_export_is_unknown() -> None:
    hs = started()
    step(hs, opt(8))
    _, out = step(hs, opt(9, meta_data("nope")))
    assert out[8:16] == struct.pack(">II", 9, ERR_UNKNOWN)


def test_starttls_refused_by_policy_when_tls_is_off() -> None:
    _, out = step(started(), opt(5))
    assert out[8:16] == struct.pack(">II", 5, ERR_POLICY)


def test_starttls_resets_negotiated_state_and_a_second_starttls_is_invalid() -> None:
    hs = started(tls="on")
    step(hs, opt(8))
    step(hs, opt(10, meta_data("disk", "base:allocation")))
    event, out = step(hs, opt(5))
    assert isinstance(event, StartTLS) and out == rep(5, ACK)
    assert hs.next_event() is NEED_DATA  # nothing parsed until the edge says TLS is up
    hs.tls_started()
    _, out = step(hs, opt(5))
    assert out[8:16] == struct.pack(">II", 5, ERR_INVALID)
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated)
    assert event.tls and not event.structured_replies and event.meta_contexts == ()


def test_starttls_with_data_is_invalid() -> None:
    _, out = step(started(tls="on"), opt(5, b"x"))
    assert out[8:16] == struct.pack(">II", 5, ERR_INVALID)


def test_data_pipelined_behind_starttls_is_a_violation() -> None:
    event, out = step(started(tls="on"), opt(5) + opt(3))
    assert out == rep(5, ACK) and isinstance(event, Closed) and event.violation


def test_tls_required_refuses_every_option_but_starttls_and_abort() -> None:
    hs = started(tls="require")
    for option, data in ((3, b""), (7, go_data("disk")), (8, b""), (0x55, b"zz")):
        event, out = step(hs, opt(option, data))
        assert event is NEED_DATA
        assert out == rep(option, ERR_TLS_REQD, b"TLS is required")
    event, out = step(hs, opt(5))
    assert isinstance(event, StartTLS)
    hs.tls_started()
    event, _ = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and event.tls


def test_tls_required_disconnects_export_name_before_tls() -> None:
    event, out = step(started(tls="require"), opt(1, b"disk"))
    assert isinstance(event, Closed) and out == b""


def test_tls_on_lets_clients_continue_without_tls() -> None:
    event, _ = step(started(tls="on"), opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and not event.tls


def test_shutdown_errors_options_but_still_acknowledges_abort() -> None:
    hs = started()
    hs.begin_shutdown()
    _, out = step(hs, opt(7, go_data("disk")))
    assert out == rep(7, ERR_SHUTDOWN, b"server is shutting down")
    event, out = step(hs, opt(2))
    assert isinstance(event, Aborted) and out == rep(2, ACK)


def test_list_is_refused_by_policy_without_a_lister() -> None:
    hs = ServerHandshake(EXPORTS.get)  # type: ignore[arg-type]
    hs.data_to_send()
    _, out = step(hs, struct.pack(">I", 1) + opt(3))
    assert out[8:16] == struct.pack(">II", 3, ERR_POLICY)


def test_final_event_is_sticky() -> None:
    hs = started()
    event, _ = step(hs, opt(2))
    hs.receive_data(opt(3))
    assert hs.next_event() is event and hs.data_to_send() == b""
