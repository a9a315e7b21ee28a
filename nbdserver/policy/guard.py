"""The policy parts (address ACLs, TLS, per-export TLS-only and allow lists, the single-writer
lease, metrics) behind one interface, ``Guard``.

Why: each part needs a word at a few points of a connection's life (accept, export lookup,
STARTTLS, attach, close). The server asks one ``Guard`` at those points and the edge never sees
the parts; with no guard (``Guard.build`` returns None when nothing is asked for) every point
runs its plain path and pays nothing. Which filters a connection gets is decided by
``nbdserver.exports.stack``; the guard only says which per-connection layers apply.

What it must not do: speak the protocol, own sockets beyond the TLS upgrade, or block a
connection's thread on another connection.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nbdserver.acl import AccessPolicy, Acl, address_of
from nbdserver.backends.base import Backend
from nbdserver.config.model import ExportConfig, ServerConfig, TlsMode, TlsSettings
from nbdserver.errors import ConfigError
from nbdserver.exports import Export, stack
from nbdserver.filters.access import WriterLease
from nbdserver.metrics import ConnStats, CountingReplies, Metrics, MetricsServer
from nbdserver.policy.tls import (
    HANDSHAKE_TIMEOUT,
    TlsConfigError,
    TlsHandshakeError,
    build_server_context,
    peer_subject,
    server_handshake,
)
from nbdserver.protocol.constants import OptionReply, TransmissionFlag
from nbdserver.protocol.events import ExportInfo, Refused

log = logging.getLogger("nbdserver.policy.guard")


@dataclass(frozen=True)
class SecurityOptions:
    """The policy part of a ``ServerConfig``; ``active``: whether any part is asked for."""

    tls: TlsSettings
    allow: Acl | None
    export_acls: dict[str, Acl | None]
    tls_only: frozenset[str]  # exports served only over TLS
    single_writer: bool
    list_allowed: bool  # nbd-server's "allowlist": may clients NBD_OPT_LIST?
    metrics_port: int | None
    metrics_bind: str | None

    @classmethod
    def of(cls, config: ServerConfig) -> SecurityOptions:
        return cls(
            tls=config.tls,
            allow=config.allow,
            export_acls={e.name: e.acl for e in config.exports},
            tls_only=frozenset(e.name for e in config.exports if e.tls),
            single_writer=config.single_writer,
            list_allowed=config.list_allowed,
            metrics_port=config.metrics_port,
            metrics_bind=config.metrics_bind,
        )

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
        try:
            self.tls_context: ssl.SSLContext | None = build_server_context(opts.tls)
        except TlsConfigError as exc:
            raise ConfigError(str(exc)) from None
        self.tls_policy = opts.tls.mode.value
        self.access = AccessPolicy.build(opts.allow, list(opts.export_acls.items()))
        self.metrics: Metrics | None = Metrics() if opts.metrics_port is not None else None
        self._metrics_server: MetricsServer | None = None
        self._leases: dict[str, WriterLease] = {}

    @classmethod
    def build(cls, config: ServerConfig, always: bool = False) -> Guard | None:
        """The guard ``config`` asks for; None when it asks for no policy at all (unless
        ``always``: a server that may reload its exports keeps one for what they bring)."""
        opts = SecurityOptions.of(config)
        return cls(opts) if opts.active or always else None

    def update_exports(self, exports: tuple[ExportConfig, ...]) -> None:
        """A reload: the per-export rules of the new exports (the server-wide ones stay)."""
        self.opts = dataclasses.replace(
            self.opts,
            export_acls={e.name: e.acl for e in exports},
            tls_only=frozenset(e.name for e in exports if e.tls),
        )
        self.access = AccessPolicy.build(self.opts.allow, list(self.opts.export_acls.items()))

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Open the metrics endpoint; a port that cannot be had is one line naming the flag."""
        if self.metrics is None or self.opts.metrics_port is None:
            return
        host = self.opts.metrics_bind
        try:
            self._metrics_server = MetricsServer(self.metrics, self.opts.metrics_port, host)
        except (OSError, OverflowError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(
                f"--metrics-port {self.opts.metrics_port}: cannot listen on "
                f"{host or 'every address'}: {reason}"
            ) from None
        log.info("metrics on http://%s:%d/metrics", host or "[::]", self._metrics_server.port)

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
    def connection_backend(
        self, export: Export, state: ConnState, owned: list[Backend] | None = None
    ) -> Backend:
        """The backend this connection's transmission loop calls: the export's stack plus the
        per-connection layers the policy asks for (``nbdserver.exports.stack`` orders them)."""
        read_only_view = False
        if self.opts.single_writer and export.backend.can_write and not export.read_only:
            lease = self._leases.setdefault(export.name, WriterLease())
            host = address_of(state.peer)
            if lease.acquire(host):
                state.lease = lease
                log.info("%s holds the write lease of export %r", state.peer, export.name)
            else:
                log.info("%s gets export %r read-only: %s writes", state.peer, export.name,
                         lease.holder)  # fmt: skip
                read_only_view = True
        if self.metrics is not None:
            state.stats = self.metrics.open_stats(export.name)
        return stack(export.backend, export.config, connection=True,
                     read_only_view=read_only_view, stats=state.stats, owned=owned)  # fmt: skip

    def replies(self, replies: Any, export: Export) -> Any:
        """The connection's reply encoder, counting error replies when metrics are on."""
        if self.metrics is None:
            return replies
        return CountingReplies(replies, self.metrics, export.name)
