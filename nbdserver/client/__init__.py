"""A blocking userspace NBD client: connect, negotiate, and (for tests and tools) do simple I/O.

Why: the node agent must finish the handshake in userspace and then hand the socket to the
kernel's NBD driver, positioned exactly at the start of transmission. This is that handshake,
built on the pure pieces in ``nbdserver.protocol`` (codecs, ``client_handshake``, ``uri``).

Kernel safety: by default it negotiates neither structured replies nor extended headers, because
the kernel parses only simple replies. ``structured_replies=True`` is for userspace use only.

Layout: ``negotiate`` (sockets, STARTTLS, options, GO, LIST), ``connection`` (the negotiated
socket and its small I/O helpers). What this package must not do: talk to the kernel, retry, or
sleep. Errors are raised as the
exceptions of ``nbdserver.protocol.client_handshake`` (re-exported here).
"""

from nbdserver.client.connection import NBDConnection
from nbdserver.client.negotiate import (
    DEFAULT_TIMEOUT,
    connect,
    export_identity,
    handshake,
    list_exports,
    open_socket,
    tls_context_for,
)
from nbdserver.protocol.client_handshake import (
    ExportDetails,
    NBDClientError,
    NBDConnectError,
    NBDOptionError,
    NBDProtocolError,
    NBDServerRefused,
    NBDTLSError,
    NBDTLSRequired,
    NBDUnknownExport,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExportDetails",
    "NBDClientError",
    "NBDConnectError",
    "NBDConnection",
    "NBDOptionError",
    "NBDProtocolError",
    "NBDServerRefused",
    "NBDTLSError",
    "NBDTLSRequired",
    "NBDUnknownExport",
    "connect",
    "export_identity",
    "handshake",
    "list_exports",
    "open_socket",
    "tls_context_for",
]
