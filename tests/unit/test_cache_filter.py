"""The read cache filter, in memory and on disk (``cache_dir``): each block fetched once,
bounded by its capacity, never stale."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.backends.memory import MemoryBackend
from nbdserver.filters.cache import CacheFilter

BLOCK = 4096
SIZE = 10 * BLOCK + 100  # a short last block


class Counting(MemoryBackend):
    """A memory backend that counts the reads reaching it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: list[tuple[int, int]] = []

    def pread(self, buf: memoryview, offset: int) -> None:
        self.reads.append((offset, len(buf)))
        super().pread(buf, offset)


def base() -> tuple[Counting, bytes]:
    b = Counting(SIZE)
    data = os.urandom(SIZE)
    b.pwrite(data, 0, False)
    return b, data


FLAVOURS = pytest.mark.parametrize("where", [None, tempfile.gettempdir()], ids=["memory", "disk"])


def read(backend: CacheFilter, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.pread(memoryview(buf), offset)
    return bytes(buf)


@FLAVOURS
def test_each_block_is_fetched_once_however_often_it_is_read(where: str | None) -> None:
    inner, data = base()
    cache = CacheFilter(inner, capacity=SIZE + BLOCK, block=BLOCK, cache_dir=where)
    for _ in range(3):
        assert read(cache, 0, SIZE) == data
        assert read(cache, 5000, 3) == data[5000:5003]
    assert sorted(inner.reads) == [(i * BLOCK, BLOCK) for i in range(10)] + [(10 * BLOCK, 100)]


@FLAVOURS
def test_the_least_recently_used_block_is_dropped_past_the_capacity(where: str | None) -> None:
    inner, data = base()
    cache = CacheFilter(inner, capacity=2 * BLOCK, block=BLOCK, cache_dir=where)
    read(cache, 0, 1)  # block 0
    read(cache, BLOCK, 1)  # block 1
    read(cache, 0, 1)  # block 0 is now the most recent
    read(cache, 2 * BLOCK, 1)  # block 2 evicts block 1
    inner.reads.clear()
    assert read(cache, 0, 1) == data[:1]
    assert inner.reads == []
    read(cache, BLOCK, 1)
    assert inner.reads == [(BLOCK, BLOCK)]


@FLAVOURS
def test_a_write_through_the_cache_is_read_back_not_the_cached_block(where: str | None) -> None:
    inner, data = base()
    cache = CacheFilter(inner, capacity=SIZE, block=BLOCK, cache_dir=where)
    assert read(cache, 0, 10) == data[:10]
    cache.pwrite(b"new", 4, False)
    assert read(cache, 0, 10) == data[:4] + b"new" + data[7:10]
    cache.zero(0, 2, False, False, False)
    assert read(cache, 0, 4) == b"\0\0" + data[2:4]


def test_the_cache_offers_no_descriptor_to_sendfile_around_it() -> None:
    inner, _ = base()
    assert CacheFilter(inner, capacity=SIZE).fileno() is None


@settings(max_examples=60, deadline=None)
@given(
    reads=st.lists(
        st.tuples(st.integers(0, SIZE - 1), st.integers(1, 3 * BLOCK)), min_size=1, max_size=20
    ),
    slots=st.integers(1, 4),
    where=st.sampled_from([None, tempfile.gettempdir()]),
)
def test_any_reads_return_the_image_bytes(
    reads: list[tuple[int, int]], slots: int, where: str | None
) -> None:
    inner, data = base()
    cache = CacheFilter(inner, capacity=slots * BLOCK, block=BLOCK, cache_dir=where)
    try:
        for offset, length in reads:
            length = min(length, SIZE - offset)
            assert read(cache, offset, length) == data[offset : offset + length]
    finally:
        cache.close()
