"""The TLS bridge pumps bytes both ways and turns either side's end into the other's (owner:
agent engineer). Real TLS over loopback (trustme certificates), no kernel needed."""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest
import trustme
from nbd_agent.tlsproxy import TlsProxy


@pytest.fixture
def tls_pair():
    """(client SSLSocket, server SSLSocket) connected over 127.0.0.1."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[ssl.SSLSocket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(server_ctx.wrap_socket(conn, server_side=True))

    t = threading.Thread(target=accept)
    t.start()
    raw = socket.create_connection(listener.getsockname(), timeout=10)
    client = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    t.join(10)
    server = accepted[0]
    server.settimeout(10)
    try:
        yield client, server
    finally:
        for s in (client, server, listener):
            s.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def test_bytes_flow_both_ways_through_the_bridge(tls_pair):
    client, server = tls_pair
    proxy = TlsProxy(client).start()
    kernel = proxy.kernel_end
    kernel.settimeout(10)
    request = os.urandom(3 << 20)  # larger than one chunk and than socket buffers

    def echo() -> None:
        server.sendall(_recv_exact(server, len(request))[::-1])

    t = threading.Thread(target=echo)
    t.start()
    kernel.sendall(request)
    assert _recv_exact(kernel, len(request)) == request[::-1]
    t.join(10)
    proxy.close()


def test_server_going_away_closes_the_kernel_side(tls_pair):
    client, server = tls_pair
    proxy = TlsProxy(client).start()
    proxy.kernel_end.settimeout(10)
    server.close()
    assert proxy.kernel_end.recv(1) == b""  # EOF: the kernel marks the link dead
    proxy.join(10)
    assert not proxy.alive


def test_kernel_side_closing_closes_the_tls_connection(tls_pair):
    client, server = tls_pair
    proxy = TlsProxy(client).start()
    proxy.kernel_end.close()
    proxy.join(10)
    assert not proxy.alive
    try:
        data = server.recv(1)
    except OSError:  # a reset instead of a clean close is also the end of the link
        data = b""
    assert data == b""
