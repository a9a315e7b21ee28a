"""Token buckets and the QoS filter, on a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from nbdserver.backends.memory import MemoryBackend
from nbdserver.filters.qos import QosFilter, QosLimits, TokenBucket, wrap_qos


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_bucket_serves_the_burst_then_paces_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, clock=clock, sleep=clock.sleep)
    assert bucket.take(1000) == 0.0  # the first second's worth is already there
    assert bucket.take(500) == pytest.approx(0.5)
    assert bucket.take(500) == pytest.approx(0.5)
    # 10 000 tokens at 1000/s take 10 s of fake time however they are split.
    start = clock.now
    for _ in range(100):
        bucket.take(100)
    assert clock.now - start == pytest.approx(10.0)


def test_bucket_refills_while_idle_but_not_beyond_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, burst=200, clock=clock, sleep=clock.sleep)
    bucket.take(200)
    clock.now += 60  # a minute idle refills only up to the burst
    assert bucket.take(200) == 0.0
    assert bucket.take(100) == pytest.approx(1.0)


def test_request_larger_than_burst_waits_instead_of_deadlocking() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1 << 20, clock=clock, sleep=clock.sleep)
    assert bucket.take(32 << 20) == pytest.approx(31.0)


def test_no_limits_returns_the_backend_itself() -> None:
    backend = MemoryBackend(1 << 20)
    assert wrap_qos(backend, None) is backend
    assert wrap_qos(backend, QosLimits()) is backend
    assert isinstance(wrap_qos(backend, QosLimits(write_iops=10)), QosFilter)


def test_negative_limits_are_rejected() -> None:
    with pytest.raises(ValueError, match="read_bps must not be negative"):
        QosLimits(read_bps=-1)


def test_filter_charges_reads_and_writes_to_their_own_buckets() -> None:
    clock = FakeClock()
    qos = QosFilter(MemoryBackend(1 << 20), QosLimits(read_bps=4096, write_iops=2))
    for b in (qos._read_bytes, qos._write_ops):
        assert b is not None
        b._clock, b._sleep, b._stamp = clock, clock.sleep, 0.0
    buf = memoryview(bytearray(4096))
    qos.pread(buf, 0)  # within the burst
    qos.pwrite(b"x" * 4096, 0, False)  # write bytes are unlimited; one write op
    qos.zero(0, 4096, False, False, False)  # second write op
    assert clock.slept == []
    qos.trim(0, 4096, False)  # third write op in the same second waits half a second
    assert clock.slept == [pytest.approx(0.5)]
    # The read bucket refilled 2 KiB during that half second; a second 4 KiB read waits for
    # the other 2 KiB, half a second more.
    qos.pread(buf, 0)
    assert clock.slept[-1] == pytest.approx(0.5)
    assert len(clock.slept) == 2
    assert bytes(buf) == b"\0" * 4096  # the data path itself is untouched


def test_read_limit_disables_the_sendfile_path() -> None:
    class FdMemory(MemoryBackend):
        def fileno(self) -> int | None:
            return 7

    assert QosFilter(FdMemory(4096), QosLimits(write_bps=1)).fileno() == 7
    assert QosFilter(FdMemory(4096), QosLimits(read_iops=1)).fileno() is None
