"""Linux-only system calls the standard library lacks: fallocate modes and block-device ioctls.

``os.posix_fallocate`` can only allocate; punching holes and zeroing ranges need the raw
``fallocate(2)`` call with mode flags, so it is reached through ctypes here, in one place.
This module must not decide policy (fallbacks, FAST_ZERO honesty): backends do that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import struct

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# linux/fs.h: _IO(0x12, n) and _IOR(0x12, 114, size_t)
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268
BLKROTATIONAL = 0x127E

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2); raise OSError with the kernel's errno on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def blk_size(fd: int) -> int:
    """Size in bytes of the block device behind ``fd``."""
    out = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("=Q", out)[0])


def blk_sector_size(fd: int) -> int:
    out = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return int(struct.unpack("=i", out)[0])


def blk_rotational(fd: int) -> bool:
    try:
        out = fcntl.ioctl(fd, BLKROTATIONAL, b"\0" * 2)
    except OSError:
        return False
    return bool(struct.unpack("=H", out)[0])


def blk_discard(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("=QQ", offset, length))


def blk_zeroout(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
