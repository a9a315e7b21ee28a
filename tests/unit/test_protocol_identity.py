"""The export identity in the handshake: listed by NBD_OPT_LIST_META_CONTEXT as
``x-kube-nbd:identity=<id>``, never selected by NBD_OPT_SET_META_CONTEXT, absent when unknown."""

from __future__ import annotations

import struct

import pytest

from nbdserver.protocol.events import ExportInfo, Negotiated
from nbdserver.protocol.handshake import ServerHandshake
from nbdserver.protocol.options import match_identity

REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
ACK, META = 1, 4
LIST, SET, GO, STRUCTURED = 9, 10, 7, 8

KNOWN = ExportInfo("disk", 1 << 20, identity="file-0123abcd")
UNKNOWN = ExportInfo("peer", 1 << 20)


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def rep(option: int, rtype: int, data: bytes = b"") -> bytes:
    return REPLY_MAGIC + struct.pack(">III", option, rtype, len(data)) + data


def s32(text: str) -> bytes:
    return struct.pack(">I", len(text.encode())) + text.encode()


def meta_data(name: str, *queries: str) -> bytes:
    return s32(name) + struct.pack(">I", len(queries)) + b"".join(s32(q) for q in queries)


def context(name: str, cid: int = 0) -> bytes:
    return struct.pack(">I", cid) + name.encode()


def exchange(*options: bytes) -> tuple[object, bytes]:
    hs = ServerHandshake({"disk": KNOWN, "peer": UNKNOWN}.get, lambda: [KNOWN, UNKNOWN])
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 3) + b"".join(options))
    out = b""
    event = hs.next_event()
    out += hs.data_to_send()
    return event, out


@pytest.mark.parametrize(
    "queries", [(), ("x-kube-nbd:",), ("x-kube-nbd:identity",), ("x-kube-nbd:identity=",)]
)
def test_listing_reports_the_identity_for_no_query_the_namespace_or_its_prefix(
    queries: tuple[str, ...],
) -> None:
    _, out = exchange(opt(STRUCTURED), opt(LIST, meta_data("disk", *queries)))
    record = rep(LIST, META, context("x-kube-nbd:identity=file-0123abcd"))
    assert record + rep(LIST, ACK) in out
    assert (rep(LIST, META, context("base:allocation")) in out) == (not queries)


@pytest.mark.parametrize("queries", [("base:",), ("x-kube-nbd:other",), ("kube-nbd:",)])
def test_other_queries_do_not_list_the_identity(queries: tuple[str, ...]) -> None:
    _, out = exchange(opt(LIST, meta_data("disk", *queries)))
    assert b"identity" not in out


def test_an_export_without_identity_lists_no_record() -> None:
    _, out = exchange(opt(LIST, meta_data("peer", "x-kube-nbd:")))
    assert out.endswith(rep(LIST, ACK)) and b"identity" not in out


def test_set_meta_context_never_selects_the_identity() -> None:
    go = s32("disk") + struct.pack(">H", 0)
    event, out = exchange(
        opt(STRUCTURED),
        opt(SET, meta_data("disk", "x-kube-nbd:identity=file-0123abcd", "x-kube-nbd:")),
        opt(GO, go),
    )
    assert rep(SET, ACK) in out and b"identity" not in out
    assert isinstance(event, Negotiated) and event.meta_contexts == ()


def test_identities_are_short_spec_strings() -> None:
    for bad in ("a b", "x" * 129, "é", "a:b"):
        with pytest.raises(ValueError, match="identity"):
            ExportInfo("disk", 1, identity=bad)


def test_match_identity_needs_the_namespace_and_a_prefix_of_the_record() -> None:
    assert match_identity([]) and match_identity(["base:", "x-kube-nbd:"])
    assert not match_identity(["x-kube-nbd:identity=file"])  # a query is a prefix, not a value
    assert not match_identity(["x-kube-nbd-2:"])
