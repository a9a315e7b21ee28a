"""``nbdserver serve /dev/loopN``: a real block device served end to end (size from the device,
writes land on the device, zeroing and discard accepted), checked with qemu-io and nbdinfo.

Needs root and loop devices (present on the team's machine and in CI); skipped with the
reason elsewhere, where a block device truly cannot be created.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory
from tests.loopdev import loop_device

pytestmark = pytest.mark.interop


@pytest.fixture
def loopdev(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / "backing.img"
    with loop_device(backing, 16 << 20) as dev:
        yield dev, backing


def test_a_block_device_is_served_with_its_own_size(
    nbdserver: NbdServerFactory, loopdev: tuple[str, Path]
) -> None:
    dev, backing = loopdev
    srv = nbdserver("--name", "dev", image=dev, size=None)
    srv.wait_log(r"export 'dev': /dev/loop\d+, 16777216 bytes")
    info = subprocess.run(["nbdinfo", srv.uri], capture_output=True, text=True, timeout=30)
    assert info.returncode == 0 and "export-size: 16777216" in info.stdout, info.stderr
    io = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 256k", "-c", "write -z 1M 64k",
         "-c", "discard 8M 1M", "-c", "read -P 0x3c 1088k 192k", "-c", "read -P 0 1M 64k",
         "-c", "flush", srv.uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert io.returncode == 0 and "fail" not in (io.stdout + io.stderr).lower(), io.stdout
    assert srv.stop() == 0
    subprocess.run(["losetup", "-d", dev], check=False)
    data = backing.read_bytes()
    assert data[(1 << 20) + (64 << 10) : (1 << 20) + (256 << 10)] == b"\x3c" * (192 << 10)
    assert data[1 << 20 : (1 << 20) + (64 << 10)] == bytes(64 << 10)
