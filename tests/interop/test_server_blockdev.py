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


def test_a_qcow2_on_a_block_device_is_read_and_its_allocated_clusters_written(
    nbdserver: NbdServerFactory, loopdev: tuple[str, Path], tmp_path: Path
) -> None:
    """--format qcow2 over a device (an LV holding a qcow2): the size comes from the device,
    not st_size (0 for a device, which refused the image before); a write into an allocated
    cluster lands; one that needs a new cluster fails that request, and the server goes on."""
    dev, _ = loopdev
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 4096 * 4 + bytes(4 << 20))  # 4 MiB data, 4 MiB zeroes
    image = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True,
                   timeout=60)  # fmt: skip
    with open(dev, "r+b") as f:
        f.write(image.read_bytes())
    srv = nbdserver("--backend", "block", "--format", "qcow2", image=dev, size=None)
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, str(raw)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x6b 64k 64k", "-c",
                         "read -P 0x6b 64k 64k", srv.uri], capture_output=True, text=True,
                        timeout=60)  # fmt: skip
    assert io.returncode == 0 and "fail" not in io.stdout.lower(), io.stdout + io.stderr
    grow = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 6M 64k", srv.uri],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "No space left on device" in grow.stdout + grow.stderr, grow.stdout
    srv.wait_log(r"WRITE offset 6291456 length 65536 .* failed")
    assert srv.proc.poll() is None
    assert srv.stop() == 0
