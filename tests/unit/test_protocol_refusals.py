"""Refusal reasons from the export resolver, byte for byte.

A resolver may answer ``Refused(reply, message)`` for an export that exists but that this client
may not open (an access list, a TLS-only export before STARTTLS, a connection limit). INFO, GO
and the meta-context options then send exactly that error reply with that message and no
NBD_REP_INFO before it; NBD_OPT_EXPORT_NAME, which has no error reply, disconnects.
"""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol.events import NEED_DATA, Closed, ExportInfo, Negotiated, Refused
from nbdserver.protocol.handshake import ServerHandshake
from tests.unit.test_protocol_handshake import (
    ACK,
    DISK,
    ERR_POLICY,
    ERR_TLS_REQD,
    ERR_UNKNOWN,
    INFO,
    go_data,
    meta_data,
    opt,
    rep,
    step,
)

POLICY = Refused(ERR_POLICY, "export 'disk' does not admit clients from this address")
TLS_ONLY = Refused(ERR_TLS_REQD, "export 'disk' is served only over TLS")


def refusing(answer: Refused, tls: str = "off") -> ServerHandshake:
    def resolve(name: str) -> ExportInfo | Refused | None:
        return answer if name == "disk" else None

    hs = ServerHandshake(resolve, tls=tls)  # type: ignore[arg-type]
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3))
    return hs


@pytest.mark.parametrize("refusal", [POLICY, TLS_ONLY], ids=["policy", "tls-reqd"])
@pytest.mark.parametrize("option", [6, 7], ids=["INFO", "GO"])
def test_info_and_go_send_the_resolvers_refusal_and_no_info_before_it(
    refusal: Refused, option: int
) -> None:
    hs = refusing(refusal)
    event, out = step(hs, opt(option, go_data("disk", 3)))
    assert event is NEED_DATA  # negotiation goes on: the client may pick another export
    assert out == rep(option, refusal.reply, refusal.message.encode())


def test_an_unknown_export_is_still_err_unknown_next_to_a_refused_one() -> None:
    event, out = step(refusing(POLICY), opt(7, go_data("other")))
    assert event is NEED_DATA and out == rep(7, ERR_UNKNOWN, b"export 'other' not found")


def test_export_name_of_a_refused_export_disconnects_without_a_reply() -> None:
    event, out = step(refusing(TLS_ONLY), opt(1, b"disk"))
    assert isinstance(event, Closed) and out == b""
    assert "served only over TLS" in event.reason and "NBD_OPT_EXPORT_NAME" in event.reason
    assert not event.violation  # the client did nothing wrong


@pytest.mark.parametrize("option", [9, 10], ids=["LIST_META", "SET_META"])
def test_meta_context_options_send_the_same_refusal(option: int) -> None:
    hs = refusing(POLICY)
    step(hs, opt(8))  # structured replies, so SET_META_CONTEXT gets as far as the resolver
    event, out = step(hs, opt(option, meta_data("disk", "base:allocation")))
    assert event is NEED_DATA
    assert out == rep(option, ERR_POLICY, POLICY.message.encode())


def test_a_refusal_that_lifts_lets_the_same_connection_go_on() -> None:
    # Selective TLS in the resolver's hands: refused before STARTTLS, served after it.
    answers: list[ExportInfo | Refused] = [TLS_ONLY, DISK]
    hs = ServerHandshake(lambda name: answers.pop(0), tls="on")
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3))
    _, out = step(hs, opt(7, go_data("disk")))
    assert out == rep(7, ERR_TLS_REQD, TLS_ONLY.message.encode())
    event, out = step(hs, opt(7, go_data("disk")))
    assert isinstance(event, Negotiated) and out.startswith(rep(7, INFO)[:12])
    assert out.endswith(rep(7, ACK))


@pytest.mark.parametrize(
    ("reply", "message"),
    [(ACK, "an ACK is no refusal"), (ERR_POLICY, "nul\0inside"), (ERR_POLICY, "x" * 4097)],
)
def test_a_refusal_must_be_an_error_reply_with_a_spec_string(reply: int, message: str) -> None:
    with pytest.raises(ValueError):
        Refused(reply, message)
