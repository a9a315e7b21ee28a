"""What the edge needs from whoever hosts it: the narrow interface a ``Connection`` calls.

Why: the connection code used to call the ``Server`` object (and the server imported the
connection): an import cycle, and every server attribute was within the edge's reach. The
edge now depends on this protocol alone; ``nbdserver.server.Server`` implements it.

What it must not do: grow beyond what a connection needs at its life's points.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any, Protocol

from nbdserver.backends.base import Backend
from nbdserver.exports import Export
from nbdserver.protocol.events import ExportInfo, Refused
from nbdserver.protocol.handshake import TlsPolicy

Lister = Callable[[], Iterable[ExportInfo]]


class Peer(Protocol):
    """The connection as the host sees it (the host keeps its own records about it)."""

    peer: str
    last_progress: float  # monotonic time of the last answered handshake option


class Host(Protocol):
    @property
    def handshake_timeout(self) -> float:
        """The longest a client may take to complete one handshake option."""

    @property
    def tls_policy(self) -> TlsPolicy: ...

    @property
    def pool(self) -> Executor:
        """FLUSH, TRIM, WRITE_ZEROES and CACHE run here."""

    @property
    def stop_fd(self) -> int:
        """Readable once the server is stopping."""

    @property
    def stopping(self) -> bool: ...

    def opened(self, conn: Peer) -> None:
        """The connection's thread started."""

    def lister(self, conn: Peer) -> Lister | None:
        """NBD_OPT_LIST's answer for this client, or None when listing is refused."""

    def resolve(self, name: str, conn: Peer) -> ExportInfo | Refused | None:
        """What the client is told about export ``name`` (None: no such export)."""

    def start_tls(self, sock: socket.socket, conn: Peer) -> socket.socket:
        """NBD_OPT_STARTTLS was acknowledged: the TLS socket."""

    def attach(self, name: str, conn: Peer) -> tuple[Export, Backend, Any] | str:
        """The export the client negotiated, the backend its transmission calls and a wrapper
        for its reply encoder; or why it cannot attach."""

    def handshake_done(self, conn: Peer) -> None:
        """The handshake ended (either way): the connection no longer counts as pending."""

    def detach(self, conn: Peer) -> None:
        """The connection is over: release what ``attach`` and ``resolve`` took."""
