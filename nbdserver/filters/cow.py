"""Copy-on-write: writes land in a sparse overlay file, the base export is never written.

Why: a golden image can be served to many clients (or a clone created from a read-only export)
while each writer's changes go elsewhere. nbd-server's ``copyonwrite`` and nbdkit's cow filter do
the same. Three lifetimes (``nbdserver.config.CowMode`` names them): an unlinked overlay per
connection (nbd-server's ``copyonwrite``: gone at disconnect), one unlinked overlay shared by
every connection (gone when the process exits), or a persistent overlay: a data file and a
presence map in ``cow_dir`` that a restarted server opens again (a writable clone; the files
and their crash ordering are ``nbdserver.filters.cow_map``'s).

How: the export is cut into ``block``-sized blocks. A byte per block says whether the block lives
in the overlay. A write that covers a block only partly first copies that block up from the base
(read-modify-write); whole blocks are written directly. Zeroes and trims punch holes in the
overlay and mark the blocks present, so they read as zero without touching the base. Reads merge
the two, block status reports the base's extents for base blocks and the overlay's holes and data
for overlay blocks.

Concurrency: once a block is present it never goes back, so a write whose blocks are all present
takes no lock. Only the first write to a block (the copy-up) is serialised by one lock, which
makes the copy-up race-free against another writer of the same block.

It must not: write to, trim, or flush the base; the base backend may be read-only.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading

from nbdserver.backends._linux import punch_hole
from nbdserver.backends.base import Backend, Extent, append_extent
from nbdserver.backends.identity import new_identity
from nbdserver.filters.base import Filter
from nbdserver.filters.cow_map import PersistentMap
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

DEFAULT_BLOCK = 64 * 1024
_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO


def _full_pread(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:  # the overlay is exactly export-sized, so short means past EOF: zeroes
            buf[:] = bytes(len(buf))
            return
        buf = buf[n:]
        offset += n


def _full_pwrite(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


class CowFilter(Filter):
    """Overlay ``inner`` with a sparse file in ``cow_dir`` (default: the temp dir).

    ``persist_path``: keep the overlay at that path plus its map (``PersistentMap``) and reopen
    them if present; else the overlay is unlinked at once and created on the first write.
    ``shared``: every connection sees this overlay (CAN_MULTI_CONN); False for an overlay of one
    connection. ``owns_inner``: ``close`` closes the base too (not for a per-connection overlay
    over a shared base).
    """

    def __init__(
        self,
        inner: Backend,
        cow_dir: str | None = None,
        block: int = DEFAULT_BLOCK,
        *,
        persist_path: str | None = None,
        shared: bool = True,
        owns_inner: bool = True,
    ):
        super().__init__(inner)
        if block <= 0 or block & (block - 1):
            raise ValueError(f"copy-on-write block size must be a power of two, not {block}")
        self._size = inner.size()
        self._block = block
        self._shift = block.bit_length() - 1
        self._owns_inner = owns_inner
        self._fd = -1
        self._cow_dir = cow_dir
        self._map: PersistentMap | None = None
        if persist_path is None:
            # The overlay file comes with the first write; it dies with its owner, and so
            # does the data: a new identity.
            self._present = bytearray((self._size + block - 1) >> self._shift)
            self.identity = new_identity("cow")
        else:
            self._map = PersistentMap(persist_path, self._size, block)
            self._fd = self._map.overlay_fd
            self._present = self._map.present
            self.identity = self._map.identity(inner.identity)
        # Nothing in the overlay yet: reads go straight to the base.
        self._dirty = self._present.find(1) >= 0
        self._lock = threading.Lock()
        self.can_write = self.can_flush = self.can_fua = True
        self.can_trim = self.can_zero = self.can_fast_zero = True
        self.can_extents = True
        self.can_multi_conn = shared

    def _overlay(self) -> None:
        """Create the unlinked overlay file on the first write. Caller holds the lock."""
        if self._fd >= 0:
            return
        fd, path = tempfile.mkstemp(prefix="nbdserver-cow-", dir=self._cow_dir)
        # Unlinked at once: nothing outlives its owner, and no other user can open it.
        os.unlink(path)
        os.ftruncate(fd, self._size)
        self._fd = fd

    def _mark(self, first: int, last: int) -> None:
        """Blocks ``first..last`` now live in the overlay (and, persistent, in its map)."""
        self._present[first : last + 1] = b"\x01" * (last - first + 1)
        if self._map is not None:
            self._map.mark(first, last)

    # -- helpers ------------------------------------------------------------------------------

    def _blocks(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self._shift, (offset + length - 1) >> self._shift

    def _all_present(self, first: int, last: int) -> bool:
        return self._present.find(0, first, last + 1) < 0

    def _copy_up(self, blk: int) -> None:
        """Bring one block from the base into the overlay. Caller holds the lock."""
        if self._present[blk]:
            return
        start = blk << self._shift
        length = min(self._block, self._size - start)
        buf = memoryview(bytearray(length))
        self.inner.pread(buf, start)
        _full_pwrite(self._fd, buf, start)
        self._mark(blk, blk)

    def _punch(self, offset: int, length: int) -> None:
        try:
            punch_hole(self._fd, offset, length)
        except OSError as exc:
            # A filesystem without hole punching (some tmpfs setups, overlayfs): write zeroes.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            chunk = memoryview(bytes(min(length, 1 << 20)))
            end = offset + length
            while offset < end:
                n = min(len(chunk), end - offset)
                _full_pwrite(self._fd, chunk[:n], offset)
                offset += n

    # -- data path ----------------------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        if not self._dirty:
            self.inner.pread(buf, offset)
            return
        present = self._present
        length = len(buf)
        end_blk = (offset + length - 1) >> self._shift
        pos = 0
        blk = offset >> self._shift
        while pos < length:
            state = present[blk]
            # Extend the run while blocks have the same state.
            nxt = present.find(1 - state, blk, end_blk + 1)
            run_end_blk = end_blk + 1 if nxt < 0 else nxt
            run_end = min(length, (run_end_blk << self._shift) - offset)
            piece = buf[pos:run_end]
            if state:
                _full_pread(self._fd, piece, offset + pos)
            else:
                self.inner.pread(piece, offset + pos)
            pos = run_end
            blk = run_end_blk

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        mv = data if isinstance(data, memoryview) else memoryview(data)
        first, last = self._blocks(offset, len(mv))
        if self._all_present(first, last):
            _full_pwrite(self._fd, mv, offset)
            if fua:
                self.flush()
            return
        with self._lock:
            self._overlay()
            self._dirty = True
            if offset & (self._block - 1):
                self._copy_up(first)
            end = offset + len(mv)
            if end & (self._block - 1) and end != self._size:
                self._copy_up(last)
            _full_pwrite(self._fd, mv, offset)
            self._mark(first, last)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        first, last = self._blocks(offset, length)
        with self._lock:
            self._overlay()
            self._dirty = True
            head = offset & (self._block - 1)
            end = offset + length
            if head:
                self._copy_up(first)
            if end & (self._block - 1) and end != self._size:
                self._copy_up(last)
            self._punch(offset, length)
            self._mark(first, last)
        if fua:
            self.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # Trim may leave anything behind; zeroing in the overlay is the only choice that
        # keeps the base untouched and frees overlay space.
        self.zero(offset, length, True, False, fua)

    def flush(self) -> None:
        # An unlinked overlay dies with its owner, so durability of it means nothing; every
        # connection shares one file descriptor, so writes are already visible to all. A
        # persistent overlay makes its data durable, then the map that points at it.
        if self._map is not None:
            self._map.sync()

    def fileno(self) -> int | None:
        return None  # merged data cannot be sendfile'd from one descriptor

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self._dirty:
            return self.inner.extents(offset, length)
        out: list[Extent] = []
        end = offset + length
        pos = offset
        while pos < end:
            blk = pos >> self._shift
            state = self._present[blk]
            nxt = self._present.find(1 - state, blk, ((end - 1) >> self._shift) + 1)
            run_end = end if nxt < 0 else min(end, nxt << self._shift)
            if state:
                self._overlay_extents(pos, run_end, out)
            else:
                self._base_extents(pos, run_end, out)
            pos = run_end
        return out

    def _base_extents(self, start: int, end: int, out: list[Extent]) -> None:
        pos = start
        while pos < end:
            got = self.inner.extents(pos, end - pos) if self.inner.can_extents else []
            if not got:
                append_extent(out, end - pos, 0)
                return
            for ext in got:
                n = min(ext.length, end - pos)
                if n <= 0:
                    break
                append_extent(out, n, ext.flags)
                pos += n

    def _overlay_extents(self, start: int, end: int, out: list[Extent]) -> None:
        pos = start
        while pos < end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end  # nothing but hole up to EOF
            if data > pos:
                n = min(data, end) - pos
                append_extent(out, n, _HOLE)
                pos += n
                continue
            hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            append_extent(out, n, 0)
            pos += n

    def close(self) -> None:
        try:
            if self._map is not None:
                self._map.close()
            elif self._fd >= 0:
                os.close(self._fd)
        finally:
            if self._owns_inner:
                self.inner.close()
