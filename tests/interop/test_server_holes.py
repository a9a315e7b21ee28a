"""READ replies with OFFSET_HOLE chunks: holes of a large read are not sent as zero bytes.

Byte level: the real transmission loop on a socket pair over a memory backend, with structured
replies negotiated, answers a 256 KiB read of [hole | data | hole] with exactly three chunks;
a 4 KiB read (the hot path) and a read with DF stay one OFFSET_DATA chunk. Then libnbd's
chunk callback (nbdsh) sees NBD_REPLY_TYPE_OFFSET_HOLE on a sparse file export, and the data
it assembles is right.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading

import pytest

from nbdserver.backends.memory import MemoryBackend
from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    NBD_REPLY_FLAG_DONE,
    NBD_STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    ReplyType,
    TransmissionFlag,
)
from tests.interop.conftest import NbdServerFactory
from tests.interop.test_server_libnbd import SYSTEM_ENV
from tests.interop.test_server_robustness import recv_exact
from tests.interop.transmission_harness import start_transmission

pytestmark = pytest.mark.interop

KIB = 1024
DATA = int(ReplyType.NBD_REPLY_TYPE_OFFSET_DATA)
HOLE = int(ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE)
DONE = NBD_REPLY_FLAG_DONE


def serve_structured(backend: MemoryBackend) -> tuple[socket.socket, threading.Thread]:
    srv = start_transmission(
        backend, structured=True, extra_flags=TransmissionFlag.NBD_FLAG_SEND_DF, workers=1
    )
    return srv.client, srv.thread


def chunks(sock: socket.socket) -> list[tuple[int, int, bytes]]:
    """(flags, type, payload) of every chunk of one reply, up to the DONE flag."""
    out = []
    while True:
        magic, flags, rtype, _cookie, length = wire.STRUCTURED_REPLY.unpack(recv_exact(sock, 20))
        assert magic == NBD_STRUCTURED_REPLY_MAGIC
        out.append((flags, rtype, recv_exact(sock, length)))
        if flags & DONE:
            return out


def test_a_large_read_sends_its_holes_as_offset_hole_chunks() -> None:
    backend = MemoryBackend(1 << 20)
    backend.pwrite(b"d" * (64 * KIB), 128 * KIB, fua=False)  # data at [128K, 192K)
    client, thread = serve_structured(backend)
    try:
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 7, 64 * KIB, 256 * KIB))
        assert chunks(client) == [
            (0, HOLE, struct.pack(">QI", 64 * KIB, 64 * KIB)),
            (0, DATA, struct.pack(">Q", 128 * KIB) + b"d" * (64 * KIB)),
            (DONE, HOLE, struct.pack(">QI", 192 * KIB, 128 * KIB)),
        ]
        # A wholly unallocated read: a single hole chunk.
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 8, 512 * KIB, 128 * KIB))
        assert chunks(client) == [(DONE, HOLE, struct.pack(">QI", 512 * KIB, 128 * KIB))]
        # Small reads stay on the hot path: one data chunk, zeroes included.
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 9, 0, 4 * KIB))
        assert chunks(client) == [(DONE, DATA, struct.pack(">Q", 0) + bytes(4 * KIB))]
        # DF: the client wants one chunk, so the holes go out as data.
        df = int(CommandFlag.NBD_CMD_FLAG_DF)
        client.sendall(wire.pack_request(df, Command.NBD_CMD_READ, 10, 64 * KIB, 128 * KIB))
        want = bytes(64 * KIB) + b"d" * (64 * KIB)
        assert chunks(client) == [(DONE, DATA, struct.pack(">Q", 64 * KIB) + want)]
        client.sendall(wire.pack_request(0, Command.NBD_CMD_DISC, 11, 0, 0))
    finally:
        thread.join(10)
        client.close()
    assert not thread.is_alive()


NBDSH_HOLES = """
import nbd
h = nbd.NBD()
h.connect_uri(URI)
assert h.get_structured_replies_negotiated()
M = 1 << 20
h.pwrite(b"a" * 65536, M + 65536)       # data at [1M+64K, 1M+128K), the rest a hole
seen = []
def chunk(sub, offset, status, err):
    seen.append((status, offset, len(sub)))
    return 0
buf = h.pread_structured(M, M, chunk)
assert buf == bytes(65536) + b"a" * 65536 + bytes(M - 131072), "wrong data"
holes = sorted((o, n) for s, o, n in seen if s == nbd.READ_HOLE)
data = sorted((o, n) for s, o, n in seen if s == nbd.READ_DATA)
assert holes == [(M, 65536), (M + 131072, M - 131072)], seen
assert data == [(M + 65536, 65536)], seen
seen.clear()
buf = h.pread_structured(M, M, chunk, nbd.CMD_FLAG_DF)
assert buf == bytes(65536) + b"a" * 65536 + bytes(M - 131072)
assert seen == [(nbd.READ_DATA, M, M)], seen
seen.clear()
assert h.pread_structured(4096, 0, chunk) == bytes(4096)
assert seen == [(nbd.READ_DATA, 0, 4096)], seen
print("ok")
"""


def test_libnbd_sees_hole_chunks_on_a_sparse_file(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="4M")
    res = subprocess.run(
        ["/usr/bin/python3", "-c", f"URI = {srv.uri!r}\n" + NBDSH_HOLES],
        capture_output=True, text=True, timeout=60, env=SYSTEM_ENV,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
