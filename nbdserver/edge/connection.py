"""One client connection, from accept to close: drive the handshake, then hand over to the
transmission loop, and log who it was, which export, and why it ended.

The handshake itself is ``nbdserver.protocol.handshake`` (sans-I/O); this module only feeds it
socket bytes under a deadline, performs STARTTLS when it asks, and asks its host (the narrow
``nbdserver.edge.host.Host``, never the server itself) to resolve names and attach.

The handshake deadline: a client has ``handshake_timeout`` seconds to complete each option;
every option answered starts the clock again. A client making steady progress (libnbd listing
fifty exports, ~200 ms per round trip) is never cut, and one that stalls (or trickles one option
byte by byte) is cut ``handshake_timeout`` after its last answered option. A client that keeps
making progress forever is bounded by the host's cap on pending handshakes instead.

Must not interpret option or request bytes itself, nor touch other connections.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Any

from nbdserver.backends.base import Backend
from nbdserver.edge.host import Host
from nbdserver.edge.transmission import SHUTDOWN_QUIET, Transmission
from nbdserver.errors import ConnectionClosed
from nbdserver.exports import Export
from nbdserver.protocol.constants import TransmissionFlag
from nbdserver.protocol.events import (
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    Negotiated,
    StartTLS,
)
from nbdserver.protocol.handshake import ServerHandshake

log = logging.getLogger("nbdserver.edge.connection")

_HANDSHAKE, _ATTACHING, _TRANSMISSION, _DONE = "handshake", "attaching", "transmission", "done"


def export_info(export: Export) -> ExportInfo:
    """What the handshake advertises for ``export``: the backend's capabilities as transmission
    flags (the handshake adds HAS_FLAGS and DF, and drops write flags on read-only exports)."""
    b = export.advertised
    f = TransmissionFlag(0)
    if export.read_only:
        f |= TransmissionFlag.NBD_FLAG_READ_ONLY
    for cap, flag in (
        (b.can_flush, TransmissionFlag.NBD_FLAG_SEND_FLUSH),
        (b.can_fua, TransmissionFlag.NBD_FLAG_SEND_FUA),
        (b.is_rotational, TransmissionFlag.NBD_FLAG_ROTATIONAL),
        (b.can_trim, TransmissionFlag.NBD_FLAG_SEND_TRIM),
        (b.can_zero, TransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES),
        (b.can_zero and b.can_fast_zero, TransmissionFlag.NBD_FLAG_SEND_FAST_ZERO),
        (b.can_multi_conn, TransmissionFlag.NBD_FLAG_CAN_MULTI_CONN),
        (b.can_cache, TransmissionFlag.NBD_FLAG_SEND_CACHE),
    ):
        if cap:
            f |= flag
    bs = b.block_size
    return ExportInfo(
        name=export.name,
        size=b.size(),
        flags=int(f),
        description=export.config.description,
        minimum_block=bs.minimum,
        preferred_block=bs.preferred,
        maximum_payload=bs.maximum,
        identity=b.identity,
    )


def _shutdown(sock: socket.socket, how: int) -> None:
    """Shut the descriptor down without touching TLS state. ``SSLSocket.shutdown`` would drop
    its SSL object first, and the replies still owed to the client would then leave in clear
    text; shutting the plain descriptor makes the TLS layer see EOF instead."""
    socket.socket.shutdown(sock, how)


def _arm_idle_timeout(sock: socket.socket, seconds: float) -> None:
    """Make a receive that waits ``seconds`` for the client fail, once, before transmission.

    Plain sockets: the kernel's SO_RCVTIMEO, so the hot path's recv costs nothing more and
    sends are never cut (a blocking recv then fails with EAGAIN). TLS sockets: the SSL layer
    retries EAGAIN forever on a blocking socket, so there the Python socket timeout is used; it
    adds a poll before each recv and send and also bounds each reply's send by ``seconds``.
    """
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    whole = int(seconds)
    micro = max(1, round((seconds - whole) * 1_000_000)) if seconds != whole else 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("@ll", whole, micro))


class Connection:
    """Runs in its own thread (``run``); the host may call ``begin_shutdown`` from another."""

    def __init__(self, host: Host, sock: socket.socket, peer: str) -> None:
        self.host = host
        self.sock = sock
        self.peer = peer
        self.export: Export | None = None
        self.transmission: Transmission | None = None
        self.thread: threading.Thread | None = None
        self.last_progress = time.monotonic()  # handshake eviction: the longest silent goes
        self._attached: tuple[Export, Backend, Any] | str | None = None
        self._state = _HANDSHAKE
        self._lock = threading.Lock()

    # --- called from other threads -------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """In transmission, requests already received finish and are answered, later ones get
        ESHUTDOWN, and the connection closes once the client goes quiet (an idle connection's
        recv is woken by shutting the read side). A handshake needs nothing from here: its
        thread waits on the host's ``stop_fd`` too, then answers the client's next option
        NBD_REP_ERR_SHUTDOWN (see ``_receive``)."""
        with self._lock:
            state, tx = self._state, self.transmission
        if state in (_DONE, _HANDSHAKE, _ATTACHING):
            return
        if tx is not None:
            tx.begin_shutdown()
            if state == _TRANSMISSION and not tx.waiting:
                # Busy: the loop sees the flag before its next recv. Cutting the read side
                # now could split a TLS record (the client would get a decode alert).
                return
        with contextlib.suppress(OSError):  # already gone
            _shutdown(self.sock, socket.SHUT_RD)

    def abort(self) -> None:
        """Hard disconnect (a graceful stop overran its deadline, or an evicted handshake)."""
        with contextlib.suppress(OSError):
            _shutdown(self.sock, socket.SHUT_RDWR)

    # --- the connection's own thread ---------------------------------------------------------
    def run(self) -> None:
        reason = "unknown"
        started = time.monotonic()
        try:
            self.host.opened(self)
            reason = self._serve()
        except ConnectionClosed as e:
            reason = e.reason
        except (TimeoutError, BlockingIOError):
            # A receive timeout: the handshake deadline, or in transmission the idle timeout
            # (SO_RCVTIMEO surfaces as EAGAIN on a blocking socket, see _arm_idle_timeout).
            if self._state == _TRANSMISSION and self.export is not None:
                reason = f"idle timeout ({self.export.config.idle_timeout:g} s without a request)"
            else:
                reason = "handshake timed out"
        except OSError as e:
            reason = f"socket error: {e.strerror or e}"
        except Exception as e:  # a bug must cost one connection, never the server
            log.exception("internal error on connection from %s", self.peer)
            reason = f"internal error: {e!r}"
        finally:
            with self._lock:
                handshaking = self._state == _HANDSHAKE
                self._state = _DONE
            if handshaking:
                self.host.handshake_done(self)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.host.detach(self)
            # Logged last: once this line is out, the connection no longer counts anywhere.
            tx = self.transmission
            log.info(
                "connection from %s to export %r ended after %.1fs, %d requests: %s",
                self.peer,
                self.export.name if self.export else None,
                time.monotonic() - started,
                tx.requests if tx else 0,
                reason,
            )

    def _serve(self) -> str:
        negotiated = self._handshake()
        with self._lock:
            self._state = _ATTACHING
        self.host.handshake_done(self)
        if not isinstance(negotiated, Negotiated):
            return negotiated
        attached = self._attached
        assert attached is not None
        if isinstance(attached, str):
            return attached
        export, backend, wrap_replies = attached
        self.export = export
        tx = Transmission(self.sock, export, negotiated, pool=self.host.pool, peer=self.peer,
                          backend=backend, wrap_replies=wrap_replies)  # fmt: skip
        with self._lock:
            self.transmission = tx
            self._state = _TRANSMISSION
        if self.host.stopping:
            tx.begin_shutdown()
            return "server shutting down"
        log.info(
            "%s attached to export %r (%s%s%s)",
            self.peer,
            export.name,
            "extended headers" if negotiated.extended_headers else (
                "structured replies" if negotiated.structured_replies else "simple replies"
            ),
            ", base:allocation" if negotiated.meta_contexts else "",
            ", TLS" if negotiated.tls else "",
        )  # fmt: skip
        if negotiated.leftover:
            tx.preload(negotiated.leftover)
        if export.config.idle_timeout:
            _arm_idle_timeout(self.sock, export.config.idle_timeout)
        return tx.run()

    def _handshake(self) -> Negotiated | str:
        host = self.host
        hs = ServerHandshake(
            lambda name: host.resolve(name, self), host.lister(self), tls=host.tls_policy
        )
        deadline = time.monotonic() + host.handshake_timeout
        sock = self.sock
        while True:
            event = hs.next_event()
            out = hs.data_to_send()  # replies to the options just processed, before waiting
            now = time.monotonic()
            if out:  # an option was answered: the client is making progress
                deadline = now + host.handshake_timeout
                self.last_progress = now  # the host's handshake eviction reads it
            remaining = deadline - now
            if remaining <= 0:
                raise TimeoutError
            # What is left bounds every wait: receives, sends to a client that does not read,
            # and the TLS handshake (which takes the socket's timeout as its budget).
            sock.settimeout(remaining)
            if isinstance(event, Negotiated):
                # Attach (and count) before the client learns it is in: a client that sees
                # its GO reply is already one of the server's served connections.
                self._attached = host.attach(event.export.name, self)
            if out:
                sock.sendall(out)
            if event is NEED_DATA:
                if not self._receive(hs, sock, remaining):
                    return "server shutting down (client was negotiating and went quiet)"
            elif isinstance(event, StartTLS):
                self.sock = sock = host.start_tls(sock, self)
                hs.tls_started()
            elif isinstance(event, Negotiated):
                sock.settimeout(None)
                return event
            elif isinstance(event, Aborted):
                return event.reason
            elif isinstance(event, Closed):
                if event.violation:
                    log.warning("handshake violation from %s: %s", self.peer, event.reason)
                return event.reason

    def _receive(self, hs: ServerHandshake, sock: socket.socket, remaining: float) -> bool:
        """Feed the handshake the client's next bytes, or notice that the server is stopping.

        Once it is, the handshake answers every further option (but ABORT) with
        NBD_REP_ERR_SHUTDOWN, and a client that sends nothing for ``SHUTDOWN_QUIET`` seconds is
        let go (False), as in transmission. Raises TimeoutError at the handshake deadline.
        """
        host = self.host
        if host.stopping:
            hs.begin_shutdown()
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):  # else: decrypted bytes
            if host.stopping:
                readable, _, _ = select.select([sock], [], [], min(remaining, SHUTDOWN_QUIET))
                if not readable:
                    return False
            else:
                fd = sock.fileno()
                ready, _, _ = select.select([fd, host.stop_fd], [], [], remaining)
                if not ready:
                    raise TimeoutError
                if fd not in ready:
                    return True  # stopping now: the caller asks again and lands above
        if host.stopping:  # it may have begun while we waited: these bytes are refused
            hs.begin_shutdown()
        hs.receive_data(sock.recv(65536))
        return True
