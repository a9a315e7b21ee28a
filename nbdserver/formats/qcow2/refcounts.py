"""Host cluster allocation for a writable qcow2 image: the refcount table, its blocks, and the
end of the file where new clusters go.

Rules kept so that ``qemu-img check`` finds no errors: every cluster in use has refcount 1 (an
image with internal snapshots is never opened for writing, so nothing is shared); a refcount is
written before anything points at the cluster it counts (a crash leaks at worst); a new refcount
block counts itself. Clusters are only ever taken from the end of the file; freed ones keep
refcount 0 inside the file (qemu's check does not count them as leaks).

What it must not do: touch L1/L2 tables or guest data.
"""

from __future__ import annotations

import os
import struct
from array import array

from nbdserver.formats.qcow2.header import RT_OFFSET, Header, Qcow2Error


class Refcounts:
    def __init__(self, fd: int, header: Header, file_size: int) -> None:
        if header.refcount_order < 3:
            raise Qcow2Error(
                f"refcount_order {header.refcount_order} (sub-byte refcounts) is read-only here"
            )
        self._fd = fd
        self._cb = header.cluster_bits
        self._cs = header.cluster_size
        self._width = 1 << (header.refcount_order - 3)  # bytes per refcount
        self._fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[self._width]
        self._per_block_bits = self._cb - (header.refcount_order - 3)
        self._rt_offset = header.rt_offset
        raw = os.pread(fd, header.rt_clusters * self._cs, header.rt_offset)
        self._rt = array("Q")
        self._rt.frombytes(raw)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            self._rt.byteswap()
        self._rt_on_disk = len(self._rt)
        for i, off in enumerate(self._rt):
            if off % self._cs or off + self._cs > file_size:
                raise Qcow2Error(f"refcount block {i} at {off:#x} lies past the file or unaligned")
        self.end = -(-file_size // self._cs) * self._cs  # where the next cluster goes

    def alloc(self, count: int) -> int:
        """``count`` contiguous new clusters with refcount 1; their host offset."""
        while True:
            start = self.end
            first = start >> self._cb
            missing = next(
                (c for c in range(first, first + count) if not self._block_of(c, create=False)),
                None,
            )
            if missing is None:
                break
            self._make_block(missing)
        self.end = start + count * self._cs
        self.set_run(start, count, 1)
        return start

    def release(self, host: int, count: int = 1) -> None:
        """One reference fewer to each of ``count`` clusters from ``host``."""
        for i in range(count):
            at = host + i * self._cs
            value = self.get(at)
            if value == 0:
                raise Qcow2Error(f"refcount of cluster {at:#x} is already 0 (corrupt image)")
            self.set_run(at, 1, value - 1)

    def get(self, host: int) -> int:
        block = self._block_of(host >> self._cb, create=False)
        if not block:
            return 0
        raw = os.pread(self._fd, self._width, block + self._slot(host >> self._cb))
        return int.from_bytes(raw, "big") if len(raw) == self._width else 0

    def set_run(self, host: int, count: int, value: int) -> None:
        """Set the refcounts of ``count`` clusters from ``host``, one write per block."""
        ci, stop = host >> self._cb, (host >> self._cb) + count
        while ci < stop:
            block = self._block_of(ci, create=True)
            per_block = 1 << self._per_block_bits
            n = min(stop - ci, per_block - (ci & (per_block - 1)))
            data = struct.pack(f">{n}{self._fmt}", *([value] * n))
            os.pwrite(self._fd, data, block + self._slot(ci))
            ci += n

    def _slot(self, ci: int) -> int:
        return (ci & ((1 << self._per_block_bits) - 1)) * self._width

    def _block_of(self, ci: int, create: bool) -> int:
        ri = ci >> self._per_block_bits
        block = self._rt[ri] if ri < len(self._rt) else 0
        if not block and create:
            block = self._make_block(ci)
        return block

    def _make_block(self, ci: int) -> int:
        """A new zeroed refcount block for cluster ``ci``'s range, at the end of the file; it is
        counted (in itself when it lies in its own range) before the table points at it."""
        ri = ci >> self._per_block_bits
        if ri >= len(self._rt):
            self._grow_table(ri)
            if self._rt[ri]:
                return self._rt[ri]
        block = self.end
        self.end += self._cs
        os.pwrite(self._fd, bytes(self._cs), block)
        self._rt[ri] = block
        self.set_run(block, 1, 1)
        if ri < self._rt_on_disk:
            os.pwrite(self._fd, struct.pack(">Q", block), self._rt_offset + ri * 8)
        return block

    def _grow_table(self, ri: int) -> None:
        """Move the refcount table to the end of the file, large enough for ``ri`` and for the
        blocks that count the table itself; then point the header at it, then free the old."""
        cs, old_offset, old_clusters = self._cs, self._rt_offset, self._rt_on_disk * 8 // self._cs
        at = self.end
        clusters = max(-(-(ri + 1) * 8 // cs), old_clusters * 2)
        while ((at + (2 * clusters + 2) * cs) >> self._cb >> self._per_block_bits) >= (
            clusters * cs // 8
        ):
            clusters *= 2
        self._rt.extend([0] * (clusters * cs // 8 - len(self._rt)))
        self.end = at + clusters * cs
        self.set_run(at, clusters, 1)  # may create blocks: only in memory until written below
        table = array("Q", self._rt)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            table.byteswap()
        os.pwrite(self._fd, table.tobytes(), at)
        os.fsync(self._fd)  # the new table is whole before the header names it
        os.pwrite(self._fd, struct.pack(">QI", at, clusters), RT_OFFSET)
        self._rt_offset, self._rt_on_disk = at, len(self._rt)
        self.set_run(old_offset, old_clusters, 0)
