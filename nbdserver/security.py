"""Glue between the network edge and the security/operations features.

Why: TLS, address ACLs, per-export TLS-only and allow lists, single-writer leases, metrics and
per-connection filters each need a word at a few points of a connection's life (accept, export
lookup, STARTTLS, attach, close). The edge (``nbdserver.server``/``connection``) calls one
``Guard`` at those points and stays ignorant of the details; with no guard attached it runs the
plain path and pays nothing.

What it must not do: speak the protocol, own sockets beyond the TLS upgrade, or block a
connection's thread on another connection.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbdserver.acl import AccessPolicy, Acl, address_of
from nbdserver.filters.access import ReadOnlyFilter, WriterLease
from nbdserver.filters.stats import StatsFilter
from nbdserver.metrics import ConnStats, CountingReplies, Metrics, MetricsServer
from nbdserver.protocol.constants import OptionReply, TransmissionFlag
from nbdserver.protocol.events import Refused
from nbdserver.tls import (
    HANDSHAKE_TIMEOUT,
    TlsHandshakeError,
    TlsMode,
    TlsSettings,
    build_server_context,
    peer_subject,
    server_handshake,
)

if TYPE_CHECKING:
    from nbdserver.backends.base import Backend
    from nbdserver.exports import Export
    from nbdserver.protocol.events import ExportInfo

log = logging.getLogger("nbdserver.security")


@dataclass
class SecurityOptions:
    tls: TlsSettings = field(default_factory=TlsSettings)
    allow: Acl | None = None  # server-wide list; None: everyone
    export_acls: dict[str, Acl | None] = field(default_factory=dict)
    tls_only: frozenset[str] = frozenset()  # exports served only over TLS
    single_writer: bool = False
    list_allowed: bool = True  # nbd-server's "allowlist": may clients NBD_OPT_LIST?
    metrics_port: int | None = None
    metrics_bind: str = "0.0.0.0"

    @property
    def active(self) -> bool:
        return (
            self.tls.mode is not TlsMode.OFF
            or self.allow is not None
            or any(a is not None for a in self.export_acls.values())
            or bool(self.tls_only)
            or self.single_writer
            or not self.list_allowed
            or self.metrics_port is not None
        )


@dataclass
class ConnState:
    """What the guard remembers about one connection (owned by its thread)."""

    peer: str
    tls: bool = False
    lease: WriterLease | None = None
    stats: ConnStats | None = None


class Guard:
    def __init__(self, opts: SecurityOptions) -> None:
        self.opts = opts
        self.tls_context: ssl.SSLContext | None = build_server_context(opts.tls)
        self.tls_policy = opts.tls.mode.value
        self.access = AccessPolicy.build(opts.allow, list(opts.export_acls.items()))
        self.metrics: Metrics | None = Metrics() if opts.metrics_port is not None else None
        self._metrics_server: MetricsServer | None = None
        self._leases: dict[str, WriterLease] = {}

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.metrics is not None and self.opts.metrics_port is not None:
            self._metrics_server = MetricsServer(
                self.metrics, self.opts.metrics_port, self.opts.metrics_bind
            )
            log.info(
                "metrics on http://%s:%d/metrics", self.opts.metrics_bind, self._metrics_server.port
            )

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_server.port if self._metrics_server else None

    def close(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None

    # --- accept ------------------------------------------------------------------------------
    def admit(self, peer: str) -> str | None:
        """Before any byte is sent: None to go on, else the refusal reason for the log."""
        if self.access.active and not self.access.admits_connection(address_of(peer)):
            if self.metrics is not None:
                self.metrics.connection_refused("acl")
            return "address not in the allow list"
        return None

    def opened(self, peer: str) -> ConnState:
        if self.metrics is not None:
            self.metrics.connection_opened()
        return ConnState(peer)

    def closed(self, state: ConnState) -> None:
        if state.lease is not None:
            state.lease.release(address_of(state.peer))
            state.lease = None
        if self.metrics is not None:
            if state.stats is not None:
                self.metrics.close_stats(state.stats)
                state.stats = None
            self.metrics.connection_closed()

    # --- handshake ---------------------------------------------------------------------------
    def start_tls(self, sock: socket.socket, state: ConnState) -> ssl.SSLSocket:
        if self.tls_context is None:  # the handshake machine refuses STARTTLS when off
            raise TlsHandshakeError("TLS is not configured")
        # The edge bounds the whole negotiation with the socket's timeout; stay within it.
        current = sock.gettimeout()
        timeout = min(HANDSHAKE_TIMEOUT, current) if current else HANDSHAKE_TIMEOUT
        try:
            tls = server_handshake(self.tls_context, sock, timeout)
        except TlsHandshakeError:
            if self.metrics is not None:
                self.metrics.tls_handshake(False)
            raise
        if self.metrics is not None:
            self.metrics.tls_handshake(True)
        state.tls = True
        log.info(
            "%s: TLS %s established%s",
            state.peer,
            tls.version(),
            f", client certificate {peer_subject(tls)!r}" if self.opts.tls.mutual else "",
        )
        return tls

    def refusal(self, name: str, state: ConnState, quiet: bool = False) -> Refused | None:
        """Per-export rules for NBD_OPT_GO/INFO/EXPORT_NAME and meta contexts: None to allow,
        else the error reply (TLS-only before STARTTLS: NBD_REP_ERR_TLS_REQD, as the spec's
        SELECTIVETLS mode asks; outside the export's allow list: NBD_REP_ERR_POLICY)."""
        if name in self.opts.tls_only and not state.tls:
            if not quiet:
                log.info("%s refused export %r: it is served only over TLS", state.peer, name)
            return Refused(
                OptionReply.NBD_REP_ERR_TLS_REQD, f"export {name!r} is served only over TLS"
            )
        if self.access.active and not self.access.admits_export(address_of(state.peer), name):
            if not quiet:
                log.info("%s refused export %r: address not in its allow list", state.peer, name)
            return Refused(
                OptionReply.NBD_REP_ERR_POLICY,
                f"export {name!r} does not admit clients from this address",
            )
        return None

    def may_open(self, name: str, state: ConnState, quiet: bool = False) -> bool:
        return self.refusal(name, state, quiet) is None

    def lister(
        self, list_all: Callable[[], Iterable[ExportInfo]], state: ConnState
    ) -> Callable[[], Iterable[ExportInfo]] | None:
        """The LIST callable for this connection: None when listing is off (ERR_POLICY)."""
        if not self.opts.list_allowed:
            return None

        def visible() -> list[ExportInfo]:
            return [e for e in list_all() if self.may_open(e.name, state, quiet=True)]

        return visible

    def advertise(self, info: ExportInfo, export: Export, state: ConnState) -> ExportInfo:
        """Single-writer: a host that is not (and cannot become) the writer sees a read-only
        export, so its client never sends writes it would only get EPERM for."""
        if not self.opts.single_writer or info.read_only:
            return info
        lease = self._leases.setdefault(export.name, WriterLease())
        if lease.holder in (None, address_of(state.peer)):
            return info
        return dataclasses.replace(info, flags=info.flags | TransmissionFlag.NBD_FLAG_READ_ONLY)

    # --- transmission --------------------------------------------------------------------------
    def attach(self, tx: Any, export: Export, state: ConnState) -> None:
        """Set up a transmission loop (``nbdserver.edge_transmission.Transmission``) before it
        runs: its backend view, and error counting on its replies when metrics are on."""
        tx.backend = self.connection_backend(export, state)
        if self.metrics is not None:
            tx.replies = CountingReplies(tx.replies, self.metrics, export.name)

    def connection_backend(self, export: Export, state: ConnState) -> Backend:
        """The backend this connection's transmission loop should call."""
        backend = export.backend
        if self.opts.single_writer and backend.can_write and not export.read_only:
            lease = self._leases.setdefault(export.name, WriterLease())
            host = address_of(state.peer)
            if lease.acquire(host):
                state.lease = lease
                log.info("%s holds the write lease of export %r", state.peer, export.name)
            else:
                log.info("%s gets export %r read-only: %s writes", state.peer, export.name,
                         lease.holder)  # fmt: skip
                backend = ReadOnlyFilter(backend)
        if self.metrics is not None:
            state.stats = self.metrics.open_stats(export.name)
            backend = StatsFilter(backend, state.stats)
        return backend
