"""The network edge: listening sockets, the accept loop, connection limits and graceful stop.

A thread per connection with blocking sockets: the GIL is released in every recv, pread and
send, and the transmission loop batches requests, so this beats an event loop that would pay
for readiness callbacks on every request (measurements in docs/nbdserver.md).

Hook points for other features, each in one place:
- ``admit``: a freshly accepted socket, before any byte is sent (address ACLs);
- ``resolve``: export name -> export, for one peer (per-export allow lists, limits);
- ``start_tls``: NBD_OPT_STARTTLS was acknowledged; return the wrapped socket;
- exports are built by ``nbdserver.exports.open_export`` (filters wrap backends there).

Must not speak the protocol itself (``nbdserver.connection`` and ``nbdserver.protocol`` do).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nbdserver.connection import Connection, export_info
from nbdserver.errors import ConfigError
from nbdserver.exports import Export, ExportConfig, open_export
from nbdserver.protocol.constants import NBD_DEFAULT_PORT, OptionReply
from nbdserver.protocol.events import ExportInfo, Refused
from nbdserver.protocol.handshake import TlsPolicy
from nbdserver.security import ConnState, Guard

log = logging.getLogger("nbdserver.server")


@dataclass
class ServerConfig:
    exports: list[ExportConfig]
    bind: str = "0.0.0.0"
    port: int | None = NBD_DEFAULT_PORT  # None: no TCP listener (unix socket only)
    unix: str | None = None
    max_connections: int = 256  # 0 = unlimited
    handshake_timeout: float = 10.0
    shutdown_timeout: float = 30.0  # then connections still busy are cut
    workers: int = 4  # pool for FLUSH, TRIM, WRITE_ZEROES, CACHE
    tls_policy: TlsPolicy = "off"
    extra: dict[str, object] = field(default_factory=dict)  # for features wired later


class Server:
    def __init__(self, config: ServerConfig) -> None:
        if not config.exports:
            raise ConfigError("no exports configured")
        names = [c.name for c in config.exports]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate export names in {names}")
        self.config = config
        self.handshake_timeout = config.handshake_timeout
        self.tls_policy: TlsPolicy = config.tls_policy
        self.exports: dict[str, Export] = {}
        self.listeners: list[socket.socket] = []
        self.pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="nbd-slow")
        self.stopping = False
        # Security and operations features (ACL, TLS, metrics...), attached by the CLI; None
        # keeps every hook on its plain path.
        self.guard: Guard | None = None
        self._conns: set[Connection] = set()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # --- setup ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Open every export, then bind the listeners (an error leaves nothing half-open)."""
        try:
            for cfg in self.config.exports:
                self.exports[cfg.name] = open_export(cfg)
                log.info(
                    "export %r: %s, %d bytes%s",
                    cfg.name,
                    cfg.path or "memory",
                    self.exports[cfg.name].backend.size(),
                    ", read-only" if self.exports[cfg.name].read_only else "",
                )
            if self.config.port is not None:
                self.listeners.append(self._tcp_listener(self.config.bind, self.config.port))
            if self.config.unix:
                self.listeners.append(self._unix_listener(self.config.unix))
            if not self.listeners:
                raise ConfigError("nothing to listen on: give a TCP port or --unix")
        except BaseException:
            self.close()
            raise
        for sock in self.listeners:
            log.info("nbdserver listening on %s", _sockname(sock))

    def _tcp_listener(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        sock.setblocking(False)
        return sock

    def _unix_listener(self, path: str) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {path}: {e.strerror}") from None
        sock.setblocking(False)
        return sock

    @property
    def port(self) -> int | None:
        for sock in self.listeners:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        return None

    # --- hook points -------------------------------------------------------------------------
    def admit(self, sock: socket.socket, peer: str) -> str | None:
        """None to accept the connection, else the reason to refuse it (logged)."""
        limit = self.config.max_connections
        if limit and len(self._conns) >= limit:
            return f"connection limit of {limit} reached"
        if self.guard is not None:
            return self.guard.admit(peer)
        return None

    def find(self, name: str) -> Export | None:
        """The export a client named; "" reaches the only export when there is one."""
        export = self.exports.get(name)
        if export is None and name == "" and len(self.exports) == 1:
            export = next(iter(self.exports.values()))
        return export

    def limit_refusal(self, export: Export, peer: str) -> Refused | None:
        """NBD_REP_ERR_POLICY when ``export``'s own connection limit is reached."""
        limit = export.config.connections
        if limit and export.active >= limit:
            log.info("%s refused export %r: its limit of %d is reached", peer, export.name, limit)
            return Refused(
                OptionReply.NBD_REP_ERR_POLICY,
                f"export {export.name!r} has reached its limit of {limit} connections",
            )
        return None

    def resolve(self, name: str, peer: str) -> Export | Refused | None:
        """``find`` plus the export's connection limit (per-peer rules live in the guard)."""
        export = self.find(name)
        if export is None:
            return None
        return self.limit_refusal(export, peer) or export

    def lookup(self, canonical_name: str) -> Export | None:
        return self.exports.get(canonical_name)

    def list_exports(self) -> Iterable[ExportInfo]:
        return [export_info(e) for e in self.exports.values()]

    def start_tls(self, sock: socket.socket, state: ConnState | None = None) -> socket.socket:
        if self.guard is None or state is None:
            raise ConnectionError("TLS is not configured")  # the handshake never asks when off
        return self.guard.start_tls(sock, state)

    # --- running -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept connections until ``shutdown`` is called, then stop gracefully."""
        sel = selectors.DefaultSelector()
        for sock in self.listeners:
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self.stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        continue
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)
        finally:
            sel.close()
            self._drain()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and friends: keep serving the others
            log.warning("accept failed: %s", e)
            return
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = (
                f"{addr[0]}:{addr[1]}"
                if sock.family == socket.AF_INET
                else f"[{addr[0]}]:{addr[1]}"
            )
        else:
            peer = "unix"
        with self._lock:
            refusal = "server shutting down" if self.stopping else self.admit(sock, peer)
            if refusal is None:
                conn = Connection(self, sock, peer)
                self._conns.add(conn)
        if refusal is not None:
            log.info("refused %s: %s", peer, refusal)
            sock.close()
            return
        log.info("connection from %s", peer)
        conn.thread = threading.Thread(target=conn.run, name=f"nbd {peer}", daemon=True)
        conn.thread.start()

    @property
    def stop_fd(self) -> int:
        """A descriptor that turns readable, and stays readable, once the server is stopping:
        ``shutdown`` writes a byte into the wake pipe and nobody reads it back, so any number
        of connection threads can wait on it together with their socket."""
        return self._wake_r

    def connection_done(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def shutdown(self) -> None:
        """Ask ``serve_forever`` to stop (safe from signal handlers and other threads)."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain(self) -> None:
        """Stop accepting, let connections finish what they received, flush, close."""
        self.shutdown()  # also marks ``stop_fd`` readable for connections still negotiating
        for sock in self.listeners:
            sock.close()
        if self.config.unix and os.path.exists(self.config.unix):
            os.unlink(self.config.unix)
        self.listeners = []
        with self._lock:
            conns = list(self._conns)
        if conns:
            log.info("stopping: waiting for %d connection(s) to finish", len(conns))
        for conn in conns:
            conn.begin_shutdown()
        deadline = time.monotonic() + self.config.shutdown_timeout
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))
                if conn.thread.is_alive():
                    log.warning("connection from %s did not finish in time; cut", conn.peer)
                    conn.abort()
                    conn.thread.join(5)
        self.pool.shutdown(wait=True)
        self.close()

    def close(self) -> None:
        """Flush and close every export (idempotent)."""
        for sock in self.listeners:
            sock.close()
        self.listeners = []
        for name, export in list(self.exports.items()):
            try:
                if export.backend.can_flush and not export.read_only:
                    export.backend.flush()
            except OSError as e:
                log.error("flushing export %r failed: %s", name, e)
            export.backend.close()
        self.exports.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
