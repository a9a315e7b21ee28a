"""The format-once rule's probe on image files: blank, filesystem, partition table, bare data;
and mountinfo parsing of escaped paths."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from nbd_agent.csi import mounter


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as img:
        img.truncate(32 * 2**20)
    return path


def test_an_all_zero_device_is_blank(image: Path) -> None:
    assert mounter.probe(str(image)).blank


def test_a_filesystem_is_recognised_by_type(image: Path) -> None:
    mounter.mkfs(str(image), "ext4")
    found = mounter.probe(str(image))
    assert (found.fs_type, found.blank) == ("ext4", False)


def test_a_partition_table_is_not_blank(image: Path) -> None:
    # An MBR with one Linux partition (type 0x83) from sector 2048, written by hand.
    entry = struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", 2048, 4096)
    with open(image, "r+b") as img:
        img.seek(446)
        img.write(entry)
        img.seek(510)
        img.write(b"\x55\xaa")
    found = mounter.probe(str(image))
    assert found.other and not found.blank and not found.fs_type


@pytest.mark.parametrize("offset", [0, 512, 700 * 1024, 1024 * 1024 - 1])
def test_any_non_zero_byte_in_the_head_makes_it_dirty(image: Path, offset: int) -> None:
    with open(image, "r+b") as img:
        img.seek(offset)
        img.write(b"\x01")
    found = mounter.probe(str(image))
    assert found.dirty and not found.blank


def test_mountinfo_escapes_are_decoded() -> None:
    assert mounter._unescape(r"/var/lib/with\040space\011tab\134x") == "/var/lib/with space\ttab\\x"
    assert mounter._unescape("/plain") == "/plain"
