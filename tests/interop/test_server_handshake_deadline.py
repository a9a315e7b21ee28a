"""``--handshake-timeout`` bounds each step of the negotiation, the TLS handshake included.

The clock starts again whenever an option is answered (a client making progress is never cut;
tests/interop/test_server_handshake_starvation.py). A client that stalls the TLS handshake after
NBD_OPT_STARTTLS must be cut one budget after the STARTTLS reply, never later (the TLS
handshake once took a socket timeout left over from an earlier receive as its own).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.interop.security_helpers import make_pki, serve, wait_for
from tests.interop.test_server_handshake_shutdown import IHAVEOPT, opt, reply
from tests.interop.test_server_robustness import closed_by_server, recv_exact

pytestmark = pytest.mark.interop

BUDGET = 3.0  # --handshake-timeout
STALL_AT = 2.2  # the client sends STARTTLS this long after connecting, then stalls
OPT_STARTTLS, ACK = 5, 1


def test_a_stalled_tls_handshake_is_cut_one_budget_after_the_starttls_reply(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    args = ["--backend", "memory", "--size", "1M", "--tls", "on",
            "--handshake-timeout", str(BUDGET),
            "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]  # fmt: skip
    with serve(args, tmp_path) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            started = time.monotonic()
            assert recv_exact(s, 18)[:16] == b"NBDMAGIC" + IHAVEOPT
            s.sendall(struct.pack(">I", 3))
            # Wait on the socket (the server must not close it early), up to STALL_AT.
            readable, _, _ = select.select([s], [], [], STALL_AT - (time.monotonic() - started))
            assert not readable, "the server closed or spoke before its budget was used up"
            s.sendall(opt(OPT_STARTTLS))
            assert reply(s) == (OPT_STARTTLS, ACK, b"")
            acked = time.monotonic()
            # No ClientHello follows. The server must give up BUDGET after its reply.
            assert closed_by_server(s, timeout=10)
            elapsed = time.monotonic() - acked
        finally:
            s.close()
        assert BUDGET - 0.2 < elapsed < BUDGET + 1.2, elapsed
        wait_for(lambda: "TLS handshake failed" in srv.log(), what="the log line")
