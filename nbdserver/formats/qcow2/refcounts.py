"""Host cluster allocation for a writable qcow2 image: the refcount table, its blocks, the end
of the file where new clusters go, and the reuse of clusters freed by writes, zeroes and trims.

Rules kept so that ``qemu-img check`` finds no errors, also after a crash or a power loss at
any moment (a crash may leak clusters, which check reports as leaks, not errors):

- every cluster in use has refcount 1 (an image with internal snapshots is never opened for
  writing, so nothing is shared; compressed clusters may share a host cluster, counted);
- a cluster is handed out only once its refcount of 1 is *on disk* (``take``: a batch of
  clusters is counted and the file extended over them, then one fdatasync, which also makes the
  new size durable; a reused cluster kept its
  1), so no L2 entry can reach the disk pointing at a cluster of refcount 0 or past the end of
  the file;
- a reference dropped is not counted down at once (``drop``): the cluster keeps its count until
  the next sync has put the dropping L2 entry on disk, then it becomes reusable as it is (count
  still 1) or is counted down (shared compressed clusters). So a reused cluster can never be
  named by an old L2 entry too, and a crash between the two leaves at worst a leak;
- ``close`` counts the clusters kept for reuse down to 0 and cuts the unused tail of the file:
  a clean stop leaves no leak;
- a new refcount block is zeroed and counted, and on disk, before the table points at it; a
  moved refcount table is on disk before the header names it, and the header before the old
  table is freed.

What it must not do: touch L1/L2 tables or guest data.
"""

from __future__ import annotations

import struct
from array import array

from nbdserver.formats._image import ImageFile
from nbdserver.formats.qcow2.header import RT_OFFSET, Header, Qcow2Error

# Clusters counted per sync when new ones come from the end of the file: about 4 MiB worth at
# first, doubling with every batch used up, to at most 64 MiB worth (an image being filled pays
# one sync per 64 MiB); a crash leaks at most one batch.
_BATCH_BYTES = 4 << 20
_BATCH_MAX_BYTES = 64 << 20
_BATCH_MAX = 4096


