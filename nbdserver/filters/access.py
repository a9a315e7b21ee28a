"""Access modes: read-only exports and the single-writer rule.

Why: two hosts writing one ordinary filesystem image corrupt it. ``ReadOnlyFilter`` turns off
every write capability, so the protocol core advertises NBD_FLAG_READ_ONLY and answers writes with
NBD_EPERM before any backend sees them. ``WriterLease`` lets exactly one client *host* (all its
connections: multi-conn from one kernel is one writer) hold write access; every other host gets
the export read-only for that connection, until the writer's last connection closes.

It must not: decide by anything an attacker controls more cheaply than the peer address, or leak
a lease when a connection dies (``release`` is called from the connection's ``finally``).
"""

from __future__ import annotations

import threading

from nbdserver.backends.base import Backend
from nbdserver.filters.base import Filter


class ReadOnlyFilter(Filter):
    """The inner backend with every write capability off; writes raise EROFS regardless."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.can_write = False
        self.can_trim = self.can_zero = self.can_fast_zero = False
        self.can_fua = False

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        raise OSError(30, "export is read-only")  # EROFS -> NBD_EPERM

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise OSError(30, "export is read-only")

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        raise OSError(30, "export is read-only")


class WriterLease:
    """Which host may write an export; reference-counted per host across its connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: str | None = None
        self._count = 0

    @property
    def holder(self) -> str | None:
        return self._holder

    def acquire(self, host: str) -> bool:
        """True if ``host`` may write on this new connection (it is, or becomes, the writer)."""
        with self._lock:
            if self._holder is None:
                self._holder, self._count = host, 1
                return True
            if self._holder == host:
                self._count += 1
                return True
            return False

    def release(self, host: str) -> None:
        """Called once per connection that ``acquire`` granted, when it closes."""
        with self._lock:
            if self._holder != host:
                return
            self._count -= 1
            if self._count <= 0:
                self._holder, self._count = None, 0


class CapsFilter(Filter):
    """Switch advertised capabilities off (or rotational on), as nbd-server's per-export
    ``trim``, ``flush``, ``fua`` and ``rotational`` keys do. It can only take away what the
    backend has: turning ``trim`` on for a backend that cannot trim changes nothing."""

    def __init__(
        self,
        inner: Backend,
        *,
        trim: bool = True,
        flush: bool = True,
        fua: bool = True,
        rotational: bool | None = None,
    ) -> None:
        super().__init__(inner)
        self.can_trim = inner.can_trim and trim
        self.can_flush = inner.can_flush and flush
        self.can_fua = inner.can_fua and fua
        if rotational is not None:
            self.is_rotational = rotational
