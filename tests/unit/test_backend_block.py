"""The block-device backend on a real loop device: size from BLKGETSIZE64, I/O, discard and
zero-out ioctls, FAST_ZERO refused honestly where the device cannot do it fast.

Needs root and /dev/loop-control (the team's machine has both); elsewhere it is skipped with
the reason, since a block device truly cannot exist there.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserver.backends.block import BlockDeviceBackend, is_block_device
from nbdserver.config import ExportConfig
from nbdserver.exports import open_export
from tests.loopdev import loop_device

MiB = 1 << 20


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[str]:
    with loop_device(tmp_path / "backing.img", 8 * MiB) as dev:
        yield dev


def test_size_comes_from_the_device_and_io_round_trips(loopdev: str) -> None:
    assert is_block_device(loopdev)
    b = BlockDeviceBackend(loopdev)
    assert b.size() == 8 * MiB
    b.pwrite(b"B" * 8192, MiB, fua=True)
    buf = bytearray(8192)
    b.pread(memoryview(buf), MiB)
    assert bytes(buf) == b"B" * 8192
    b.flush()
    b.close()


def test_discard_and_zeroout_make_ranges_read_zero(loopdev: str) -> None:
    b = BlockDeviceBackend(loopdev)
    b.pwrite(b"C" * (2 * MiB), 0, fua=False)
    b.zero(0, MiB, may_trim=False, fast=False, fua=True)
    buf = bytearray(2 * MiB)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == bytes(MiB) + b"C" * MiB
    b.trim(MiB, MiB, fua=False)  # advisory: must not fail
    b.close()


def test_fast_zero_either_succeeds_with_zeroes_or_says_enotsup(loopdev: str) -> None:
    b = BlockDeviceBackend(loopdev)
    b.pwrite(b"D" * 65536, 0, fua=False)
    try:
        b.zero(0, 65536, may_trim=True, fast=True, fua=False)
    except OSError as e:
        assert e.errno == errno.ENOTSUP
        return
    buf = bytearray(65536)
    b.pread(memoryview(buf), 0)
    assert bytes(buf) == bytes(65536)
    b.close()


def test_open_export_picks_the_block_backend_and_rejects_a_wrong_size(loopdev: str) -> None:
    export = open_export(ExportConfig(name="dev", path=loopdev))
    assert isinstance(export.backend, BlockDeviceBackend)
    export.backend.close()
    from nbdserver.errors import ConfigError

    with pytest.raises(ConfigError, match="not the"):
        open_export(ExportConfig(name="dev", path=loopdev, size=MiB))
