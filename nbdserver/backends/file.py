"""Backends over a file descriptor: a sparse regular file, and the shared fd-based I/O.

One descriptor per export, shared by every connection: positional I/O (pread/pwrite) shares
no file position, and FLUSH (fsync) on that one descriptor makes every connection's completed
writes durable, which is what lets the server advertise CAN_MULTI_CONN honestly.

Must not validate requests (the protocol core did) nor know the wire format.
"""

from __future__ import annotations

import errno
import os

from nbdserver.backends import _linux
from nbdserver.backends.base import Backend, BackendKind, Extent
from nbdserver.backends.identity import file_identity
from nbdserver.errors import ConfigError
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
# Writing zeroes by hand is the slow fallback; do it in bounded chunks.
_ZERO_CHUNK = 1024 * 1024
# Bound the reply to one BLOCK_STATUS request; clients ask again from where it ended.
_MAX_EXTENTS = 1024
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class FdBackend(Backend):
    """Positional I/O on one descriptor; subclasses add size, trim and zero policies."""

    can_flush = True
    can_fua = True
    can_cache = True
    can_multi_conn = True

    def __init__(self, fd: int, size: int, read_only: bool) -> None:
        self._fd = fd
        self._size = size
        self.can_write = not read_only
        self._zero_buf = bytes(_ZERO_CHUNK)

    def size(self) -> int:
        return self._size

    def fileno(self) -> int | None:
        return self._fd

    def pread(self, buf: memoryview, offset: int) -> None:
        fd = self._fd
        n = os.preadv(fd, [buf], offset)
        total = len(buf)
        while n < total:
            # Short reads happen near EOF or on signals; finish the job or zero-fill past EOF
            # (the file was shrunk behind our back: report zeroes rather than garbage).
            got = os.preadv(fd, [buf[n:]], offset + n)
            if got == 0:
                buf[n:] = bytes(total - n)
                return
            n += got

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        fd = self._fd
        n = os.pwrite(fd, data, offset)
        if n < len(data):
            view = memoryview(data)
            while n < len(view):
                n += os.pwrite(fd, view[n:], offset + n)
        if fua:
            os.fdatasync(fd)

    def flush(self) -> None:
        os.fsync(self._fd)

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.pwrite(memoryview(self._zero_buf)[:n], offset, False)
            offset += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileBackend(FdBackend):
    """A sparse regular file: holes punched on TRIM, allocation read with SEEK_DATA/SEEK_HOLE."""

    can_trim = True
    can_zero = True
    can_fast_zero = True
    can_extents = True

    def __init__(self, path: str, read_only: bool = False, size: int | None = None) -> None:
        """``size`` below the file's: serve only that many bytes (a read-only view)."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, st.st_size if size is None else min(size, st.st_size), read_only)
        self.path = path
        try:
            self.identity = file_identity(fd, path, read_only)
        except BaseException:
            os.close(fd)
            raise
        # A range known to hold no hole, from the last SEEK_HOLE: on tmpfs SEEK_HOLE walks
        # page by page to the next hole (milliseconds across a fully written GiB), and reads
        # ask for extents. Writes only fill holes, so the range stays true until this backend
        # punches one (trim, zero), which forgets it. A stale range only ever says "data",
        # which is always a correct answer (the data read returns the zeroes).
        self._data_span = (0, 0)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._data_span = (0, 0)
        try:
            _linux.punch_hole(self._fd, offset, length)
        except OSError as e:
            # TRIM is advisory: a filesystem without hole punching simply keeps the data.
            if e.errno not in _NOT_SUPPORTED:
                raise
        if fua:
            os.fdatasync(self._fd)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self._data_span = (0, 0)
        fd = self._fd
        done = False
        if may_trim:
            done = _try(_linux.punch_hole, fd, offset, length)
        if not done:
            done = _try(_linux.zero_range, fd, offset, length)
        if not done and not may_trim:
            # NO_HOLE on a filesystem without ZERO_RANGE (tmpfs): punch, then allocate again.
            done = _try(_linux.punch_hole, fd, offset, length) and _try(
                _linux.fallocate, fd, _linux.FALLOC_FL_KEEP_SIZE, offset, length
            )
        if not done:
            if fast:
                raise OSError(errno.ENOTSUP, "no fast way to zero this range")
            self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(fd)

    def extents(self, offset: int, length: int) -> list[Extent]:
        fd, end, pos = self._fd, offset + length, offset
        lo, hi = self._data_span
        if lo <= offset and end <= hi:
            return [Extent(length, 0)]
        out: list[Extent] = []
        while pos < end and len(out) < _MAX_EXTENTS:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from here to EOF
                    data = end
                elif e.errno in _NOT_SUPPORTED and not out:
                    return [Extent(length, 0)]
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                out.append(Extent(stop - pos, _HOLE))
                pos = stop
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            self._data_span = (pos, hole)
            stop = min(hole, end)
            out.append(Extent(stop - pos, 0))
            pos = stop
        return out


def _try(fn: object, *args: int) -> bool:
    """Run a fallocate-style call; False when the kernel or filesystem does not support it."""
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        if e.errno in _NOT_SUPPORTED:
            return False
        raise
    return True


def prepare_image(path: str, size: int | None) -> None:
    """Create a sparse image of ``size`` when absent; grow a smaller one; never shrink."""
    if size is None:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        current = os.fstat(fd).st_size
        if size < current:
            raise ConfigError(
                f"{path} is {current} bytes; refusing to shrink it to {size} (data would be lost)"
            )
        if size > current:
            os.ftruncate(fd, size)  # sparse: no blocks are allocated
    finally:
        os.close(fd)


def open_file(path: str | None, size: int | None, read_only: bool) -> Backend:
    """Writable: create or grow the image to ``size``. Read-only: never create, grow or write
    it; ``size`` (nbd-server's ``filesize``) may only narrow the export to a prefix."""
    assert path is not None
    if not read_only:
        prepare_image(path, size)
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist (give --size to create it)")
    if read_only and size is not None:
        current = os.stat(path).st_size
        if size > current:
            raise ConfigError(
                f"{path} is {current} bytes; a read-only export never grows its image to {size}"
            )
    return FileBackend(path, read_only=read_only, size=size if read_only else None)


KIND = BackendKind("file", open_file, claims=lambda path: True)  # what no other claims
