"""The sparse-file backend on real files: positional I/O, holes punched by TRIM, zeroing with
and without holes, SEEK_DATA/SEEK_HOLE extents, FUA and flush, read-only refusal."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserver.backends.base import Extent
from nbdserver.backends.file import FileBackend
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
MiB = 1 << 20


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(params=["tmp", "shm"])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB sparse file on the test's filesystem and on tmpfs (which lacks ZERO_RANGE)."""
    base = tmp_path if request.param == "tmp" else Path("/dev/shm")
    path = base / f"nbd-backend-{os.getpid()}-{request.node.name}.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    yield path
    path.unlink(missing_ok=True)


def test_writes_are_read_back_at_their_offsets(image: Path) -> None:
    b = FileBackend(str(image))
    assert b.size() == 4 * MiB and b.fileno() is not None
    b.pwrite(b"abc" * 1000, 12345, fua=False)
    b.pwrite(memoryview(b"Z" * 4096), 3 * MiB, fua=True)
    buf = bytearray(3000)
    b.pread(memoryview(buf), 12345)
    assert bytes(buf) == b"abc" * 1000
    b.flush()
    assert image.read_bytes()[3 * MiB : 3 * MiB + 4096] == b"Z" * 4096
    b.close()


def test_a_fresh_image_is_one_hole(image: Path) -> None:
    b = FileBackend(str(image))
    assert b.extents(0, 4 * MiB) == [Extent(4 * MiB, HOLE)]
    b.close()


def test_extents_follow_data_and_holes(image: Path) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"x" * MiB, MiB, fua=False)
    assert b.extents(0, 4 * MiB) == [
        Extent(MiB, HOLE),
        Extent(MiB, 0),
        Extent(2 * MiB, HOLE),
    ]
    # a query starting inside data, ending inside the trailing hole
    assert b.extents(MiB + 4096, MiB) == [Extent(MiB - 4096, 0), Extent(4096, HOLE)]
    b.close()


def test_trim_punches_a_hole_that_reads_as_zeroes(image: Path) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"y" * (2 * MiB), 0, fua=False)
    before = allocated(image)
    b.trim(0, MiB, fua=True)
    assert allocated(image) <= before - MiB
    buf = bytearray(MiB)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == bytes(MiB)
    assert b.extents(0, 2 * MiB)[0] == Extent(MiB, HOLE)
    b.close()


def test_zero_with_may_trim_leaves_a_hole(image: Path) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"q" * MiB, 0, fua=False)
    b.zero(0, MiB, may_trim=True, fast=True, fua=False)
    assert b.extents(0, MiB) == [Extent(MiB, HOLE)]
    b.close()


def test_zero_with_no_hole_keeps_the_range_allocated_and_zero(image: Path) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"q" * MiB, 0, fua=False)
    before = allocated(image)
    b.zero(4096, 65536, may_trim=False, fast=True, fua=True)
    buf = bytearray(65536 + 8192)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == b"q" * 4096 + bytes(65536) + b"q" * 4096
    # still allocated: no blocks were given back (tmpfs reports such pages as holes to
    # SEEK_DATA, so allocation is checked through st_blocks)
    assert allocated(image) >= before
    b.close()


def test_unaligned_zero_is_exact(image: Path) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"\xff" * 8192, 0, fua=False)
    b.zero(100, 300, may_trim=True, fast=False, fua=False)
    buf = bytearray(8192)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == b"\xff" * 100 + bytes(300) + b"\xff" * (8192 - 400)
    b.close()


def test_read_only_backend_refuses_writes(image: Path) -> None:
    b = FileBackend(str(image), read_only=True)
    assert not b.can_write
    with pytest.raises(OSError) as info:
        b.pwrite(b"x", 0, fua=False)
    assert info.value.errno in (errno.EBADF, errno.EROFS)
    b.close()


def test_short_file_reads_zero_past_its_end(tmp_path: Path) -> None:
    """A file truncated behind the server's back reads as zeroes rather than garbage."""
    path = tmp_path / "short.img"
    path.write_bytes(b"a" * 8192)
    b = FileBackend(str(path))
    os.truncate(path, 4096)
    buf = bytearray(b"#" * 8192)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == b"a" * 4096 + bytes(4096)
    b.close()


def test_extents_of_a_known_data_range_are_remembered_until_a_hole_is_punched(
    image: Path,
) -> None:
    b = FileBackend(str(image))
    b.pwrite(b"d" * (2 * MiB), MiB, fua=False)  # data [1M, 3M)
    assert b.extents(MiB, 512 * 1024) == [Extent(512 * 1024, 0)]
    # Within the remembered data range no lseek is needed, and the answer is still right.
    assert b.extents(MiB + 4096, 64 * 1024) == [Extent(64 * 1024, 0)]
    b.trim(2 * MiB, 64 * 1024, fua=False)  # punching forgets the range
    assert b.extents(2 * MiB - 4096, 128 * 1024) == [
        Extent(4096, 0),
        Extent(64 * 1024, HOLE),
        Extent(60 * 1024, 0),
    ]
    b.zero(MiB, 4096, may_trim=True, fast=False, fua=False)
    assert b.extents(MiB, 8192) == [Extent(4096, HOLE), Extent(4096, 0)]
    b.close()
