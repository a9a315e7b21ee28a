"""The node plugin's host-device allowlist: only block devices its globs match are published,
each once, with its size from sysfs; stacked devices (partitions, holders) and paths an
NBDExport would refuse are left out; what the controller reads back from the inventory Lease,
including expiry; and the zeroing of a released device."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from nbd_agent.csi import host_wipe, hostdevices
from nbd_agent.csi.host_inventory import scan

GIB = 2**30


def fake_disk(sys_root: Path, name: str, sectors: int) -> Path:
    entry = sys_root / "class" / "block" / name
    (entry / "holders").mkdir(parents=True)
    (entry / "size").write_text(f"{sectors}\n")
    return entry


def test_scan_publishes_only_free_allowlisted_block_devices(tmp_path: Path) -> None:
    dev, sys_root = tmp_path / "dev", tmp_path / "sys"
    dev.mkdir()
    for name in ("sdb", "sdc", "sdd", "sde", "vda", "odd:name"):
        (dev / name).touch()
    (dev / "by-id").mkdir()
    (dev / "by-id" / "disk-b").symlink_to(dev / "sdb")
    fake_disk(sys_root, "sdb", 2 * GIB // 512)
    fake_disk(sys_root, "sdc", GIB // 512)
    partitioned = fake_disk(sys_root, "sdd", GIB // 512)
    (partitioned / "sdd1").mkdir()
    (partitioned / "sdd1" / "partition").write_text("1\n")
    held = fake_disk(sys_root, "sde", GIB // 512)
    (held / "holders" / "dm-0").touch()
    fake_disk(sys_root, "vda", GIB // 512)
    fake_disk(sys_root, "odd:name", GIB // 512)
    # Regular files stand in for device nodes (creating real ones needs CAP_MKNOD).
    blocks = {str(p) for p in dev.rglob("*") if p.name != "by-id"}

    found = scan(
        ["/dev/by-id/*", "/dev/sd?", "/dev/odd*"],
        root=str(tmp_path),
        is_block=lambda p: p in blocks,
    )
    # sdb once, under the by-id name that matched first; sdd (partitioned), sde (held), vda
    # (not allowlisted) and odd:name (a ':' the NBDExport schema refuses) are never offered.
    assert found == [("/dev/by-id/disk-b", 2 * GIB), ("/dev/sdc", GIB)]


def test_scan_of_a_real_block_device(tmp_path: Path) -> None:
    """The real checks on this machine's /dev and /sys: a loop device, when there is one."""
    loops = sorted(Path("/sys/class/block").glob("loop[0-9]*"))
    if not loops or not Path(f"/dev/{loops[0].name}").exists():
        pytest.skip("no loop device on this machine")
    name = loops[0].name
    sectors = int((loops[0] / "size").read_text())
    assert scan([f"/dev/{name}"]) == ([(f"/dev/{name}", sectors * 512)] if sectors else [])
    assert scan([str(tmp_path / "*")]) == []  # not block devices


def test_inventory_round_trip_and_expiry() -> None:
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    lease = hostdevices.inventory_lease("kube-nbd", "node-a", [("/dev/sdb", GIB)], 90, now=now)
    assert hostdevices.published([lease], now=now + datetime.timedelta(seconds=89)) == [
        hostdevices.Device("node-a", "/dev/sdb", GIB)
    ]
    assert hostdevices.published([lease], now=now + datetime.timedelta(seconds=91)) == []
    garbled = dict(
        lease,
        metadata=dict(
            lease["metadata"],
            annotations={
                hostdevices.ANNOTATION_DEVICES: '[{"path": "/etc/passwd", "sizeBytes": 1}, 3, "x"]'
            },
        ),
    )
    assert hostdevices.published([garbled], now=now) == []


def test_node_names_that_cannot_be_label_values_get_no_segment() -> None:
    assert hostdevices.is_label_value("worker-1.example.com")
    assert not hostdevices.is_label_value("n" * 64)
    assert not hostdevices.is_label_value("")


def test_zeroing_falls_back_to_writes_where_blkzeroout_is_refused(tmp_path: Path) -> None:
    """A regular file refuses the block-device ioctl (ENOTTY): the plain-write path zeroes it,
    across more than one slice, and leaves what lies beyond ``size`` alone."""
    image = tmp_path / "disk.img"
    size = host_wipe.SLICE + 3 * 2**20 + 512
    image.write_bytes(b"\xa5" * (size + 4096))
    host_wipe.zero_device(str(image), size)
    data = image.read_bytes()
    assert data[:size].count(0) == size
    assert data[size:] == b"\xa5" * 4096
