"""A sparse in-memory backend: pages that were never written (or were trimmed) do not exist.

Used for ephemeral scratch exports and in tests. Extents are honest: absent pages are reported
as holes that read as zeroes. Data is lost when the process exits; it must not pretend
otherwise (FLUSH succeeds because there is nothing more durable to reach).
"""

from __future__ import annotations

from nbdserver.backends.base import Backend, BackendKind, Extent
from nbdserver.backends.identity import new_identity
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

PAGE = 4096
_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
# One BLOCK_STATUS reply scans at most this much; the client asks again from where it ended.
_MAX_SCAN = 64 * 1024 * 1024


class MemoryBackend(Backend):
    can_write = True
    can_flush = True
    can_fua = True
    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_extents = True
    can_cache = True
    # One dict shared by every connection: a write is visible to all once it returns.
    can_multi_conn = True

    def __init__(self, size: int, read_only: bool = False) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}
        self.can_write = not read_only
        self.identity = new_identity("mem")  # the data dies with the process

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        pages, pos, done, total = self._pages, offset, 0, len(buf)
        while done < total:
            index, skip = divmod(pos, PAGE)
            n = min(PAGE - skip, total - done)
            page = pages.get(index)
            if page is None:
                buf[done : done + n] = bytes(n)
            else:
                buf[done : done + n] = page[skip : skip + n]
            done += n
            pos += n

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        pages, pos, done, total = self._pages, offset, 0, len(data)
        view = memoryview(data)
        while done < total:
            index, skip = divmod(pos, PAGE)
            n = min(PAGE - skip, total - done)
            page = pages.get(index)
            if page is None:
                # setdefault is atomic under the GIL: two writers never lose each other's page.
                page = pages.setdefault(index, bytearray(PAGE))
            page[skip : skip + n] = view[done : done + n]
            done += n
            pos += n

    def _zero(self, offset: int, length: int) -> None:
        pages, pos, end = self._pages, offset, offset + length
        while pos < end:
            index, skip = divmod(pos, PAGE)
            n = min(PAGE - skip, end - pos)
            if n == PAGE:
                pages.pop(index, None)
            else:
                page = pages.get(index)
                if page is not None:
                    page[skip : skip + n] = bytes(n)
            pos += n

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._zero(offset, length)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        # Dropping pages is both the fast and the thorough way here; NO_HOLE is a hint.
        self._zero(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        pages, pos, end = self._pages, offset, offset + min(length, _MAX_SCAN)
        out: list[Extent] = []
        while pos < end:
            index, skip = divmod(pos, PAGE)
            n = min(PAGE - skip, end - pos)
            flags = 0 if index in pages else _HOLE
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))
            pos += n
        return out

    def close(self) -> None:
        self._pages.clear()


def open_memory(path: str | None, size: int | None, read_only: bool) -> Backend:
    assert size is not None  # the configuration refuses a memory export without a size
    return MemoryBackend(size, read_only=read_only)


KIND = BackendKind("memory", open_memory, claims=lambda path: False, needs_path=False)
