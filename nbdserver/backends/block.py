"""A block device backend: size from BLKGETSIZE64, TRIM via BLKDISCARD, zeroes via the kernel.

FAST_ZERO is honest: the fast path is fallocate(PUNCH_HOLE) on the device, which the kernel
turns into a WRITE_ZEROES request that refuses to fall back to writing zero pages
(BLKDEV_ZERO_NOFALLBACK) and fails with EOPNOTSUPP instead, exactly the NBD semantics.
Must not validate requests (the protocol core did).
"""

from __future__ import annotations

import errno
import os
import stat

from nbdserver.backends import _linux
from nbdserver.backends.base import Backend, BackendKind, BlockSize
from nbdserver.backends.file import FdBackend
from nbdserver.backends.identity import block_identity
from nbdserver.errors import ConfigError

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


class BlockDeviceBackend(FdBackend):
    can_trim = True
    can_zero = True
    can_fast_zero = True

    def __init__(self, path: str, read_only: bool = False) -> None:
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        try:
            if not stat.S_ISBLK(os.fstat(fd).st_mode):
                raise OSError(errno.ENOTBLK, f"{path} is not a block device")
            size = _linux.blk_size(fd)
            sector = _linux.blk_sector_size(fd)
            self.is_rotational = _linux.blk_rotational(fd)
            self.identity = block_identity(fd, size)
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, size, read_only)
        self.path = path
        # Unaligned I/O works (the page cache handles it) but the client should prefer sectors.
        self.block_size = BlockSize(1, max(4096, sector), 32 * 1024 * 1024)
        self._discard_ok = True

    def trim(self, offset: int, length: int, fua: bool) -> None:
        if self._discard_ok:
            try:
                _linux.blk_discard(self._fd, offset, length)
            except OSError as e:
                # Advisory: a device without discard keeps its data; stop asking it.
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self._discard_ok = False
        if fua:
            os.fdatasync(self._fd)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        fd = self._fd
        try:
            # NOFALLBACK write-zeroes: unmaps only where the device guarantees zeroes.
            _linux.punch_hole(fd, offset, length)
        except OSError as e:
            if e.errno not in _NOT_SUPPORTED:
                raise
            if fast:
                raise OSError(errno.ENOTSUP, "device has no fast zero") from None
            try:
                _linux.blk_zeroout(fd, offset, length)
            except OSError as e2:
                if e2.errno not in _NOT_SUPPORTED:
                    raise
                self._write_zeroes(offset, length)
        if fua:
            os.fdatasync(fd)


def open_block(path: str | None, size: int | None, read_only: bool) -> Backend:
    """A device has the size it has: a different ``size`` is refused, never "fixed"."""
    assert path is not None
    backend = BlockDeviceBackend(path, read_only=read_only)
    if size is not None and size != backend.size():
        backend.close()
        raise ConfigError(f"{path} is {backend.size()} bytes, not the {size} asked")
    return backend


KIND = BackendKind("block", open_block, claims=is_block_device)
