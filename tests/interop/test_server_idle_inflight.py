"""The idle timeout counts a command still running on the worker pool as activity.

A FLUSH that takes longer than ``--idle-timeout`` (here a memory backend whose flush waits for
the test's signal, on the real transmission loop over a socket pair, with the timeout armed the
way the server arms it) must not end the connection: the client gets the FLUSH reply and can go
on with more requests (a command answered during a wait also counts, so the client gets a whole
timeout after the reply). Once nothing is running and the client stays quiet, the timeout
still ends the connection.
"""

from __future__ import annotations

import pytest

from nbdserver.protocol import wire
from nbdserver.protocol.constants import Command
from tests.interop.test_server_out_of_order import SlowFlush, reply
from tests.interop.test_server_robustness import recv_exact
from tests.interop.transmission_harness import start_transmission

pytestmark = pytest.mark.interop

IDLE = 0.3


def test_a_flush_slower_than_the_idle_timeout_does_not_end_the_connection() -> None:
    backend = SlowFlush(1 << 20)
    backend.pwrite(b"k" * 512, 0, fua=False)
    srv = start_transmission(backend, idle_timeout=IDLE)
    client, thread, ended = srv.client, srv.thread, srv.ended
    try:
        client.sendall(wire.pack_request(0, Command.NBD_CMD_FLUSH, 1, 0, 0))
        assert backend.flushing.wait(10)
        # Several idle timeouts pass while the FLUSH runs.
        thread.join(4 * IDLE)
        assert thread.is_alive() and not ended
        backend.release.set()
        assert reply(client) == (0, 1)
        # The connection is still served after the slow command.
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 2, 0, 512))
        assert reply(client) == (0, 2)
        assert recv_exact(client, 512) == b"k" * 512
        # Nothing running and a quiet client: the idle timeout ends it as before.
        thread.join(10)
        assert not thread.is_alive()
        assert len(ended) == 1 and isinstance(ended[0], (TimeoutError, BlockingIOError))
    finally:
        backend.release.set()
        client.close()
        thread.join(10)
