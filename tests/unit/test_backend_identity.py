"""Export identities per backend: new per process where the data dies with the process, stable
across reopening where it persists, and never written into a read-only image."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from nbdserver.backends import identity
from nbdserver.backends.file import FileBackend
from nbdserver.backends.memory import MemoryBackend
from nbdserver.filters.cow import CowFilter
from nbdserver.filters.qos import QosLimits, wrap_qos


def image(path: Path, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def file_id(path: str, read_only: bool = False) -> str:
    backend = FileBackend(path, read_only=read_only)
    try:
        return backend.identity
    finally:
        backend.close()


def test_memory_exports_get_a_new_identity_per_instance() -> None:
    a, b = MemoryBackend(4096), MemoryBackend(4096)
    assert a.identity.startswith("mem-") and a.identity != b.identity


def test_a_writable_file_keeps_its_identity_across_reopening(tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img")
    first = file_id(path)
    assert first.startswith("file-") and file_id(path) == first
    assert os.getxattr(path, identity.XATTR).decode() == first


def test_a_replaced_image_gets_a_new_identity(tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img")
    first = file_id(path)
    os.replace(image(tmp_path / "new.img"), path)  # same name and size, another inode
    assert file_id(path) != first


def test_a_read_only_export_never_writes_its_image(tmp_path: Path) -> None:
    path = image(tmp_path / "base.img")
    before = os.stat(path)
    ro = file_id(path, read_only=True)
    assert ro.startswith("ro-") and file_id(path, read_only=True) == ro
    assert os.listxattr(path) == [] and os.stat(path).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(tmp_path)) == ["base.img"]
    with open(path, "r+b") as f:  # changed behind the server's back: another identity
        f.write(b"x")
    assert file_id(path, read_only=True) != ro


def test_a_read_only_export_reads_the_identity_a_writer_recorded(tmp_path: Path) -> None:
    path = image(tmp_path / "disk.img")
    written = file_id(path)  # a writable server recorded it first
    assert file_id(path, read_only=True) == written


def test_without_user_xattrs_a_sidecar_bound_to_the_inode_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_xattrs(*_args: object) -> None:
        raise OSError(errno.EOPNOTSUPP, "no user xattrs here")

    monkeypatch.setattr(os, "setxattr", no_xattrs)
    monkeypatch.setattr(os, "getxattr", no_xattrs)
    path = image(tmp_path / "disk.img")
    first = file_id(path)
    assert (tmp_path / ".disk.img.kube-nbd-id").read_text().split()[0] == first
    assert file_id(path) == first
    os.replace(image(tmp_path / "new.img"), path)
    assert file_id(path) != first  # the sidecar names the old inode: stale


def test_filters_pass_the_identity_through_and_a_private_overlay_makes_a_new_one(
    tmp_path: Path,
) -> None:
    base = FileBackend(image(tmp_path / "disk.img"), read_only=True)
    try:
        assert wrap_qos(base, QosLimits(read_bps=1 << 30)).identity == base.identity
        one, two = CowFilter(base, str(tmp_path)), CowFilter(base, str(tmp_path))
        assert one.identity.startswith("cow-") and one.identity != two.identity
    finally:
        base.close()


def test_a_persistent_overlay_keeps_its_writes_and_identity_across_reopening(
    tmp_path: Path,
) -> None:
    base_path = image(tmp_path / "base.img")
    overlay = str(tmp_path / "clone.cow")

    def opened() -> CowFilter:
        return CowFilter(FileBackend(base_path, read_only=True), persist_path=overlay)

    cow = opened()
    cow.pwrite(b"clone data", 70000, fua=False)  # a partial block: copy-up, then write
    first = cow.identity
    cow.close()  # no flush: a killed process leaves the same files behind
    cow = opened()
    try:
        buf = memoryview(bytearray(10))
        cow.pread(buf, 70000)
        assert bytes(buf) == b"clone data" and cow.identity == first
    finally:
        cow.close()
    assert os.path.getsize(base_path) == 1 << 20 and b"clone" not in Path(base_path).read_bytes()
    os.unlink(overlay + ".map")  # the overlay is gone: a new one is different data
    cow = opened()
    try:
        assert cow.identity != first
    finally:
        cow.close()


def test_a_persistent_overlay_refuses_a_base_of_another_size(tmp_path: Path) -> None:
    overlay = str(tmp_path / "clone.cow")
    CowFilter(FileBackend(image(tmp_path / "a.img"), read_only=True), persist_path=overlay).close()
    other = FileBackend(image(tmp_path / "b.img", 2 << 20), read_only=True)
    try:
        with pytest.raises(ValueError, match="made for 1048576 bytes"):
            CowFilter(other, persist_path=overlay)
    finally:
        other.close()


def test_a_persistent_overlay_needs_a_cow_dir() -> None:
    from nbdserver.backends.registry import NAMES
    from nbdserver.config import CowMode, ExportConfig
    from nbdserver.errors import ConfigError

    with pytest.raises(ConfigError, match="persistent copy-on-write"):
        ExportConfig("disk", "/x.img", cow=CowMode.PERSISTENT).validate(NAMES)
    ExportConfig("a/b", "/x.img", cow=CowMode.PERSISTENT, cow_dir="/cow").validate(NAMES)


def test_each_export_has_its_own_persistent_overlay_file() -> None:
    from nbdserver.config import CowMode, ExportConfig
    from nbdserver.exports import cow_overlay_path

    cfg = ExportConfig("team/db", "/x.img", cow=CowMode.PERSISTENT, cow_dir="/cow")
    assert cow_overlay_path(cfg) == "/cow/team%2Fdb.cow"  # a name never escapes the folder
