"""Hostile and unlucky clients: malformed packets over raw sockets, idle handshakes, connection
limits, and SIGTERM with writes in flight. After each, the server still serves others, and no
acknowledged write is lost."""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import threading

import pytest

from nbdserver.client import NBDConnection, NBDServerRefused, connect
from nbdserver.protocol import wire
from nbdserver.protocol.constants import NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, Command
from tests.interop.conftest import NbdServerFactory, Server

pytestmark = pytest.mark.interop

EINVAL, ENOSPC, ESHUTDOWN = 22, 28, 108


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def simple_reply(sock: socket.socket) -> tuple[int, int]:
    magic, err, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(sock, 16))
    assert magic == NBD_SIMPLE_REPLY_MAGIC
    return err, cookie


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes: recv returns EOF (or a reset) before ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def assert_still_serving(srv: Server) -> None:
    with connect(srv.uri) as c:
        c.pwrite(b"alive" * 100, 4096)
        assert c.pread(4096, 500) == b"alive" * 100
        c.disconnect()


def raw(srv: Server) -> NBDConnection:
    """A negotiated connection with simple replies; tests then speak raw bytes on ``.sock``."""
    c = connect(srv.uri)
    c.sock.settimeout(10)
    return c


def request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return wire.REQUEST.pack(NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xde\xad\xbe\xef" + bytes(24), id="bad-magic"),
        pytest.param(request(0, Command.NBD_CMD_WRITE, 1, 0, 0xFFFFFFFF), id="oversized-write"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", id="http"),
    ],
)
def test_a_malformed_request_closes_only_that_connection(
    nbdserver: NbdServerFactory, garbage: bytes
) -> None:
    srv = nbdserver(size="1M")
    bystander = raw(srv)
    victim = raw(srv)
    victim.sock.sendall(garbage)
    assert closed_by_server(victim.sock)
    victim.close()
    # the bystander's connection is untouched
    bystander.sock.sendall(request(0, Command.NBD_CMD_READ, 7, 0, 512))
    assert simple_reply(bystander.sock) == (0, 7)
    assert recv_exact(bystander.sock, 512) == bytes(512)
    bystander.disconnect()
    assert_still_serving(srv)
    srv.wait_log(r"ended .*(magic|too large|exceeds)")


def test_a_truncated_header_then_eof_is_logged_and_survived(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="1M")
    c = raw(srv)
    c.sock.sendall(request(0, Command.NBD_CMD_READ, 1, 0, 512)[:13])
    c.sock.shutdown(socket.SHUT_WR)
    assert closed_by_server(c.sock)
    c.close()
    srv.wait_log(r"ended .*mid-request")
    assert_still_serving(srv)


@pytest.mark.parametrize(
    ("flags", "cmd", "offset", "length", "err"),
    [
        pytest.param(0, Command.NBD_CMD_READ, 1 << 20, 512, EINVAL, id="read-beyond-end"),
        pytest.param(0, Command.NBD_CMD_READ, (1 << 64) - 512, 512, EINVAL, id="read-wrapping"),
        pytest.param(0, 99, 0, 512, EINVAL, id="unknown-command"),
        pytest.param(1 << 9, Command.NBD_CMD_READ, 0, 512, EINVAL, id="unknown-flag"),
        pytest.param(0, Command.NBD_CMD_FLUSH, 4096, 0, EINVAL, id="flush-with-offset"),
        pytest.param(0, Command.NBD_CMD_TRIM, 0, 0, EINVAL, id="zero-length-trim"),
        pytest.param(0, Command.NBD_CMD_BLOCK_STATUS, 0, 512, EINVAL, id="status-unnegotiated"),
        pytest.param(0, Command.NBD_CMD_WRITE_ZEROES, 1 << 20, 512, ENOSPC, id="zero-past-end"),
    ],
)
def test_invalid_requests_get_an_error_reply_and_the_connection_goes_on(
    nbdserver: NbdServerFactory, flags: int, cmd: int, offset: int, length: int, err: int
) -> None:
    srv = nbdserver(size="1M")
    c = raw(srv)
    c.sock.sendall(request(flags, cmd, 41, offset, length))
    assert simple_reply(c.sock) == (err, 41)
    c.sock.sendall(request(0, Command.NBD_CMD_WRITE, 42, 0, 4) + b"abcd")
    assert simple_reply(c.sock) == (0, 42)
    c.sock.sendall(request(0, Command.NBD_CMD_WRITE, 43, (1 << 20) - 2, 4) + b"wxyz")
    assert simple_reply(c.sock) == (ENOSPC, 43)  # payload skipped: the stream stays in step
    c.sock.sendall(request(0, Command.NBD_CMD_READ, 44, 0, 4))
    assert simple_reply(c.sock) == (0, 44) and recv_exact(c.sock, 4) == b"abcd"
    c.disconnect()


