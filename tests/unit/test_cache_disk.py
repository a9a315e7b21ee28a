"""The disk cache's slot file: blocks come back as stored, the least recently used gives its
slot up, a discarded block is fetched again, and the file never outgrows its capacity."""

from __future__ import annotations

import os
from pathlib import Path

from nbdserver.filters.cache_disk import DiskBlocks

BLOCK = 4096


def test_blocks_come_back_as_stored_and_the_oldest_is_evicted(tmp_path: Path) -> None:
    blocks = DiskBlocks(str(tmp_path), 3 * BLOCK, BLOCK)
    fetched: list[int] = []

    def value(i: int) -> bytes:
        return bytes([i]) * (BLOCK if i != 4 else 100)  # block 4 is a short last block

    def fetch(i: int) -> bytes:
        fetched.append(i)
        return value(i)

    try:
        for i in range(5):
            assert blocks.get(i, lambda i=i: fetch(i)) == value(i)
        fetched.clear()
        assert len(blocks) == 3
        for i in (2, 3, 4):
            assert blocks.get(i, lambda i=i: fetch(i)) == value(i)
        assert fetched == []
        assert blocks.get(0, lambda: fetch(0)) == bytes([0]) * BLOCK
        assert fetched == [0]  # evicted earlier, fetched again
        blocks.discard(3)
        assert blocks.get(3, lambda: fetch(3)) == bytes([3]) * BLOCK
        assert fetched == [0, 3]
        assert list(tmp_path.iterdir()) == []
    finally:
        blocks.close()


def test_the_file_never_outgrows_its_capacity(tmp_path: Path) -> None:
    blocks = DiskBlocks(str(tmp_path), 2 * BLOCK, BLOCK)
    try:
        for i in range(50):
            blocks.get(i, lambda i=i: os.urandom(BLOCK))
        assert os.fstat(blocks._fd).st_size <= 2 * BLOCK
    finally:
        blocks.close()
