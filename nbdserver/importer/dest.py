"""Where an import writes: a regular file (created, kept sparse) or an existing block device,
opened as the serving backends, so writes, zeroing and syncing behave as when served.

Why sparse: a disk image is mostly zeroes; in a file they stay holes (each 64 KiB of zeroes is
skipped, the file having been sized with ``ftruncate``), on a block device they are written or
zeroed, since the device may hold old data.

Must not: know where the bytes come from.
"""

from __future__ import annotations

import os

from nbdserver.backends.base import Backend
from nbdserver.backends.block import BlockDeviceBackend, is_block_device
from nbdserver.backends.file import FileBackend
from nbdserver.errors import ConfigError

CHUNK = 8 * 1024 * 1024  # one request to the source
GRAIN = 64 * 1024  # the smallest run of zeroes left as a hole
_ZEROES = bytes(GRAIN)


def open_dest(path: str, size: int, fresh: bool) -> Backend:
    """``path`` ready for ``size`` bytes: a block device at least that large, or a file of
    exactly that size (emptied first when ``fresh``, so nothing of an earlier attempt stays)."""
    if is_block_device(path):
        device = BlockDeviceBackend(path)
        if device.size() < size:
            device.close()
            raise ConfigError(f"{path}: the device holds {device.size()} bytes, the image {size}")
        return device
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if fresh:
            os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return FileBackend(path)


def is_sparse(dest: Backend) -> bool:
    """Whether skipped zeroes read back as zeroes (a file sized by ``open_dest``)."""
    return isinstance(dest, FileBackend)


def write(dest: Backend, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write ``data`` at ``offset``; into a sparse file, only its runs of data (one write per
    run), leaving every ``GRAIN`` of zeroes a hole."""
    view = memoryview(data)
    if not is_sparse(dest):
        dest.pwrite(view, offset, False)
        return
    pos, end = 0, len(view)
    while pos < end:
        while pos < end and _zero(view[pos : pos + GRAIN]):
            pos += GRAIN
        start = pos
        while pos < end and not _zero(view[pos : pos + GRAIN]):
            pos += GRAIN
        if pos > start:
            dest.pwrite(view[start : min(pos, end)], offset + start, False)


def _zero(piece: memoryview) -> bool:
    # bytes() first: comparing a memoryview goes element by element, ten times slower.
    return bytes(piece) == _ZEROES[: len(piece)]


def write_zeroes(dest: Backend, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeroes (nothing to do in a sparse file)."""
    if not is_sparse(dest):
        dest.zero(offset, length, True, False, False)
