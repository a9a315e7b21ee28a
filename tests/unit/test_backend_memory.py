"""The sparse memory backend: pages appear on write, vanish on trim/zero, and extents report
exactly which pages exist."""

from __future__ import annotations

from nbdserver.backends.base import Extent
from nbdserver.backends.memory import PAGE, MemoryBackend
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO


def read(b: MemoryBackend, offset: int, length: int) -> bytes:
    buf = bytearray(b"#" * length)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def test_unwritten_memory_reads_zero_and_is_a_hole() -> None:
    b = MemoryBackend(1 << 20)
    assert read(b, 1000, 5000) == bytes(5000)
    assert b.extents(0, 1 << 20) == [Extent(1 << 20, HOLE)]


def test_writes_across_page_boundaries_read_back() -> None:
    b = MemoryBackend(1 << 20)
    data = bytes(range(256)) * 40  # 10240 bytes, spans three pages
    b.pwrite(data, PAGE - 100, fua=False)
    assert read(b, PAGE - 100, len(data)) == data
    assert read(b, 0, PAGE - 100) == bytes(PAGE - 100)
    assert b.extents(0, 4 * PAGE) == [Extent(4 * PAGE, 0)]
    assert b.extents(0, 6 * PAGE) == [Extent(4 * PAGE, 0), Extent(2 * PAGE, HOLE)]


def test_trim_drops_whole_pages_and_zeroes_partial_ones() -> None:
    b = MemoryBackend(1 << 20)
    b.pwrite(b"x" * (4 * PAGE), 0, fua=False)
    b.trim(PAGE // 2, 2 * PAGE, fua=False)
    assert read(b, 0, 4 * PAGE) == (
        b"x" * (PAGE // 2) + bytes(2 * PAGE) + b"x" * (PAGE + PAGE // 2)
    )
    assert b.extents(0, 4 * PAGE) == [Extent(PAGE, 0), Extent(PAGE, HOLE), Extent(2 * PAGE, 0)]


def test_zero_makes_the_range_read_zero() -> None:
    b = MemoryBackend(1 << 20)
    b.pwrite(b"z" * (3 * PAGE), 0, fua=False)
    b.zero(10, 3 * PAGE - 20, may_trim=False, fast=True, fua=False)
    assert read(b, 0, 3 * PAGE) == b"z" * 10 + bytes(3 * PAGE - 20) + b"z" * 10


def test_read_only_memory_refuses_writes() -> None:
    b = MemoryBackend(1 << 20, read_only=True)
    assert not b.can_write
