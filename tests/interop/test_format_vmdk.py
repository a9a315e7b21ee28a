"""VMDK images made by qemu-img read through VmdkBackend: bytes equal the raw source, block
status agrees with ``qemu-img map``, other subformats and corrupt metadata are refused with
ImageFormatError (fuzzed with hypothesis), never another exception."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.backends.base import Extent
from nbdserver.formats._image import ImageFormatError
from nbdserver.formats.vmdk import VmdkBackend
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
MiB = 1 << 20


def make_source(path: Path, size: int, seed: int) -> bytes:
    """Random data in some 64 KiB-aligned and some unaligned runs, zeroes elsewhere."""
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(12):
        start = rng.randrange(0, size - 1)
        length = min(size - start, rng.choice([512, 4096, 65536, 200_000, 1_000_000]))
        data[start : start + length] = rng.randbytes(length)
    data[0:4096] = rng.randbytes(4096)
    path.write_bytes(data)
    return bytes(data)


def convert(src: Path, dst: Path, options: str) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", options, str(src), str(dst)],
        check=True,
    )


def read(b: VmdkBackend, offset: int, length: int) -> bytes:
    buf = bytearray(b"#" * length)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def qemu_data_ranges(path: Path) -> list[tuple[int, int]]:
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "vmdk", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return merge([(e["start"], e["length"]) for e in json.loads(out) if e["data"]])


def merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in ranges:
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def data_ranges(extents: list[Extent]) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    for e in extents:
        if not e.flags & NBD_STATE_HOLE:
            ranges.append((pos, e.length))
        pos += e.length
    return merge(ranges)


SUBFORMATS = [
    "subformat=monolithicSparse",
    "subformat=monolithicSparse,zeroed_grain=on",
    "subformat=streamOptimized",
]


@pytest.mark.parametrize("options", SUBFORMATS)
@pytest.mark.parametrize("size", [5 * MiB, 3 * MiB + 512 * 7])
def test_vmdk_reads_equal_the_raw_source_everywhere(
    tmp_path: Path, options: str, size: int
) -> None:
    raw = tmp_path / "src.raw"
    source = make_source(raw, size, seed=size)
    image = tmp_path / "disk.vmdk"
    convert(raw, image, options)
    b = VmdkBackend(str(image))
    try:
        assert b.size() == size
        assert read(b, 0, size) == source
        rng = random.Random(7)
        for _ in range(200):
            offset = rng.randrange(0, size)
            length = rng.randrange(1, min(size - offset, 300_000) + 1)
            assert read(b, offset, length) == source[offset : offset + length]
    finally:
        b.close()


@pytest.mark.parametrize("options", SUBFORMATS)
def test_vmdk_block_status_agrees_with_qemu_img_map(tmp_path: Path, options: str) -> None:
    raw = tmp_path / "src.raw"
    source = make_source(raw, 6 * MiB, seed=3)
    image = tmp_path / "disk.vmdk"
    convert(raw, image, options)
    b = VmdkBackend(str(image))
    try:
        extents = b.extents(0, b.size())
        assert sum(e.length for e in extents) == b.size()
        assert data_ranges(extents) == qemu_data_ranges(image)
        pos = 0
        for e in extents:
            if e.flags == HOLE:
                assert source[pos : pos + e.length] == bytes(e.length)
            pos += e.length
        # A query from the middle of a grain starts there.
        assert b.extents(100, 1000)[0] == Extent(1000, 0)
    finally:
        b.close()


def test_an_empty_vmdk_is_all_hole(tmp_path: Path) -> None:
    image = tmp_path / "empty.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(image), "8M"], check=True)
    b = VmdkBackend(str(image))
    try:
        assert b.extents(0, 8 * MiB) == [Extent(8 * MiB, HOLE)]
        assert read(b, 123, 70_000) == bytes(70_000)
    finally:
        b.close()


def test_stream_optimized_with_its_header_in_the_footer_is_read(tmp_path: Path) -> None:
    """The VMware stream layout: header GD offset "at the end", the real header in a footer
    (footer marker, header, end-of-stream marker) at the end of the file."""
    raw = tmp_path / "src.raw"
    source = make_source(raw, 4 * MiB, seed=11)
    image = tmp_path / "disk.vmdk"
    convert(raw, image, "subformat=streamOptimized")
    data = bytearray(image.read_bytes())
    header = bytes(data[:512])
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    data += footer_marker + header + bytes(512)
    struct.pack_into("<Q", data, 56, 0xFFFFFFFFFFFFFFFF)
    image.write_bytes(bytes(data))
    b = VmdkBackend(str(image))
    try:
        assert read(b, 0, 4 * MiB) == source
    finally:
        b.close()


@pytest.mark.parametrize(
    ("subformat", "named"),
    [
        ("twoGbMaxExtentSparse", "twoGbMaxExtentSparse"),
        ("twoGbMaxExtentFlat", "twoGbMaxExtentFlat"),
        ("monolithicFlat", "monolithicFlat"),
    ],
)
def test_other_subformats_are_refused_naming_the_subformat(
    tmp_path: Path, subformat: str, named: str
) -> None:
    image = tmp_path / "disk.vmdk"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            f"subformat={subformat}",
            str(image),
            "4M",
        ],
        check=True,
    )
    with pytest.raises(ImageFormatError, match=named):
        VmdkBackend(str(image))


def test_vmfs_and_delta_disks_are_refused_naming_what_they_are(tmp_path: Path) -> None:
    cowd = tmp_path / "cowd.vmdk"
    cowd.write_bytes(b"COWD" + bytes(4092))
    with pytest.raises(ImageFormatError, match="vmfsSparse"):
        VmdkBackend(str(cowd))
    vmfs = tmp_path / "vmfs.vmdk"
    vmfs.write_text('# Disk DescriptorFile\ncreateType="vmfs"\nRW 8192 VMFS "vmfs-flat.vmdk"\n')
    with pytest.raises(ImageFormatError, match="'vmfs'"):
        VmdkBackend(str(vmfs))
    base = tmp_path / "base.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(base), "4M"], check=True)
    child = tmp_path / "child.vmdk"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(child)],
        check=True,
    )
    with pytest.raises(ImageFormatError, match="parent"):
        VmdkBackend(str(child))


def test_a_file_that_is_not_vmdk_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "x.vmdk"
    image.write_bytes(bytes(4096))
    with pytest.raises(ImageFormatError):
        VmdkBackend(str(image))


def with_grain_entry(tmp_path: Path, options: str, grain: int, value: int) -> tuple[Path, bytes]:
    """A 4 MiB image made with ``options`` whose first grain table says ``value`` for ``grain``;
    returns the image and its raw source."""
    raw = tmp_path / "src.raw"
    source = random.Random(5).randbytes(2 * 65536) + make_source(raw, 4 * MiB, seed=5)[131072:]
    raw.write_bytes(source)  # the first two grains hold data
    image = tmp_path / "disk.vmdk"
    convert(raw, image, options)
    data = bytearray(image.read_bytes())
    gd_offset = struct.unpack_from("<Q", data, 56)[0] * 512
    gt = struct.unpack_from("<I", data, gd_offset)[0] * 512
    assert struct.unpack_from("<I", data, gt + 4 * grain)[0] > 1  # the grain held data
    struct.pack_into("<I", data, gt + 4 * grain, value)
    image.write_bytes(bytes(data))
    return image, source


def test_a_grain_table_pointing_past_the_file_fails_that_read_only(tmp_path: Path) -> None:
    image, source = with_grain_entry(tmp_path, "subformat=monolithicSparse", 1, 0x7FFFFFF0)
    b = VmdkBackend(str(image))
    try:
        with pytest.raises(ImageFormatError) as caught:
            read(b, 65536, 512)
        assert caught.value.errno == 5
        assert read(b, 0, 65536) == source[:65536]  # the rest still serves
    finally:
        b.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("vmdk-seeds")
    raw = tmp / "src.raw"
    make_source(raw, 2 * MiB, seed=1)
    out = {}
    for name in ("monolithicSparse", "streamOptimized"):
        image = tmp / f"{name}.vmdk"
        convert(raw, image, f"subformat={name}")
        out[name] = image.read_bytes()
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["monolithicSparse", "streamOptimized"]),
    edits=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 40_000), st.integers(0, 1_200_000)),  # metadata, grains
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzzed_headers_and_tables_raise_only_image_format_errors(
    seeds: dict[str, bytes], tmp_path: Path, kind: str, edits: list[tuple[int, bytes]]
) -> None:
    data = bytearray(seeds[kind])
    for where, patch in edits:
        data[where : where + len(patch)] = patch
    image = tmp_path / "fuzz.vmdk"
    image.write_bytes(bytes(data))
    try:
        b = VmdkBackend(str(image))
    except ImageFormatError:
        return
    try:
        size = b.size()
        for offset in range(0, min(size, 2 * MiB), 65536):
            try:
                read(b, offset, min(65536, size - offset))
                b.extents(offset, min(65536, size - offset))
            except ImageFormatError:
                pass
    finally:
        b.close()


def test_a_zeroed_grain_entry_reads_as_zeroes_and_is_a_hole(tmp_path: Path) -> None:
    options = "subformat=monolithicSparse,zeroed_grain=on"
    image, source = with_grain_entry(tmp_path, options, 0, 1)  # grain 0 is now a zeroed grain
    b = VmdkBackend(str(image))
    try:
        assert read(b, 0, 65536) == bytes(65536)
        assert read(b, 65536, 4096) == source[65536 : 65536 + 4096]
        assert b.extents(0, 65536) == [Extent(65536, HOLE)]
    finally:
        b.close()


def test_one_block_status_answer_looks_at_a_bounded_number_of_grains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "empty.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(image), "8M"], check=True)
    monkeypatch.setattr("nbdserver.formats.vmdk._STATUS_GRAINS", 4)
    b = VmdkBackend(str(image))
    try:
        assert b.extents(1000, 8 * MiB - 1000) == [Extent(4 * 65536, HOLE)]
    finally:
        b.close()
