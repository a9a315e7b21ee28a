"""A userspace bridge for nbds:// exports: the kernel gets one end of a socketpair, a thread
pumps bytes between the other end and the TLS connection to the server.

Why it exists: the kernel's nbd driver cannot speak TLS, but it takes any stream socket. So the
handshake (including STARTTLS) is done in userspace, and the transmission phase flows through
this proxy for as long as the agent process lives. If the agent dies, the socketpair closes, the
kernel marks the link dead and a restarted agent reconnects it (persist.py), exactly as after a
server crash.

What it must not do: interpret NBD (it is a byte pump), buffer without bound (each direction
stops reading at ``LIMIT`` bytes queued), or outlive either side: EOF or an error on one socket
closes both, which is what tells the kernel (or the server) the link is gone.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading

LIMIT = 4 << 20  # bytes queued per direction before we stop reading from the source
CHUNK = 256 << 10


class TlsProxy:
    """Bridge ``tls`` (an SSLSocket in transmission phase) to ``kernel_end``."""

    def __init__(self, tls: ssl.SSLSocket, name: str = "nbd") -> None:
        self.kernel_end, self._plain = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._tls = tls
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tlsproxy-{name}", daemon=True)

    def start(self) -> TlsProxy:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop pumping and close both sides (the kernel then sees the link as dead)."""
        self._closed.set()
        for sock in (self._plain, self._tls):
            with contextlib.suppress(OSError):
                sock.close()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._pump()
        except (OSError, ssl.SSLError):
            pass  # either side failed: the link is over, closing both says so
        finally:
            self.close()

    def _pump(self) -> None:
        tls, plain = self._tls, self._plain
        tls.setblocking(False)
        plain.setblocking(False)
        to_tls = bytearray()
        to_plain = bytearray()
        tls_wants_write = False
        with selectors.DefaultSelector() as sel:
            sel.register(tls, selectors.EVENT_READ)
            sel.register(plain, selectors.EVENT_READ)
            while not self._closed.is_set():
                tls_wants_write = False
                # Move whatever can move without blocking.
                moved = True
                while moved:
                    moved = False
                    if len(to_plain) < LIMIT:
                        try:
                            data = tls.recv(CHUNK)
                            if not data:
                                return
                            to_plain += data
                            moved = True
                        except ssl.SSLWantReadError:
                            pass
                        except ssl.SSLWantWriteError:
                            tls_wants_write = True
                    if len(to_tls) < LIMIT:
                        try:
                            data = plain.recv(CHUNK)
                            if not data:
                                return
                            to_tls += data
                            moved = True
                        except BlockingIOError:
                            pass
                    if to_plain:
                        try:
                            n = plain.send(to_plain)
                            del to_plain[:n]
                            moved = moved or n > 0
                        except BlockingIOError:
                            pass
                    if to_tls:
                        try:
                            n = tls.send(to_tls)
                            del to_tls[:n]
                            moved = moved or n > 0
                        except ssl.SSLWantWriteError:
                            tls_wants_write = True
                        except ssl.SSLWantReadError:
                            pass
                tls_events = selectors.EVENT_READ if len(to_plain) < LIMIT else 0
                if to_tls or tls_wants_write:
                    tls_events |= selectors.EVENT_WRITE
                plain_events = selectors.EVENT_READ if len(to_tls) < LIMIT else 0
                if to_plain:
                    plain_events |= selectors.EVENT_WRITE
                # A full queue means: stop reading that source until the other side drains
                # (never both at once: a full queue always has a pending write).
                _want(sel, tls, tls_events)
                _want(sel, plain, plain_events)
                sel.select(timeout=1.0)


def _want(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    registered = sock in sel.get_map()
    if events and registered:
        sel.modify(sock, events)
    elif events:
        sel.register(sock, events)
    elif registered:
        sel.unregister(sock)
