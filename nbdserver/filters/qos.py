"""Per-export rate limits: token buckets for read/write bytes per second and IOPS.

Why: several clients share one export (and one disk); without limits one noisy client can starve
the others. Each configured limit is a bucket shared by every connection of the export, so the
limit holds for the export as a whole, not per connection.

How: a bucket holds at most ``burst`` tokens (one second's worth by default) and refills at
``rate`` per second. A request takes its tokens at once and, if that drives the bucket negative,
waits for the deficit to refill before it is served. Requests larger than the burst are allowed
(they just wait longer), so a limit can never deadlock a legal request. Waiting is done outside
the bucket's lock, so one slow request never blocks the bookkeeping of the others.

It must not cost anything when no limit is configured: ``wrap_qos`` returns the backend itself
then, and an unset direction has no bucket at all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nbdserver.backends.base import Backend
from nbdserver.filters.base import Filter


@dataclass(frozen=True)
class QosLimits:
    """Zero or None means unlimited."""

    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    @property
    def any(self) -> bool:
        return any((self.read_bps, self.write_bps, self.read_iops, self.write_iops))

    def __post_init__(self) -> None:
        for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"QoS limit {name} must not be negative, got {value}")


class TokenBucket:
    """Thread-safe token bucket; ``clock`` and ``sleep`` are injectable for tests."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self, amount: float) -> float:
        """Take ``amount`` tokens, waiting as long as the bucket needs; returns the wait."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= amount
            deficit = -self._tokens
        if deficit <= 0:
            return 0.0
        wait = deficit / self.rate
        self._sleep(wait)
        return wait


def _bucket(rate: int | None) -> TokenBucket | None:
    return TokenBucket(rate) if rate else None


class QosFilter(Filter):
    """Charges reads to the read buckets and writes, zeroes and trims to the write buckets.

    Zeroes and trims move no payload, so they cost a write operation but no write bytes.
    """

    def __init__(self, inner: Backend, limits: QosLimits) -> None:
        super().__init__(inner)
        self.limits = limits
        self._read_bytes = _bucket(limits.read_bps)
        self._write_bytes = _bucket(limits.write_bps)
        self._read_ops = _bucket(limits.read_iops)
        self._write_ops = _bucket(limits.write_iops)

    def pread(self, buf: memoryview, offset: int) -> None:
        if self._read_ops is not None:
            self._read_ops.take(1)
        if self._read_bytes is not None:
            self._read_bytes.take(len(buf))
        self.inner.pread(buf, offset)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        if self._write_ops is not None:
            self._write_ops.take(1)
        if self._write_bytes is not None:
            self._write_bytes.take(len(data))
        self.inner.pwrite(data, offset, fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if self._write_ops is not None:
            self._write_ops.take(1)
        self.inner.zero(offset, length, may_trim, fast, fua)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        if self._write_ops is not None:
            self._write_ops.take(1)
        self.inner.trim(offset, length, fua)

    def fileno(self) -> int | None:
        # A sendfile fast path would bypass pread and with it the read limits.
        if self._read_bytes is not None or self._read_ops is not None:
            return None
        return self.inner.fileno()


def wrap_qos(backend: Backend, limits: QosLimits | None) -> Backend:
    """The backend with limits applied, or the very same object when there are none."""
    if limits is None or not limits.any:
        return backend
    return QosFilter(backend, limits)
