"""SIGTERM while clients are still negotiating: their next option is answered
NBD_REP_ERR_SHUTDOWN (doc/proto.md: the server is unwilling to continue negotiation as it is
shutting down), NBD_OPT_ABORT is still acknowledged, a quiet negotiator is let go, and the
server exits 0. Raw sockets, so the exact bytes are checked; every wait is on a log line or a
socket, never a sleep."""

from __future__ import annotations

import signal
import socket
import struct

import pytest

from tests.interop.conftest import NbdServerFactory
from tests.interop.test_server_robustness import closed_by_server, recv_exact

pytestmark = pytest.mark.interop

IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
ACK, ERR_SHUTDOWN = 1, (1 << 31) | 7
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY = 2, 7, 8


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def go(name: str) -> bytes:
    return opt(OPT_GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))


def reply(sock: socket.socket) -> tuple[int, int, bytes]:
    head = recv_exact(sock, 20)
    assert head[:8] == REPLY_MAGIC, head
    option, rtype, length = struct.unpack(">III", head[8:])
    return option, rtype, recv_exact(sock, length)


def negotiating(port: int) -> socket.socket:
    """A client past the greeting and one acknowledged option: mid-handshake for sure."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert recv_exact(s, 18)[:16] == b"NBDMAGIC" + IHAVEOPT
    s.sendall(struct.pack(">I", 3) + opt(OPT_STRUCTURED_REPLY))
    assert reply(s) == (OPT_STRUCTURED_REPLY, ACK, b"")
    return s


def test_sigterm_answers_the_next_option_err_shutdown_and_lets_negotiators_go(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(size="1M")
    assert srv.port is not None
    polite = negotiating(srv.port)
    quiet = negotiating(srv.port)
    try:
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_log(r"stopping: waiting for 2 connection\(s\)")
        # The next option, whatever it is, gets ERR_SHUTDOWN with a message; nothing else.
        polite.sendall(go(""))
        assert reply(polite) == (OPT_GO, ERR_SHUTDOWN, b"server is shutting down")
        polite.sendall(opt(OPT_STRUCTURED_REPLY))
        assert reply(polite) == (OPT_STRUCTURED_REPLY, ERR_SHUTDOWN, b"server is shutting down")
        polite.sendall(opt(OPT_ABORT))  # the spec's soft disconnect is still acknowledged
        assert reply(polite) == (OPT_ABORT, ACK, b"")
        assert closed_by_server(polite, timeout=5)
        # The client that says nothing more is let go without waiting for its deadline.
        assert closed_by_server(quiet, timeout=5)
        assert srv.proc.wait(10) == 0
    finally:
        polite.close()
        quiet.close()
    srv.wait_log("ended .*: client sent NBD_OPT_ABORT")
    srv.wait_log("ended .*: server shutting down \\(client was negotiating and went quiet\\)")
    srv.wait_log("stopped cleanly")
