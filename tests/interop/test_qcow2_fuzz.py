"""Fuzzed qcow2 metadata never crashes: a mutated header or table either fails the open or fails
requests with an ``OSError`` (EIO on the wire), in process; and a served image whose L2 table
points past the end of the file fails that read while the server keeps serving."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.formats.qcow2.backend import open_qcow2
from tests.interop.conftest import NbdServerFactory
from tests.interop.qcow2_helpers import needs_qemu, qcow2, qemu_io, run

pytestmark = [pytest.mark.interop, needs_qemu]

# Header fields worth hitting hard: (offset, width)
FIELDS = [(4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
          (56, 4), (60, 4), (72, 8), (88, 8), (96, 4), (100, 4), (104, 1)]  # fmt: skip


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image with data, zero and compressed clusters and a backing file."""
    d = tmp_path_factory.mktemp("seed")
    run("qemu-img", "create", "-q", "-f", "raw", str(d / "base.raw"), "1M")
    src = d / "src.raw"
    src.write_bytes(os.urandom(64 << 10) + bytes(64 << 10) + b"x" * (128 << 10))
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", str(src),
        str(d / "c.qcow2"))  # fmt: skip
    image = qcow2(d / "seed.qcow2", "cluster_size=4096", backing=d / "base.raw", size=1 << 20)
    qemu_io(image, "qcow2", "write -P 0x11 0 20k", "write -z 64k 8k")
    sub = qcow2(d / "x.qcow2", "extended_l2=on", "cluster_size=32k", backing=d / "base.raw",
                size=1 << 20)  # fmt: skip
    qemu_io(sub, "qcow2", "write -P 0x22 1000 3000", "write -z 40k 1k", "write -P 0x23 100k 64k")
    return d


def _quietly(call: Callable[..., object], *args: object) -> None:
    """Run one request; an ``OSError`` is the allowed failure (EIO on the wire)."""
    with contextlib.suppress(OSError):
        call(*args)


def _exercise(path: Path, read_only: bool) -> None:
    try:
        backend = open_qcow2(str(path), read_only)
    except OSError:
        return
    try:
        size = min(backend.size(), 4 << 20)
        for offset in range(0, size, 256 << 10):
            n = min(256 << 10, size - offset)
            _quietly(backend.pread, memoryview(bytearray(n)), offset)
            _quietly(backend.extents, offset, n)
            if not read_only:
                _quietly(backend.pwrite, b"z" * 5000, offset + 100, False)
                _quietly(backend.zero, offset, n // 2, True, False, False)
    finally:
        backend.close()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(["seed.qcow2", "c.qcow2", "x.qcow2"]),
    fields=st.lists(st.tuples(st.sampled_from(FIELDS), st.integers(0, 2**64 - 1)), max_size=3),
    bytes_=st.lists(st.tuples(st.integers(0, 48 << 10), st.integers(0, 255)), max_size=8),
    read_only=st.booleans(),
)
def test_mutated_metadata_fails_cleanly(
    seed: Path, tmp_path: Path, name: str, fields: list[tuple[tuple[int, int], int]],
    bytes_: list[tuple[int, int]], read_only: bool,
) -> None:  # fmt: skip
    image = tmp_path / "fuzz.qcow2"
    shutil.copyfile(seed / name, image)
    shutil.copyfile(seed / "base.raw", tmp_path / "base.raw")
    with open(image, "r+b") as f:
        data = bytearray(f.read())
        for (offset, width), value in fields:
            data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "big")
        for offset, value in bytes_:
            if offset < len(data):
                data[offset] = value
        f.seek(0)
        f.write(data)
    _exercise(image, read_only)


def test_a_table_past_the_end_fails_the_read_and_the_server_stays_up(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    image = qcow2(tmp_path / "a.qcow2", "cluster_size=4096", size=1 << 20)
    qemu_io(image, "qcow2", "write -P 0x11 0 8k")
    with open(image, "r+b") as f:
        f.seek(40)
        (l1_offset,) = struct.unpack(">Q", f.read(8))
        f.seek(l1_offset)
        f.write(struct.pack(">Q", (1 << 63) | (1 << 40)))  # L2 table 1 TiB into a tiny file
    srv = nbdserver("--format", "qcow2", "--read-only", image=image, size=None)
    bad = run("qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", srv.uri, ok=(0, 1))
    assert "Input/output error" in bad.stdout + bad.stderr
    good = run("qemu-img", "info", "-f", "raw", srv.uri)
    assert "virtual size: 1 MiB" in good.stdout
