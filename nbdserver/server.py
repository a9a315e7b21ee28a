"""The server: owns the exports, the listeners, the connections and the policy guard, and is the
host the edge's connections call (``nbdserver.edge.host.Host``).

A thread per connection with blocking sockets: the GIL is released in every recv, pread and
send, and the transmission loop batches requests, so this beats an event loop that would pay
for readiness callbacks on every request (measurements in docs/nbdserver.md).

Limits, each for one reason:
- ``max_connections``: connections past the handshake (they hold exports and buffers); a new
  TCP connection is refused before any byte while that many are served;
- ``max_handshakes``: handshakes in progress. Past it, the one that has gone longest without
  completing an option is evicted. Idle sockets (a slowloris) therefore evict each other and
  never lock out clients being served or a client that is negotiating briskly.

What it must not do: speak the protocol (``nbdserver.edge`` and ``nbdserver.protocol`` do), or
decide policy (``nbdserver.policy.guard`` does) or filter order (``nbdserver.exports.stack``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from nbdserver.backends.base import Backend
from nbdserver.config.model import ExportConfig, ServerConfig
from nbdserver.edge import listener
from nbdserver.edge.connection import Connection, export_info
from nbdserver.edge.host import Lister, Peer
from nbdserver.errors import ConfigError
from nbdserver.exports import Export, client_config, open_export, stack
from nbdserver.policy.guard import ConnState, Guard
from nbdserver.privileges import drop_privileges
from nbdserver.protocol.constants import OptionReply
from nbdserver.protocol.events import ExportInfo, Refused
from nbdserver.protocol.handshake import TlsPolicy

log = logging.getLogger("nbdserver.server")


def announce(name: str, size: int, read_only: bool) -> None:
    """One JSON object on a line of its own on stderr for each export opened: its name and
    the size it serves. Whoever runs the server (the operator reads the head of the server
    pod's log) learns a size that only the server knows: a device's, an image header's
    virtual size, a remote's. Written past the logging levels, so ``--log-level`` cannot hide
    it, and flushed at once, so a reader never waits on a buffer."""
    line = json.dumps({"export": name, "sizeBytes": size, "readOnly": read_only})
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@dataclass
class _Record:
    """What the server keeps about one connection."""

    conn: Connection
    state: ConnState
    pending: bool = True  # still negotiating
    served: Export | None = None  # the export it is attached to
    own: dict[str, Export] = field(default_factory=dict)  # per-client (%s) exports it opened
    layers: list[Backend] = field(default_factory=list)  # its own filters (an overlay)


class Server:
    def __init__(
        self, config: ServerConfig, reread: Callable[[], ServerConfig] | None = None
    ) -> None:
        """``reread``: builds the configuration again from its sources (SIGHUP); None when
        there is no config file to re-read."""
        self.config = config
        self._reread = reread
        self.handshake_timeout = config.handshake_timeout
        self.guard = Guard.build(config, always=reread is not None)
        self.tls_policy: TlsPolicy = config.tls.mode.value  # type: ignore[assignment]
        self.exports: dict[str, Export] = {}
        self.listeners: list[socket.socket] = []
        self.pool = ThreadPoolExecutor(max(1, config.workers), thread_name_prefix="nbd-slow")
        self._stopping = False
        self._records: dict[Connection, _Record] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._reload_r, self._reload_w = os.pipe()
        for fd in (self._wake_w, self._reload_w, self._reload_r):
            os.set_blocking(fd, False)
        self._unix_inode = 0

    # --- setup ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Open every export, the listeners and the metrics endpoint, then drop privileges
        (nbd-server's ``user``/``group``); an error leaves nothing half-open."""
        try:
            for cfg in self.config.exports:
                self._open_export(cfg)
            # Before listening: the line is in the log before any client, or a readiness
            # probe, can connect (a reader that saw the port open never misses it).
            for name, export in self.exports.items():
                announce(name, export.backend.size(), export.read_only)
            if self.config.port is not None:
                self.listeners.append(listener.tcp_listener(self.config.bind, self.config.port))
            if self.config.unix:
                sock = listener.unix_listener(self.config.unix)
                self._unix_inode = os.lstat(self.config.unix).st_ino
                self.listeners.append(sock)
            if not self.listeners:
                raise ConfigError("nothing to listen on: give a TCP port or --unix")
            if self.guard is not None:
                self.guard.start()
            drop_privileges(self.config.user, self.config.group)
        except BaseException:
            self.close()
            raise
        if not self.exports and not any(c.per_client for c in self.config.exports):
            log.warning("no exports yet: add some to the config file and send SIGHUP")
        for sock in self.listeners:
            log.info("nbdserver listening on %s", listener.sockname(sock))

    def _open_export(self, cfg: ExportConfig) -> None:
        if cfg.per_client:  # opened per connection, with the client's address in the path
            log.info("export %r: %s, per client", cfg.name, cfg.path)
            return
        export = open_export(cfg)
        self.exports[cfg.name] = export
        log.info(
            "export %r: %s, %d bytes%s%s",
            cfg.name,
            cfg.path or "memory",
            export.backend.size(),
            ", read-only" if export.read_only else "",
            f", copy-on-write ({cfg.cow.value})" if cfg.cow.value != "off" else "",
        )

    @property
    def port(self) -> int | None:
        for sock in self.listeners:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return int(sock.getsockname()[1])
        return None

    # --- reload (SIGHUP) -----------------------------------------------------------------------
    def request_reload(self) -> None:
        """Ask ``serve_forever`` to re-read the config (safe from a signal handler)."""
        with contextlib.suppress(OSError):
            os.write(self._reload_w, b"r")

    def reload(self) -> None:
        """Apply the re-read config's exports: added ones open, removed or changed ones stop
        being offered (their open connections go on until they end). Listeners, limits and
        server-wide policy need a restart."""
        if self._reread is None:
            log.info("SIGHUP: no --config file to re-read; nothing to do")
            return
        try:
            new = self._reread()
        except ConfigError as e:
            log.error("SIGHUP: config not reloaded, the current exports stay: %s", e)
            return
        old = {c.name: c for c in self.config.exports}
        fresh = {c.name: c for c in new.exports}
        removed = [n for n, c in old.items() if fresh.get(n) != c]
        added = [n for n, c in fresh.items() if old.get(n) != c]
        with self._lock:
            for name in removed:
                export = self.exports.pop(name, None)
                if export is not None:
                    export.retire()
        kept = [c for c in new.exports if c.name not in added]
        for name in added:
            try:
                self._open_export(fresh[name])
                kept.append(fresh[name])
                if name in self.exports:  # a per-client export has no size of its own
                    export = self.exports[name]
                    announce(name, export.backend.size(), export.read_only)
            except ConfigError as e:
                log.error("SIGHUP: export %r not added: %s", name, e)
        self.config = dataclasses.replace(self.config, exports=tuple(kept))
        if self.guard is not None:
            self.guard.update_exports(self.config.exports)
        log.info("reloaded %s: added %s, removed %s", self.config.config_file, added, removed)

    # --- the host interface (nbdserver.edge.host.Host) ---------------------------------------
    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def stop_fd(self) -> int:
        """A descriptor that turns readable, and stays readable, once the server is stopping:
        ``shutdown`` writes a byte into the wake pipe and nobody reads it back, so any number
        of connection threads can wait on it together with their socket."""
        return self._wake_r

    def _record(self, conn: Peer) -> _Record:
        assert isinstance(conn, Connection)
        return self._records[conn]

    def opened(self, conn: Peer) -> None:
        if self.guard is not None:
            self._record(conn).state = self.guard.opened(conn.peer)

    def lister(self, conn: Peer) -> Lister | None:
        if self.guard is None:
            return self.list_exports
        return self.guard.lister(self.list_exports, self._record(conn).state)

    def list_exports(self) -> Iterable[ExportInfo]:
        with self._lock:
            exports = list(self.exports.values())
        return [export_info(e) for e in exports]

    def _find(self, name: str, rec: _Record) -> Export | None:
        """The export a client named ("" reaches the only export when there is one); a
        per-client export is opened for this connection on first use."""
        with self._lock:
            export = self.exports.get(name)
            if export is None and name == "" and len(self.exports) == 1:
                export = next(iter(self.exports.values()))
        if export is not None or name in rec.own:
            return export or rec.own[name]
        cfg = self.config.export(name)
        if cfg is None or not cfg.per_client:
            return None
        client = "unix" if rec.conn.peer == "unix" else rec.conn.peer.rsplit(":", 1)[0].strip("[]")
        client = client.removeprefix("::ffff:") if "." in client else client  # IPv4, as nbd-server
        try:
            rec.own[name] = open_export(client_config(cfg, client))
        except ConfigError as e:
            log.info("%s: export %r has no file for this client: %s", rec.conn.peer, name, e)
            return None
        return rec.own[name]

    def resolve(self, name: str, conn: Peer) -> ExportInfo | Refused | None:
        rec = self._record(conn)
        export = self._find(name, rec)
        if export is None:
            return None
        guard = self.guard
        if guard is not None:
            # Policy first: a client the export's rules refuse learns nothing about its load.
            refusal = guard.refusal(export.name, rec.state)
            if refusal is not None:
                return refusal
        limit = export.config.connections
        if limit and export.active >= limit:
            log.info("%s refused export %r: its limit of %d is reached", conn.peer, name, limit)
            return Refused(
                OptionReply.NBD_REP_ERR_POLICY,
                f"export {export.name!r} has reached its limit of {limit} connections",
            )
        info = export_info(export)
        return info if guard is None else guard.advertise(info, export, rec.state)

    def start_tls(self, sock: socket.socket, conn: Peer) -> socket.socket:
        if self.guard is None:
            raise ConnectionError("TLS is not configured")  # the handshake never asks when off
        return self.guard.start_tls(sock, self._record(conn).state)

    def attach(self, name: str, conn: Peer) -> tuple[Export, Backend, Any] | str:
        rec = self._record(conn)
        export = self._find(name, rec)
        if export is None:
            return "export vanished (removed by a reload)"
        limit = self.config.max_connections
        with self._lock:
            if limit and self._served() >= limit:
                return f"connection limit of {limit} reached"
            if not export.try_attach():
                return f"export {export.name!r} is at its limit or was removed"
            rec.served, rec.pending = export, False
        if self.guard is None:
            view = stack(export.backend, export.config, connection=True, owned=rec.layers)
            return export, view, None
        backend = self.guard.connection_backend(export, rec.state, rec.layers)
        return export, backend, lambda replies: self.guard.replies(replies, export)  # type: ignore[union-attr]

    def handshake_done(self, conn: Peer) -> None:
        with self._lock:
            rec = self._records.get(conn)  # type: ignore[call-overload]
            if rec is not None:
                rec.pending = False

    def detach(self, conn: Peer) -> None:
        with self._lock:
            rec = self._records.pop(conn, None)  # type: ignore[call-overload]
        if rec is None:
            return
        for layer in rec.layers:  # a per-connection overlay is dropped here
            layer.close()
        if rec.served is not None:
            rec.served.detach()
        for own in rec.own.values():
            own.close()
        if self.guard is not None:
            self.guard.closed(rec.state)

    # --- running -------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Accept connections until ``shutdown`` is called, then stop gracefully."""
        sel = selectors.DefaultSelector()
        for sock in self.listeners:
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(self._reload_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        continue
                    if key.fileobj == self._reload_r:
                        with contextlib.suppress(OSError):
                            os.read(self._reload_r, 64)
                        self.reload()
                        continue
                    assert isinstance(key.fileobj, socket.socket)
                    self._accept(key.fileobj)
        finally:
            sel.close()
            self._drain()

    def _served(self) -> int:
        return sum(r.served is not None for r in self._records.values())

    def _admit(self, peer: str) -> str | None:
        """None to accept a new connection, else the reason to refuse it (logged). Past the
        pending-handshake cap, the handshake silent the longest is evicted to make room."""
        limit = self.config.max_connections
        if limit and self._served() >= limit:
            return f"connection limit of {limit} reached"
        if self.guard is not None:
            refusal = self.guard.admit(peer)
            if refusal is not None:
                return refusal
        pending = [r.conn for r in self._records.values() if r.pending]
        if len(pending) >= self.config.max_handshakes:
            victim = min(pending, key=lambda c: c.last_progress)
            self._records[victim].pending = False  # counted out now; its thread ends soon
            log.info("evicted %s: %d handshakes pending, it was the longest silent",
                     victim.peer, len(pending))  # fmt: skip
            victim.abort()
        return None

    def _accept(self, sock_listener: socket.socket) -> None:
        try:
            sock, addr = sock_listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE and friends: keep serving the others
            log.warning("accept failed: %s", e)
            return
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = listener.peer_name(sock, addr)
        with self._lock:
            refusal = "server shutting down" if self._stopping else self._admit(peer)
            if refusal is None:
                conn = Connection(self, sock, peer)
                self._records[conn] = _Record(conn, ConnState(peer))
        if refusal is not None:
            log.info("refused %s: %s", peer, refusal)
            sock.close()
            return
        log.info("connection from %s", peer)
        conn.thread = threading.Thread(target=conn.run, name=f"nbd {peer}", daemon=True)
        conn.thread.start()

    def shutdown(self) -> None:
        """Ask ``serve_forever`` to stop (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _drain(self) -> None:
        """Stop accepting, let connections finish what they received, flush, close."""
        self.shutdown()  # also marks ``stop_fd`` readable for connections still negotiating
        self._close_listeners()
        with self._lock:
            conns = list(self._records)
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

    def _close_listeners(self) -> None:
        for sock in self.listeners:
            if sock.family == socket.AF_UNIX and self.config.unix and self._unix_inode:
                listener.remove_own_socket(sock, self.config.unix, self._unix_inode)
            else:
                sock.close()
        self.listeners = []

    def close(self) -> None:
        """Flush and close every export, stop the guard (idempotent)."""
        self._close_listeners()
        for name, export in list(self.exports.items()):
            try:
                export.close()
            except OSError as e:
                log.error("flushing export %r failed: %s", name, e)
        self.exports.clear()
        if self.guard is not None:
            self.guard.close()
        for fd in (self._wake_r, self._wake_w, self._reload_r, self._reload_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = self._reload_r = self._reload_w = -1