def test_pipelined_requests_are_all_answered(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="4M")
    c = raw(srv)
    batch = b"".join(
        request(0, Command.NBD_CMD_WRITE, i, i * 4096, 4096) + bytes([i]) * 4096
        for i in range(1, 200)
    )
    batch += request(0, Command.NBD_CMD_FLUSH, 500, 0, 0)
    batch += b"".join(request(0, Command.NBD_CMD_READ, 1000 + i, i * 4096, 4096) for i in (1, 77))
    c.sock.sendall(batch)
    seen: dict[int, int] = {}
    reads: dict[int, bytes] = {}
    while len(seen) < 202:
        err, cookie = simple_reply(c.sock)
        assert cookie not in seen
        seen[cookie] = err
        if cookie >= 1000:
            reads[cookie] = recv_exact(c.sock, 4096)
    assert set(seen.values()) == {0}
    assert reads == {1001: b"\x01" * 4096, 1077: bytes([77]) * 4096}
    c.disconnect()


def test_idle_handshake_times_out(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver("--handshake-timeout", "0.5", size="1M")
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        assert recv_exact(s, 18)[:8] == b"NBDMAGIC"
        assert closed_by_server(s, timeout=10)
    srv.wait_log("handshake timed out")
    assert_still_serving(srv)


def test_global_connection_limit_refuses_the_extra_client(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver("--max-connections", "1", size="1M")
    first = raw(srv)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        assert closed_by_server(s)  # closed before any greeting byte
    srv.wait_log("connection limit of 1 reached")
    first.disconnect()
    srv.wait_log("ended .*NBD_CMD_DISC")
    assert_still_serving(srv)


def test_per_export_connection_limit(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver("--connections", "1", size="1M")
    first = raw(srv)
    with pytest.raises(NBDServerRefused, match=r"NBD_REP_ERR_POLICY: .*limit of 1 connections"):
        connect(srv.uri)
    first.disconnect()
    srv.wait_log("ended .*NBD_CMD_DISC")
    assert_still_serving(srv)


def test_sigterm_with_writes_in_flight_loses_no_acknowledged_write(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(size="64M")
    c = raw(srv)
    sock = c.sock
    n, size = 600, 65536
    acked: list[int] = []
    errors: list[int] = []
    bad_errors: list[int] = []
    first_reply = threading.Event()

    def reader() -> None:
        try:
            while True:
                err, cookie = simple_reply(sock)
                (errors if err else acked).append(cookie)
                if err:
                    bad_errors.extend([err] if err != ESHUTDOWN else [])
                first_reply.set()
        except (EOFError, OSError):
            first_reply.set()

    t = threading.Thread(target=reader)
    t.start()

    def writer() -> None:
        try:
            for i in range(n):
                payload = struct.pack(">I", i) * (size // 4)
                sock.sendall(request(0, Command.NBD_CMD_WRITE, i, i * size, size) + payload)
        except OSError:
            pass  # the server stopped reading: fine

    w = threading.Thread(target=writer)
    w.start()
    assert first_reply.wait(20)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    w.join(30)
    t.join(30)
    c.close()
    assert not bad_errors, bad_errors
    ok = acked
    assert ok, "no write was acknowledged before the stop"
    assert srv.image is not None
    data = srv.image.read_bytes()
    for i in ok:
        assert data[i * size : (i + 1) * size] == struct.pack(">I", i) * (size // 4), i
    text = srv.text()
    assert "received SIGTERM" in text and "stopped cleanly" in text
    assert "ended after" in text and "server shutting down" in text


def test_unix_socket_listener(nbdserver: NbdServerFactory, tmp_path: object) -> None:
    path = f"{tmp_path}/nbd.sock"
    srv = nbdserver("--unix", path, "--no-tcp", size="2M")
    out = subprocess.run(
        ["nbdinfo", f"nbd+unix:///?socket={path}"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "export-size: 2097152" in out.stdout, out.stderr
    assert srv.stop() == 0


def test_logs_say_who_connected_to_which_export_and_why_it_ended(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver("--name", "logged", size="1M")
    with connect(srv.uri + "logged") as c:
        port = c.sock.getsockname()[1]
        c.disconnect()
    srv.wait_log(rf"connection from 127\.0\.0\.1:{port}$")
    srv.wait_log(rf"127\.0\.0\.1:{port} attached to export 'logged'")
    srv.wait_log(rf"127\.0\.0\.1:{port} to export 'logged' ended .*NBD_CMD_DISC")


def test_sigterm_lets_an_idle_connection_go_at_once(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="1M")
    idle = raw(srv)
    in_handshake = socket.create_connection(("127.0.0.1", srv.port))
    srv.wait_log("attached to export")
    srv.proc.send_signal(signal.SIGTERM)
    # well inside --shutdown-timeout (30 s): nobody waits for a client that says nothing
    assert srv.proc.wait(10) == 0
    assert closed_by_server(idle.sock, timeout=5)
    assert closed_by_server(in_handshake, timeout=5)
    idle.close()
    in_handshake.close()
