"""The read cache's blocks on local disk: a file of fixed slots in ``--cache-dir``, so a cache
larger than memory (a whole golden image) costs page cache, not resident memory.

Why slots: the file never grows past ``capacity`` bytes whatever the filesystem (no hole
punching needed); a block index maps to a slot, the least recently used block gives its slot
up. The file is unlinked as soon as it is created: nothing is left behind by a killed server,
and nothing is trusted from an earlier one (blocks do not survive a restart).

One lock covers the index and the slot I/O of a hit or a store (a read of a slot from the page
cache is short), so a slot is never reused under a reader; fetches from the remote happen
outside it. Must not: fetch anything itself, or know what the blocks are.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable

from nbdserver.errors import ConfigError


class DiskBlocks:
    """Up to ``capacity // block`` blocks of at most ``block`` bytes, in one file in ``dir``."""

    def __init__(self, directory: str, capacity: int, block: int) -> None:
        try:
            self._fd, path = tempfile.mkstemp(prefix="nbdserver-cache-", dir=directory)
        except OSError as exc:
            raise ConfigError(f"--cache-dir {directory}: {exc.strerror}") from None
        os.unlink(path)
        self._block = block
        self._free = list(range(max(1, capacity // block) - 1, -1, -1))
        self._where: OrderedDict[int, tuple[int, int]] = OrderedDict()  # index: (slot, length)
        self._lock = threading.Lock()

    def read_into(self, index: int, skip: int, view: memoryview) -> bool:
        """Fill ``view`` from block ``index`` at ``skip`` if the block is held (only the bytes
        asked for are read: a 4 KiB hit costs a 4 KiB read); False if it is not."""
        with self._lock:
            held = self._where.get(index)
            if held is None:
                return False
            self._where.move_to_end(index)
            got = os.preadv(self._fd, [view], held[0] * self._block + skip)
        if got != len(view):
            raise OSError(5, f"cache file: short read of block {index}")
        return True

    def get(self, index: int, fetch: Callable[[], bytes]) -> bytes:
        """Block ``index``, from its slot, else ``fetch()``ed and kept."""
        held = self._read(index)
        if held is not None:
            return held
        data = fetch()
        with self._lock:
            if index not in self._where:
                slot = self._free.pop() if self._free else self._where.popitem(last=False)[1][0]
                os.pwrite(self._fd, data, slot * self._block)
                self._where[index] = (slot, len(data))
        return data

    def discard(self, index: int) -> None:
        with self._lock:
            held = self._where.pop(index, None)
            if held is not None:
                self._free.append(held[0])

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        os.close(self._fd)

    def _read(self, index: int) -> bytes | None:
        with self._lock:
            held = self._where.get(index)
            if held is None:
                return None
            self._where.move_to_end(index)
            slot, length = held
            return os.pread(self._fd, length, slot * self._block)
