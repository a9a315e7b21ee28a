"""The qcow2 ``Backend``: reads through L1/L2 (data, zero, compressed, unallocated -> backing
file or zeroes; with extended L2 entries per subcluster), block status from the metadata, and
writes that allocate whole clusters (reused ones first, else at the end of the file) with
refcounts kept exact. The container file is an ``ImageFile``: a local file (read and write)
or any backend's bytes (read-only).

Write order (crash and power-loss safe, see ``refcounts``): a new cluster's refcount is on disk
before it is handed out; then data, then (for a new L2 table) the zeroed table, a sync, and its
L1 entry; then the L2 entry; a dropped reference is counted down or reused only after the next
sync. FLUSH is fsync of the file, FUA fdatasync. An image with
internal snapshots, a dirty (lazy-refcount) or corrupt bit, or sub-byte refcounts opens
read-only only; a backing file is always opened read-only.

What it must not do: validate requests (the core did) or decide policy on the backing chain's
location (``open_qcow2`` does, once, at open).
"""

from __future__ import annotations

import errno
import functools
import os
import struct
import threading
from array import array

from nbdserver.backends.base import Backend, Extent, append_extent
from nbdserver.backends.file import FileBackend
from nbdserver.backends.identity import digest
from nbdserver.formats._image import ImageFile, LocalImage
from nbdserver.formats.probe import QCOW2_MAGIC
from nbdserver.formats.qcow2 import header as hdr
from nbdserver.formats.qcow2.header import Header, Qcow2Error
from nbdserver.formats.qcow2.refcounts import Refcounts
from nbdserver.formats.qcow2.tables import (
    ALL_ALLOCATED,
    ALL_ZERO,
    COMPRESSED_KIND,
    COPIED,
    NORMAL,
    OFFSET_MASK,
    UNALLOCATED,
    ZERO,
    ZERO_FLAG,
    Tables,
)  # fmt: skip
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

MAX_CHAIN = 16
_MAX_EXTENTS = 1024