class Refcounts:
    def __init__(self, image: ImageFile, header: Header, file_size: int) -> None:
        if header.refcount_order < 3:
            raise Qcow2Error(
                f"refcount_order {header.refcount_order} (sub-byte refcounts) is read-only here"
            )
        self._img = image
        self._cb = header.cluster_bits
        self._cs = header.cluster_size
        self._width = 1 << (header.refcount_order - 3)  # bytes per refcount
        self._fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[self._width]
        self._per_block_bits = self._cb - (header.refcount_order - 3)
        self._rt_offset = header.rt_offset
        raw = image.read(header.rt_clusters * self._cs, header.rt_offset)
        if len(raw) < header.rt_clusters * self._cs:
            raise Qcow2Error("refcount table runs past the end of the file")
        self._rt = array("Q")
        self._rt.frombytes(raw)
        if struct.pack("=H", 1) != struct.pack(">H", 1):
            self._rt.byteswap()
        self._rt_on_disk = len(self._rt)
        for i, off in enumerate(self._rt):
            if off % self._cs or off + self._cs > file_size:
                raise Qcow2Error(f"refcount block {i} at {off:#x} lies past the file or unaligned")
        self.end = -(-file_size // self._cs) * self._cs  # where the next cluster goes
        self._batch = max(1, min(_BATCH_MAX, _BATCH_BYTES >> self._cb))
        self._batch_max = max(1, min(_BATCH_MAX, _BATCH_MAX_BYTES >> self._cb))
        # Refcount 1 on disk, referenced by nothing: handed out by ``take``, lowest last.
        self._spare: list[int] = []
        # References dropped since the last sync, one item per reference (see the docstring).
        self._dropped: list[int] = []

    # -- allocation ----------------------------------------------------------------------

    def take(self) -> int:
        """A cluster with refcount 1 on disk that nothing references."""
        if not self._spare:
            if self._dropped:
                self._img.datasync()  # the L2 entries that dropped them are on disk
                self.synced(self.pending())
            if not self._spare:
                start = self._alloc_end(self._batch)
                # The file covers them too: an L2 entry on disk whose data write was lost would
                # otherwise point past the end of the file (qemu-img check calls that an error).
                if self._img.size() < self.end:
                    self._img.resize(self.end)
                self._img.datasync()  # counted, and the size, on disk before an L2 entry names them
                last = start + (self._batch - 1) * self._cs
                self._spare = list(range(last, start - 1, -self._cs))  # pop: lowest first
                self._batch = min(self._batch * 2, self._batch_max)
        return self._spare.pop()

    def drop(self, host: int, count: int = 1) -> None:
        """One reference fewer to each of ``count`` clusters from ``host``, once the L2 entry
        that held it is on disk (the next sync)."""
        for i in range(count):
            at = host + i * self._cs
            if self.get(at) == 0:
                raise Qcow2Error(f"refcount of cluster {at:#x} is already 0 (corrupt image)")
            self._dropped.append(at)

    def pending(self) -> list[int]:
        """The dropped references a sync that starts now will cover (taken out of the list)."""
        out, self._dropped = self._dropped, []
        return out

    def synced(self, dropped: list[int]) -> None:
        """``dropped`` (from ``pending``) is on disk: free clusters become reusable as they are,
        shared ones are counted down."""
        for at in dropped:
            value = self.get(at)
            if value == 1:
                self._spare.append(at)
            elif value > 1:
                self.set_run(at, 1, value - 1)

    def close(self) -> None:
        """Count every cluster kept for reuse down to 0 (a clean stop leaves no leak)."""
        self.synced(self.pending())
        spare = sorted(self._spare)
        for at in spare:
            self.set_run(at, 1, 0)
        self._spare = []
        # The unused tail of the last batch goes back too, so restarts do not grow the file.
        end = self.end
        while spare and spare[-1] == end - self._cs:
            end = spare.pop()
        if end < self.end and self._img.size() > end:
            self._img.resize(end)
            self.end = end
        self._img.sync()

    def _alloc_end(self, count: int) -> int:
        """``count`` contiguous new clusters at the end of the file with refcount 1."""
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

    # -- the refcounts themselves ----------------------------------------------------------

    def get(self, host: int) -> int:
        block = self._block_of(host >> self._cb, create=False)
        if not block:
            return 0
        raw = self._img.read(self._width, block + self._slot(host >> self._cb))
        return int.from_bytes(raw, "big") if len(raw) == self._width else 0

    def set_run(self, host: int, count: int, value: int) -> None:
        """Set the refcounts of ``count`` clusters from ``host``, one write per block."""
        ci, stop = host >> self._cb, (host >> self._cb) + count
        while ci < stop:
            block = self._block_of(ci, create=True)
            per_block = 1 << self._per_block_bits
            n = min(stop - ci, per_block - (ci & (per_block - 1)))
            data = struct.pack(f">{n}{self._fmt}", *([value] * n))
            self._img.write(data, block + self._slot(ci))
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
        counted (in itself when it lies in its own range) and on disk before the table points
        at it."""
        ri = ci >> self._per_block_bits
        if ri >= len(self._rt):
            self._grow_table(ri)
            if self._rt[ri]:
                return self._rt[ri]
        block = self.end
        self.end += self._cs
        self._img.write(bytes(self._cs), block)
        self._rt[ri] = block
        self.set_run(block, 1, 1)
        if ri < self._rt_on_disk:
            self._img.datasync()
            self._img.write(struct.pack(">Q", block), self._rt_offset + ri * 8)
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
        self._img.write(table.tobytes(), at)
        self._img.sync()  # the new table is whole before the header names it
        self._img.write(struct.pack(">QI", at, clusters), RT_OFFSET)
        self._img.sync()  # and the header names it before the old table's clusters are freed
        self._rt_offset, self._rt_on_disk = at, len(self._rt)
        self.set_run(old_offset, old_clusters, 0)
