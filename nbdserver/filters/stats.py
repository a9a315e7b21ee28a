"""A filter that times every backend call into a connection's ``ConnStats``.

Why: the simplest way to give the edge per-export, per-command metrics without touching its
request loop; the edge wraps a connection's backend with this only when metrics are on, so a
server without ``--metrics-port`` runs exactly the code it would without metrics.

It must not change behaviour: errors are recorded and re-raised unchanged. Its ``fileno`` is
None so reads go through ``pread`` and are counted (an edge that records reads itself around a
sendfile path can use ``ConnStats.record`` directly instead of this filter).
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from time import perf_counter_ns

from nbdserver.backends.base import Backend, Extent
from nbdserver.filters.base import Filter
from nbdserver.metrics import (
    BOUNDS_NS,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    ConnStats,
)


class StatsFilter(Filter):
    def __init__(self, inner: Backend, stats: ConnStats) -> None:
        super().__init__(inner)
        self.stats = stats
        # Reads, writes and block status run on the connection's own thread; the slow commands
        # may run on a shared worker pool, several at once, so their recording takes a lock
        # (negligible next to a flush, trim or zero).
        self._slow_lock = threading.Lock()
        self._pread = inner.pread
        self._pwrite = inner.pwrite

    # Reads and writes are the hot path: the bookkeeping of ConnStats.record is inlined here
    # (a method call would cost more than the counting itself).
    def pread(self, buf: memoryview, offset: int) -> None:
        t0 = perf_counter_ns()
        try:
            self._pread(buf, offset)
        except OSError as exc:
            self.stats.record(CMD_READ, 0, perf_counter_ns() - t0, exc.errno or 5)
            raise
        dt = perf_counter_ns() - t0
        st = self.stats
        st.ops[CMD_READ] += 1
        st.bytes[CMD_READ] += len(buf)
        st.latency_ns[CMD_READ] += dt
        st.buckets[CMD_READ][bisect_left(BOUNDS_NS, dt)] += 1

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        t0 = perf_counter_ns()
        try:
            self._pwrite(data, offset, fua)
        except OSError as exc:
            self.stats.record(CMD_WRITE, 0, perf_counter_ns() - t0, exc.errno or 5)
            raise
        dt = perf_counter_ns() - t0
        st = self.stats
        st.ops[CMD_WRITE] += 1
        st.bytes[CMD_WRITE] += len(data)
        st.latency_ns[CMD_WRITE] += dt
        st.buckets[CMD_WRITE][bisect_left(BOUNDS_NS, dt)] += 1

    def _timed(self, cmd: int, fn, *args: object) -> object:  # type: ignore[no-untyped-def]
        t0 = perf_counter_ns()
        try:
            result = fn(*args)
        except OSError as exc:
            with self._slow_lock:
                self.stats.record(cmd, 0, perf_counter_ns() - t0, exc.errno or 5)
            raise
        with self._slow_lock:
            self.stats.record(cmd, 0, perf_counter_ns() - t0)
        return result

    def flush(self) -> None:
        self._timed(CMD_FLUSH, self.inner.flush)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._timed(CMD_TRIM, self.inner.trim, offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._timed(CMD_WRITE_ZEROES, self.inner.zero, offset, length, may_trim, fast, fua)

    def extents(self, offset: int, length: int) -> list[Extent]:
        t0 = perf_counter_ns()
        try:
            result = self.inner.extents(offset, length)
        except OSError as exc:
            self.stats.record(CMD_BLOCK_STATUS, 0, perf_counter_ns() - t0, exc.errno or 5)
            raise
        self.stats.record(CMD_BLOCK_STATUS, 0, perf_counter_ns() - t0)
        return result

    def cache(self, offset: int, length: int) -> None:
        self._timed(CMD_CACHE, self.inner.cache, offset, length)

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        # The connection's view closes; the shared backend below belongs to the export.
        return