class Qcow2Backend(Backend):
    can_flush = True
    can_fua = True
    can_extents = True
    can_multi_conn = True

    def __init__(self, image: ImageFile, read_only: bool, backing: Backend | None = None,
                 backing_files: tuple[str, ...] = ()) -> None:  # fmt: skip
        """``image``: the container file (opened writable unless ``read_only``); ``backing``:
        the opened backing file; ``backing_files``: every file of its chain."""
        file_size = image.size()
        h = hdr.parse(image.read(2 * 1024 * 1024, 0), file_size)
        self._img, self.h, self.path = image, h, image.name
        # The read and write paths call these per cluster run: a local file's descriptor goes
        # straight to os.preadv/os.pwrite (no Python frame between), any other image through
        # its methods.
        self._fd = image.fd
        self._readinto = image.readinto
        self._write = functools.partial(os.pwrite, image.fd) if image.fd >= 0 else image.write
        self._cs, self._cb = h.cluster_size, h.cluster_bits
        self._backing = backing
        self._backing_size = backing.size() if backing is not None else 0
        self._lock = threading.Lock()
        self._closed = False
        self._refs: Refcounts | None = None
        if not read_only:
            why = _why_read_only(h)
            if why:
                raise Qcow2Error(f"{image.name}: {why}; serve it with --read-only", errno.EROFS)
            self._refs = Refcounts(image, h, file_size)
        self._t = Tables(image, h, self._refs.end if self._refs else file_size)
        self.can_write = self.can_trim = self.can_zero = not read_only
        self._cleared_autoclear = h.autoclear == 0
        self.backing_files = backing_files
        files = [os.stat(p) for p in backing_files]
        self.identity = digest(
            "qcow2", image.identity,
            *[(s.st_ino, s.st_size, s.st_mtime_ns) for s in files],
        )  # fmt: skip

    def size(self) -> int:
        return self.h.size

    # ---- reads -------------------------------------------------------------------------

    def _segments(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        with self._lock:
            return self._segments_locked(offset, length)

    def _segments_locked(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(kind, guest offset, length, host offset or entry) runs covering the range."""
        out: list[tuple[int, int, int, int]] = []
        cs, pos, end = self._cs, offset, offset + length
        while pos < end:
            n = min(cs - (pos & (cs - 1)), end - pos)
            entry, bitmap = self._t.entry(pos >> self._cb)
            kind = self._t.kind(entry)
            if self._t.ext and kind != COMPRESSED_KIND:
                n, kind = self._subcluster(pos, end, entry, bitmap)
            where = (entry & OFFSET_MASK) + (pos & (cs - 1)) if kind == NORMAL else entry
            if out and out[-1][0] == kind and kind != COMPRESSED_KIND:
                k, g, m, w = out[-1]
                if kind != NORMAL or w + m == where:
                    out[-1] = (k, g, m + n, w)
                    pos += n
                    continue
            out.append((kind, pos, n, where))
            pos += n
        return out

    def _subcluster(self, pos: int, end: int, entry: int, bitmap: int) -> tuple[int, int]:
        """Length and kind of the run from ``pos`` to the end of its subcluster."""
        size = self._cs >> 5
        index = (pos & (self._cs - 1)) // size
        n = min(size - (pos & (size - 1)), end - pos)
        if bitmap >> index & 1:
            if not entry & OFFSET_MASK:
                raise Qcow2Error(f"subcluster at guest offset {pos:#x} is allocated nowhere")
            return n, NORMAL
        return n, ZERO if bitmap >> (32 + index) & 1 else UNALLOCATED

    def pread(self, buf: memoryview, offset: int) -> None:
        self._fill(buf, offset, self._segments(offset, len(buf)), False)

    def _fill(self, buf: memoryview, offset: int, segments: list[tuple[int, int, int, int]],
              locked: bool) -> None:  # fmt: skip
        for kind, guest, n, where in segments:
            view = buf[guest - offset : guest - offset + n]
            if kind == NORMAL:
                if self._fd >= 0:
                    got = os.preadv(self._fd, [view], where)
                    if 0 < got < n:
                        got += self._readinto(view[got:], where + got)
                else:
                    got = self._readinto(view, where)
                if got < n:  # the file ends inside the cluster: the rest was never written
                    view[got:] = bytes(n - got)
            elif kind == COMPRESSED_KIND:
                if locked:
                    data = self._t.decompress(where)
                else:
                    with self._lock:
                        data = self._t.decompress(where)
                within = guest & (self._cs - 1)
                view[:] = data[within : within + n]
            elif kind == UNALLOCATED and self._backing is not None:
                self._read_backing(view, guest)
            else:
                view[:] = bytes(n)

    def _read_backing(self, view: memoryview, guest: int) -> None:
        inside = max(0, min(len(view), self._backing_size - guest))
        if inside:
            assert self._backing is not None
            self._backing.pread(view[:inside], guest)
        if inside < len(view):
            view[inside:] = bytes(len(view) - inside)

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        length = min(length, _MAX_EXTENTS * self._cs)  # clients ask again from where it ends
        for kind, guest, n, where in self._segments(offset, length):
            if kind in (NORMAL, COMPRESSED_KIND):
                append_extent(out, n, 0)
            elif kind == ZERO:
                append_extent(
                    out, n, NBD_STATE_ZERO | (0 if where & OFFSET_MASK else NBD_STATE_HOLE)
                )
            elif self._backing is None or guest >= self._backing_size:
                append_extent(out, n, NBD_STATE_HOLE | NBD_STATE_ZERO)
            else:
                self._backing_extents(out, guest, n)
        return out

    def _backing_extents(self, out: list[Extent], guest: int, n: int) -> None:
        assert self._backing is not None
        inside = min(n, self._backing_size - guest)
        pos, end = guest, guest + inside
        while pos < end:
            before = pos
            for e in self._backing.extents(pos, end - pos):
                step = min(e.length, end - pos)
                if step <= 0:
                    break
                append_extent(out, step, e.flags)
                pos += step
                if pos >= end:
                    break
            if pos == before:  # a backing file that said nothing: call the rest data
                append_extent(out, end - pos, 0)
                pos = end
        if inside < n:
            append_extent(out, n - inside, NBD_STATE_HOLE | NBD_STATE_ZERO)

    # ---- writes ------------------------------------------------------------------------

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        view, cs = memoryview(data), self._cs
        with self._lock:
            self._before_write()
            pos = 0
            while pos < len(view):
                guest = offset + pos
                within = guest & (cs - 1)
                n = min(cs - within, len(view) - pos)
                self._write_cluster(guest >> self._cb, within, view[pos : pos + n])
                pos += n
        if fua:
            self._img.datasync()

    def _write_cluster(self, cluster: int, within: int, piece: memoryview) -> None:
        entry, bitmap = self._t.entry(cluster)
        kind = self._t.kind(entry)
        whole = not self._t.ext or bitmap & ALL_ALLOCATED == ALL_ALLOCATED
        if kind == NORMAL and entry & COPIED and whole:
            self._write(piece, (entry & OFFSET_MASK) + within)
            return
        if len(piece) == self._cs:
            content: bytes | bytearray | memoryview = piece
        else:
            old = bytearray(self._cs)
            start = cluster << self._cb
            self._fill(memoryview(old), start, self._segments_locked(start, self._cs), True)
            old[within : within + len(piece)] = piece
            content = old
        assert self._refs is not None
        host = self._refs.take()
        self._t.file_end = self._refs.end
        self._write(content, host)
        self._set_entry(cluster, host | COPIED, ALL_ALLOCATED)
        self._release(entry, kind)

    def _set_entry(self, cluster: int, value: int, bitmap: int = 0) -> None:
        """Point ``cluster`` at ``value`` (with extended L2 entries, and ``bitmap``)."""
        l1_index = cluster >> self._t.l2_bits
        offset, table = self._t.l2_table(l1_index)
        if table is not None and not self._t.l1[l1_index] & COPIED:
            raise Qcow2Error("shared L2 table (internal snapshot): cannot write in place")
        if table is None:
            assert self._refs is not None
            offset = self._refs.take()
            self._t.file_end = self._refs.end
            self._write(bytes(self._cs), offset)
            self._img.datasync()  # the zeroed table is on disk before the L1 entry names it
            table = array("Q", bytes(self._cs))
            self._t.cache_l2(offset, table)
            self._t.l1[l1_index] = offset | COPIED
            l1_at = self.h.l1_offset + l1_index * 8
            self._write(struct.pack(">Q", offset | COPIED), l1_at)
        slot = cluster & ((1 << self._t.l2_bits) - 1)
        if self._t.ext:
            table[2 * slot], table[2 * slot + 1] = value, bitmap
            self._write(struct.pack(">QQ", value, bitmap), offset + slot * 16)
        else:
            table[slot] = value
            self._write(struct.pack(">Q", value), offset + slot * 8)

    def _release(self, entry: int, kind: int) -> None:
        """Drop the reference ``entry`` held (after nothing points at it any more)."""
        assert self._refs is not None
        if kind == COMPRESSED_KIND:
            host, length = self._t.compressed_span(entry)
            first = host & ~(self._cs - 1)
            count = (host + length - 1 - first) // self._cs + 1
            self._refs.drop(first, min(count, max(1, (self._t.file_end - first) // self._cs)))
        elif entry & OFFSET_MASK and kind in (NORMAL, ZERO):
            self._refs.drop(entry & OFFSET_MASK)

    def _before_write(self) -> None:
        """Once: clear autoclear feature bits (bitmaps we do not update become stale)."""
        if not self._cleared_autoclear:
            self._write(bytes(8), hdr.AUTOCLEAR_OFFSET)
            self._cleared_autoclear = True

    def _drop_clusters(self, offset: int, length: int, zero: bool) -> None:
        """Unallocate every whole cluster in the range, marked as reading zeroes if ``zero``,
        freeing what it held; partial clusters at either end are left as they are."""
        cs = self._cs
        for cluster in range(-(-offset // cs), (offset + length) // cs):
            entry, bitmap = self._t.entry(cluster)
            kind = self._t.kind(entry)
            if self._t.ext:
                if entry == 0 and bitmap == (ALL_ZERO if zero else 0):
                    continue
                self._set_entry(cluster, 0, ALL_ZERO if zero else 0)
            else:
                if kind == UNALLOCATED and (not zero or self._backing is None):
                    continue
                if kind == ZERO and zero and not entry & OFFSET_MASK:
                    continue
                self._set_entry(cluster, ZERO_FLAG if zero else 0)
            self._release(entry, kind)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        cs, end = self._cs, offset + length
        plain = self.h.version >= 3 or self._backing is None
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end // cs * cs)
        with self._lock:
            self._before_write()
            if plain:
                self._drop_clusters(offset, length, zero=self.h.version >= 3)
        if not plain:  # v2 over a backing file: only written zeroes hide the backing data
            head_end = tail_start = offset
        for start, stop in ((offset, head_end), (tail_start, end)):
            if stop > start:
                self.pwrite(bytes(stop - start), start, False)
        if fua:
            self._img.datasync()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        if self._backing is not None and self.h.version < 3:
            return  # advisory; unallocating would expose the backing file's data
        with self._lock:
            self._before_write()
            self._drop_clusters(offset, length, zero=self._backing is not None)
        if fua:
            self._img.datasync()

    def flush(self) -> None:
        if not self.can_write:
            return
        assert self._refs is not None
        with self._lock:
            dropped = self._refs.pending()
        self._img.sync()
        with self._lock:  # the L2 entries that dropped them are on disk: reusable now
            self._refs.synced(dropped)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._refs is not None:
                with self._lock:
                    self._img.sync()
                    self._refs.close()
        finally:
            self._img.close()
            if self._backing is not None:
                self._backing.close()


def _why_read_only(h: Header) -> str | None:
    if h.corrupt:
        return "the image is marked corrupt (qemu-img check -r all repairs it)"
    if h.dirty:
        return "the image is dirty (lazy refcounts; qemu-img check -r all repairs it)"
    if h.nb_snapshots:
        return "the image has internal snapshots (writing them is not supported)"
    if h.refcount_order < 3:
        return f"refcount_order {h.refcount_order} is not supported for writing"
    return None


def open_qcow2(source: str | ImageFile, read_only: bool, allow_outside: bool = False,
               _chain: tuple[str, ...] = ()) -> Backend:  # fmt: skip
    """The qcow2 image at ``source`` (a path, or an ``ImageFile`` over any backend) with its
    backing chain, each backing file read-only, named relative to the image that names it,
    inside the top image's directory unless ``allow_outside``; a loop or a chain deeper than 16
    is refused. An image that is not a local file is read-only and may have no backing file:
    its name could only be resolved against the URL or plugin it came from, and following it
    would let the image choose what else the server fetches."""
    if not isinstance(source, str):
        if not read_only and not source.writable:
            read_only = True
        h = hdr.parse(source.read(2 * 1024 * 1024, 0), source.size())
        if h.backing_name is not None:
            raise Qcow2Error(
                f"{source.name} names a backing file ({h.backing_name!r}), which is followed "
                "only for a local image; flatten it (qemu-img convert -O qcow2) or download it"
            )
        return Qcow2Backend(source, read_only)
    path = source
    real = os.path.realpath(path)
    if real in _chain:
        raise Qcow2Error(f"backing chain loops back to {path}", errno.ELOOP)
    if len(_chain) > MAX_CHAIN:
        raise Qcow2Error(f"backing chain is deeper than {MAX_CHAIN}", errno.ELOOP)
    chain = (*_chain, real)
    image = LocalImage(path, not read_only)
    backing: Backend | None = None
    try:
        h = hdr.parse(image.read(2 * 1024 * 1024, 0), image.size())
        if h.backing_name is not None:
            backing = _open_backing(path, h, chain, allow_outside)
        files: tuple[str, ...] = ()
        if isinstance(backing, Qcow2Backend):
            files = (backing.path, *backing.backing_files)
        elif isinstance(backing, FileBackend):
            files = (backing.path,)
        return Qcow2Backend(image, read_only, backing, files)
    except BaseException:
        if backing is not None:
            backing.close()
        image.close()
        raise


def _open_backing(path: str, h: Header, chain: tuple[str, ...], allow_outside: bool) -> Backend:
    name = h.backing_name or ""
    if ":" in name.split("/")[0] or name.startswith("json:"):
        raise Qcow2Error(f"backing file {name!r} is a protocol URL, not a file")
    where = os.path.join(os.path.dirname(path), name)
    real, top_dir = os.path.realpath(where), os.path.dirname(chain[0])
    if not allow_outside and os.path.commonpath([real, top_dir]) != top_dir:
        raise Qcow2Error(
            f"backing file {name!r} lies outside {top_dir} (allow it with --backing-anywhere)",
            errno.EACCES,
        )
    if not os.path.exists(where):
        raise Qcow2Error(f"backing file {name!r} of {path} does not exist", errno.ENOENT)
    fmt = h.backing_format
    if fmt is None:  # old images name no format: read-only, so only qcow2 or raw is tried
        with open(where, "rb") as f:
            fmt = "qcow2" if f.read(4) == QCOW2_MAGIC else "raw"
    if fmt == "qcow2":
        return open_qcow2(where, True, allow_outside, chain)
    if fmt == "raw":
        return FileBackend(where, read_only=True)
    raise Qcow2Error(f"backing file format {fmt!r} is not supported (raw and qcow2 are)")
