"""Memory a connection keeps: measured as the RSS of a real ``nbdserver serve`` process.

A connection that once sent a 32 MiB write (or asked for a 32 MiB read) must not keep a
32 MiB buffer for the rest of its life, and connections of small requests must not cost the
full receive buffer and read arena each (before: 8 MiB resident per connection, 40 MiB after
one large request, so 256 connections could pin about 10 GiB). The image is a file on the test
filesystem, whose page cache does not count in the server's RSS.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdserver.client import connect
from tests.interop.conftest import NbdServerFactory

pytestmark = pytest.mark.interop

MIB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident bytes of the process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_large_request_does_not_leave_its_buffer_behind(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="96M")
    big = os.urandom(32 * MIB)
    with connect(srv.uri) as c:
        c.pwrite(b"s" * 4096, 0)
        assert c.pread(0, 4096) == b"s" * 4096
        before = rss(srv.proc.pid)
        c.pwrite(big, 8 * MIB)
        assert c.pread(8 * MIB, 32 * MIB) == big
        for i in range(16):  # back to small requests on the same connection
            c.pwrite(bytes([i]) * 4096, i * 4096)
            assert c.pread(i * 4096, 4096) == bytes([i]) * 4096
        after = rss(srv.proc.pid)
        c.disconnect()
    # A kept 32 MiB buffer would show as +32 MiB; allow the small buffers' touched pages and
    # allocator noise.
    assert after - before < 12 * MIB, f"RSS grew by {(after - before) / MIB:.1f} MiB"


def test_connections_of_small_requests_stay_small(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="16M")
    first = connect(srv.uri)
    conns = [first]
    try:
        first.pwrite(b"w" * 4096, 0)
        before = rss(srv.proc.pid)
        for _ in range(15):
            conns.append(connect(srv.uri))
        for i, c in enumerate(conns):
            for j in range(64):  # enough small requests to walk a non-compacting buffer
                c.pwrite(bytes([i]) * 4096, (j % 8) * 4096)
                c.pread(0, 4096)
        after = rss(srv.proc.pid)
    finally:
        for c in conns:
            c.disconnect()
    # 15 more connections at 8 MiB each (zero-filled buffers) would be +120 MiB.
    assert after - before < 40 * MIB, f"RSS grew by {(after - before) / MIB:.1f} MiB"
