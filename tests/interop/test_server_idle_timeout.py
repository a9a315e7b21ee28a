"""``--idle-timeout`` (nbd-server's per-export ``timeout``): a connection in transmission that
sends no request for S seconds is closed and the log says "idle timeout"; a connection that
keeps sending requests lives on however long it lasts; the same over TLS. Waits are on socket
states and log lines, never sleeps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nbdserver.client import connect
from nbdserver.protocol.constants import Command
from tests.interop.conftest import NbdServerFactory
from tests.interop.security_helpers import make_pki, serve, wait_for
from tests.interop.test_server_robustness import (
    closed_by_server,
    raw,
    recv_exact,
    request,
    simple_reply,
)

pytestmark = pytest.mark.interop


def test_an_idle_client_is_disconnected_and_a_busy_one_is_not(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver("--idle-timeout", "0.5", "--handshake-timeout", "30", size="1M")
    busy, idle = raw(srv), raw(srv)
    try:
        # The busy client outlives several timeouts: only silence counts, not age.
        started, cookie = time.monotonic(), 0
        while time.monotonic() - started < 2.0:
            cookie += 1
            busy.sock.sendall(request(0, Command.NBD_CMD_READ, cookie, 0, 512))
            assert simple_reply(busy.sock) == (0, cookie)
            assert recv_exact(busy.sock, 512) == bytes(512)
        assert closed_by_server(idle.sock, timeout=10)
        srv.wait_log(r"ended after .*: idle timeout \(0\.5 s without a request\)")
        busy.sock.sendall(request(0, Command.NBD_CMD_READ, 0, 0, 512))
        assert simple_reply(busy.sock) == (0, 0)  # still served
        recv_exact(busy.sock, 512)
        busy.disconnect()
        assert "handshake timed out" not in srv.text()
    finally:
        busy.close()
        idle.close()


def test_per_export_idle_timeout_wins_over_the_flag(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(
        "--idle-timeout", "600", "--export", "quick=memory,size=1M,idle-timeout=0.3", size="1M"
    )  # fmt: skip
    with connect(srv.export_uri("quick")) as c:
        assert closed_by_server(c.sock, timeout=10)
    srv.wait_log(r"export 'quick' ended after .*: idle timeout \(0\.3 s without a request\)")


def test_idle_timeout_over_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    args = ["--backend", "memory", "--size", "1M", "--idle-timeout", "0.4", "--tls", "require",
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]  # fmt: skip
    with serve(args, tmp_path) as srv:
        uri = f"nbds://localhost:{srv.port}/?tls-certificates={pki.client_dir_no_cert}"
        with connect(uri) as c:
            c.pwrite(b"tls" * 100, 0)  # a working TLS session first
            assert c.pread(0, 300) == b"tls" * 100
            assert closed_by_server(c.sock, timeout=10)
        wait_for(lambda: "idle timeout (0.4 s without a request)" in srv.log(), what="the log")
