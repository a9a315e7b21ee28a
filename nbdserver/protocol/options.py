"""Parsing of option request payloads (NBD_OPT_INFO/GO, LIST/SET_META_CONTEXT), sans I/O.

Why: these payloads nest length-prefixed strings inside the option's own length, so every
length must be checked against what is left; keeping the parsers apart from the handshake
machine lets each rule be tested in isolation and keeps the machine about *decisions*.

What this module must not do: reply, decide policy or look exports up. Parsers return the
parsed values, or a string saying why the payload is malformed (the caller answers
NBD_REP_ERR_INVALID with it).
"""

from __future__ import annotations

from nbdserver.protocol import wire
from nbdserver.protocol.constants import IDENTITY_NAMESPACE, IDENTITY_PREFIX


def parse_info_request(data: bytes) -> tuple[str, frozenset[int]] | str:
    """Parse NBD_OPT_INFO/GO data into (name, info requests), or return an error message."""
    if len(data) < 6:
        return "NBD_OPT_INFO/GO data shorter than 6 bytes"
    (n,) = wire.U32.unpack_from(data)
    if n > len(data) - 6:
        return "export name length exceeds the option"
    try:
        name = wire.check_string(data[4 : 4 + n])
    except ValueError as exc:
        return f"invalid export name: {exc}"
    (count,) = wire.U16.unpack_from(data, 4 + n)
    if len(data) != 6 + n + 2 * count:
        return "information request count does not match the option length"
    start = 6 + n
    return name, frozenset(wire.U16.unpack_from(data, start + 2 * i)[0] for i in range(count))


def parse_meta_request(data: bytes) -> tuple[str, list[str]] | str:
    """Parse LIST/SET_META_CONTEXT data into (export name, queries), or an error message."""
    try:
        if len(data) < 8:
            return "meta context request shorter than 8 bytes"
        (n,) = wire.U32.unpack_from(data)
        if n > len(data) - 8:
            return "export name length exceeds the option"
        name = wire.check_string(data[4 : 4 + n])
        pos = 4 + n
        (count,) = wire.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                return "query count exceeds the option"
            (qlen,) = wire.U32.unpack_from(data, pos)
            pos += 4
            if pos + qlen > len(data):
                return "query length exceeds the option"
            queries.append(wire.check_string(data[pos : pos + qlen]))
            pos += qlen
        if pos != len(data):
            return "trailing bytes after the queries"
        return name, queries
    except ValueError as exc:
        return f"invalid string: {exc}"


def match_base_allocation(queries: list[str], setting: bool) -> bool | str:
    """Whether the queries select (SET) or list (LIST) ``base:allocation``; a string error for a
    query without a namespace. No queries means "everything" when listing, "nothing" when setting.

    ``base:`` is a wildcard when listing and ignored when setting; other namespaces and unknown
    ``base:`` leaves are ignored, as the spec demands.
    """
    if not queries:
        return not setting
    found = False
    for query in queries:
        namespace, colon, leaf = query.partition(":")
        if not colon:
            return f"query {query!r} lacks a namespace"
        if namespace == "base" and (leaf == "allocation" or (leaf == "" and not setting)):
            found = True
    return found


def match_identity(queries: list[str]) -> bool:
    """Whether a LIST_META_CONTEXT query asks for the export identity: no query (everything),
    the namespace wildcard ``x-kube-nbd:``, or a prefix of ``x-kube-nbd:identity=``.

    Listing only: the identity is a record about the export, not a context with block-status
    meaning, so NBD_OPT_SET_META_CONTEXT never selects it (docs/protocol.md).
    """
    if not queries:
        return True
    return any(
        q.startswith(IDENTITY_NAMESPACE + ":") and IDENTITY_PREFIX.startswith(q) for q in queries
    )
