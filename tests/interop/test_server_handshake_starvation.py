"""Pending handshakes cannot starve served clients, and the handshake deadline tolerates a client
that makes progress while it still drops one that stalls (issue 12, defect 8).

The bound: handshakes in progress have a cap of their own (``--max-handshakes``); a new
connection beyond it evicts the handshake that has been silent longest. ``--handshake-timeout``
is the longest a client may go without completing an option, not the whole negotiation.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import pytest

from nbdserver.client import connect
from tests.interop.security_helpers import serve
from tests.interop.test_server_handshake_shutdown import IHAVEOPT, go, opt, reply
from tests.interop.test_server_robustness import closed_by_server, recv_exact

pytestmark = pytest.mark.interop

OPT_LIST, REP_SERVER, REP_ACK = 3, 2, 1


def test_300_idle_connections_do_not_lock_out_a_well_behaved_client(tmp_path: Path) -> None:
    with serve(["--backend", "memory", "--size", "1M"], tmp_path) as srv, \
            contextlib.ExitStack() as idle:  # fmt: skip
        for _ in range(300):
            s = idle.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
            s.recv(1)  # the server admitted it (greeting) or closed it (b""): either way, done
        with connect(f"nbd://127.0.0.1:{srv.port}/") as c:
            assert c.pread(0, 512) == bytes(512)
        assert "evicted" in srv.log()


def test_a_client_making_steady_progress_outlives_the_handshake_timeout(tmp_path: Path) -> None:
    args = ["--export", "a=memory,size=1M", "--handshake-timeout", "1"]
    with serve(args, tmp_path) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # fmt: skip
        started = time.monotonic()
        assert recv_exact(s, 18)[:16] == b"NBDMAGIC" + IHAVEOPT
        s.sendall(struct.pack(">I", 3))
        while time.monotonic() - started < 2.5:  # 2.5 s of listing, one option every 0.4 s
            time.sleep(0.4)  # pacing a slow client (what is under test), not synchronisation
            s.sendall(opt(OPT_LIST))
            assert reply(s)[1] == REP_SERVER
            assert reply(s)[1] == REP_ACK
        s.sendall(go("a"))
        while (r := reply(s))[1] != REP_ACK:
            assert r[1] < 1 << 31, r  # an error reply would fail here


def test_a_stalled_client_is_dropped_at_the_handshake_timeout(tmp_path: Path) -> None:
    args = ["--export", "a=memory,size=1M", "--handshake-timeout", "1"]
    with serve(args, tmp_path) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # fmt: skip
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", 3) + opt(OPT_LIST)[:10])  # half an option, then nothing
        started = time.monotonic()
        assert closed_by_server(s, timeout=10)
        assert time.monotonic() - started < 3
