"""Drive the server's transmission loop directly over a socket pair, with no handshake.

For tests that need to hold a backend call back (a slow FLUSH) or read replies byte by byte:
they build the export and the negotiated state the handshake would have produced, here, once.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nbdserver.backends.base import Backend
from nbdserver.config import ExportConfig
from nbdserver.edge.connection import _arm_idle_timeout, export_info
from nbdserver.edge.transmission import Transmission
from nbdserver.exports import Export
from nbdserver.protocol.constants import TransmissionFlag
from nbdserver.protocol.events import Negotiated


def negotiated_memory_export(
    backend: Backend, *, structured: bool = False, extra_flags: int = 0
) -> tuple[Export, Negotiated]:
    """The export "" over ``backend`` and what GO would have negotiated for it."""
    export = Export(ExportConfig(name="", backend="memory", size=backend.size()), backend)
    info = export_info(export)
    negotiated = Negotiated(
        export_name="",
        export=info,
        transmission_flags=info.flags | TransmissionFlag.NBD_FLAG_HAS_FLAGS | extra_flags,
        structured_replies=structured,
        extended_headers=False,
        meta_contexts=(),
        block_size_requested=False,
        tls=False,
        via_go=True,
    )
    return export, negotiated


@dataclass
class Running:
    """A transmission loop serving on a thread; ``ended`` gets what ``run()`` returned (the
    reason) or the exception it raised, once it stops."""

    client: socket.socket
    thread: threading.Thread
    ended: list[BaseException | str]


def start_transmission(
    backend: Backend,
    *,
    structured: bool = False,
    extra_flags: int = 0,
    workers: int = 2,
    idle_timeout: float | None = None,
) -> Running:
    """Serve ``backend`` as export "" on one end of a socket pair; the test holds the other.
    ``idle_timeout`` arms the connection's idle timeout as the edge does before transmission."""
    export, negotiated = negotiated_memory_export(
        backend, structured=structured, extra_flags=extra_flags
    )
    server_sock, client = socket.socketpair()
    if idle_timeout is not None:
        _arm_idle_timeout(server_sock, idle_timeout)
    pool = ThreadPoolExecutor(workers)
    tx = Transmission(server_sock, export, negotiated, pool=pool)
    ended: list[BaseException | str] = []

    def run() -> None:
        try:
            ended.append(tx.run())
        except BaseException as exc:  # an idle timeout surfaces as an exception (see connection)
            ended.append(exc)
        finally:
            server_sock.close()
            pool.shutdown()

    thread = threading.Thread(target=run)
    thread.start()
    client.settimeout(10)
    return Running(client, thread, ended)
