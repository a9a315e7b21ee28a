"""A graceful stop (SIGTERM) on a TLS connection: replies still owed to the client go out
encrypted, then the connection ends; nothing is ever sent in clear text after STARTTLS.

(TLS itself is configured by the security layer, docs/security.md; this test is about the
edge's shutdown path, which must not strip TLS from a live socket.)
"""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import pytest

from nbdserver.client import connect
from nbdserver.protocol import wire
from nbdserver.protocol.constants import NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, Command
from tests.interop.conftest import NbdServerFactory
from tests.interop.security_helpers import make_pki

pytestmark = pytest.mark.interop


def test_sigterm_with_reads_in_flight_over_tls_ends_cleanly(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    srv = nbdserver(
        "--tls", "require", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        size="16M",
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    conn = connect(srv.uri, tls_context=ctx)
    assert conn.details.tls
    sock = conn.sock
    sock.settimeout(30)
    n = 3000
    sock.sendall(
        b"".join(
            wire.REQUEST.pack(
                NBD_REQUEST_MAGIC, 0, Command.NBD_CMD_READ, i, (i % 4096) * 4096, 4096
            )
            for i in range(n)
        )
    )
    replies = {0: 0, 108: 0}
    buf = b""
    signalled = False
    while True:
        chunk = sock.recv(65536)  # an SSL error here means clear text arrived: the test fails
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 16:
            magic, err, cookie = wire.SIMPLE_REPLY.unpack_from(buf)
            assert magic == NBD_SIMPLE_REPLY_MAGIC and err in replies and cookie < n
            need = 16 + (4096 if err == 0 else 0)
            if len(buf) < need:
                break
            buf = buf[need:]
            replies[err] += 1
            if not signalled:
                srv.proc.send_signal(signal.SIGTERM)
                signalled = True
    assert buf == b""
    assert signalled and replies[0] >= 1
    assert srv.proc.wait(30) == 0
    conn.close()
    srv.wait_log("ended .*server shutting down")
