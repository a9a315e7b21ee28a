"""Per-volume (and per-path) operation locks for the CSI node service.

Why it exists: the CSI spec lets a CO that lost track send concurrent calls for one volume; the
plugin must not interleave two of them (attach twice, format while mounting). One global mutex
would serialise every volume on the node behind a slow attach, so each key gets its own lock,
taken without waiting: a second call for a busy volume gets ABORTED ("operation pending for
volume") and kubelet retries with backoff, as the spec's error table describes.

What it must not do: wait (a blocked gRPC call ties up kubelet's worker), or keep locks for
volumes nobody is operating on (entries are dropped on release).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from nbd_agent.csi.errors import Aborted


class VolumeLocks:
    """A set of busy keys; ``hold(keys)`` takes all of them or none."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        wanted = {k for k in keys if k}
        with self._guard:
            clash = sorted(wanted & self._busy)
            if clash:
                raise Aborted(f"an operation is already pending for {clash[0]}")
            self._busy |= wanted
        try:
            yield
        finally:
            with self._guard:
                self._busy -= wanted

    def busy(self) -> Iterable[str]:
        with self._guard:
            return sorted(self._busy)
