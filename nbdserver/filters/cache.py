"""A bounded read cache: an LRU of aligned blocks, in memory or (``cache_dir``) in a file on local
disk (``nbdserver.filters.cache_disk``), so a remote block is fetched about once however many
clients and requests read it.

Why: over HTTP or S3 every read is a round trip; operating systems and guests read the same
blocks (partition tables, superblocks, boot files) again and again.

How: reads are split into ``block``-aligned blocks (the last one short at the end of the
image); a missing block is read whole from ``inner`` and kept, the least recently used dropped
past ``capacity`` bytes. A write, trim or zero through this filter drops the blocks it touches
(so the cache is never stale for data written through it). Two threads missing the same block
at once may both fetch it: no lock is held across a fetch.

Must not: cache anything written beside it (it sits directly over the backend, under any
overlay: ``nbdserver.exports.stack``), or hold more than ``capacity`` bytes of blocks.
"""

from __future__ import annotations

import functools

from nbdserver.backends.base import Backend
from nbdserver.filters.base import Filter
from nbdserver.filters.cache_disk import DiskBlocks
from nbdserver.lru import BoundedCache

DEFAULT_BLOCK = 1024 * 1024


class CacheFilter(Filter):
    """LRU cache of ``block``-sized reads, at most ``capacity`` bytes (in ``cache_dir`` when
    given, else in memory)."""

    def __init__(
        self,
        inner: Backend,
        capacity: int,
        block: int = DEFAULT_BLOCK,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(inner)
        self._block = block
        self._size = inner.size()
        self._blocks: BoundedCache[int, bytes] | DiskBlocks = (
            DiskBlocks(cache_dir, capacity, block)
            if cache_dir is not None
            else BoundedCache(max(1, capacity // block))
        )

    def pread(self, buf: memoryview, offset: int) -> None:
        pos = 0
        while pos < len(buf):
            index, skip = divmod(offset + pos, self._block)
            n = min(self._block - skip, len(buf) - pos)  # the core keeps reads inside the image
            self._copy(index, skip, buf[pos : pos + n])
            pos += n

    def _copy(self, index: int, skip: int, view: memoryview) -> None:
        """``view`` from block ``index`` at ``skip``: from the disk slot directly when held
        there, else from the block (fetched if missing)."""
        blocks = self._blocks
        if isinstance(blocks, DiskBlocks) and blocks.read_into(index, skip, view):
            return
        data = blocks.get(index, functools.partial(self._fetch, index))
        view[:] = data[skip : skip + len(view)]

    def _fetch(self, index: int) -> bytes:
        start = index * self._block
        fetched = bytearray(min(self._block, self._size - start))
        self.inner.pread(memoryview(fetched), start)
        return bytes(fetched)

    def _forget(self, offset: int, length: int) -> None:
        for index in range(offset // self._block, (offset + length - 1) // self._block + 1):
            self._blocks.discard(index)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self._forget(offset, len(data))
        self.inner.pwrite(data, offset, fua)
        self._forget(offset, len(data))

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._forget(offset, length)
        self.inner.trim(offset, length, fua)
        self._forget(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._forget(offset, length)
        self.inner.zero(offset, length, may_trim, fast, fua)
        self._forget(offset, length)

    def fileno(self) -> int | None:
        return None  # a sendfile would bypass the cache

    def close(self) -> None:
        try:
            super().close()
        finally:
            if isinstance(self._blocks, DiskBlocks):
                self._blocks.close()
