"""Out-of-order replies on a real socket pair: a FLUSH that takes long does not hold back the
reads behind it, and NBD_CMD_DISC still delivers the FLUSH's reply before the connection ends.

The backend is a memory backend whose flush waits for the test's signal, so the ordering is
forced, not hoped for; everything else (edge loop, validator, encoder, pool) is the real code.
"""

from __future__ import annotations

import socket
import threading

from nbdserver.backends.memory import MemoryBackend
from nbdserver.protocol import wire
from nbdserver.protocol.constants import NBD_SIMPLE_REPLY_MAGIC, Command
from tests.interop.test_server_robustness import recv_exact
from tests.interop.transmission_harness import start_transmission


class SlowFlush(MemoryBackend):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.release = threading.Event()
        self.flushing = threading.Event()

    def flush(self) -> None:
        self.flushing.set()
        assert self.release.wait(10)


def reply(sock: socket.socket) -> tuple[int, int]:
    magic, err, cookie = wire.SIMPLE_REPLY.unpack(recv_exact(sock, 16))
    assert magic == NBD_SIMPLE_REPLY_MAGIC
    return err, cookie


def test_reads_pass_a_slow_flush_and_disc_waits_for_its_reply() -> None:
    backend = SlowFlush(1 << 20)
    backend.pwrite(b"r" * 512, 0, fua=False)
    srv = start_transmission(backend)
    client, thread, reasons = srv.client, srv.thread, srv.ended
    client.sendall(
        wire.pack_request(0, Command.NBD_CMD_FLUSH, 1, 0, 0)
        + wire.pack_request(0, Command.NBD_CMD_READ, 2, 0, 512)
    )
    assert backend.flushing.wait(10)
    # The read is answered while the flush is still running.
    assert reply(client) == (0, 2)
    assert recv_exact(client, 512) == b"r" * 512
    client.sendall(wire.pack_request(0, Command.NBD_CMD_DISC, 3, 0, 0))
    backend.release.set()
    assert reply(client) == (0, 1)  # the flush's reply comes before the close
    assert client.recv(1) == b""
    thread.join(10)
    assert reasons == ["client sent NBD_CMD_DISC"]
    client.close()
