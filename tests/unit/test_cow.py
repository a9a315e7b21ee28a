"""Copy-on-write: the base never changes, reads merge, extents describe both layers."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.backends.base import Extent
from nbdserver.backends.file import FileBackend
from nbdserver.backends.memory import MemoryBackend
from nbdserver.filters.cow import CowFilter
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

BLOCK = 4096
SIZE = 16 * BLOCK + 1000  # a short last block on purpose


def _read(backend: CowFilter | MemoryBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.pread(memoryview(buf), offset)
    return bytes(buf)


def _base(size: int = SIZE) -> tuple[MemoryBackend, bytes]:
    base = MemoryBackend(size)
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(size))
    base.pwrite(pattern, 0, False)
    base.zero(8 * BLOCK, 2 * BLOCK, True, False, False)  # a hole in the base
    data = bytearray(pattern)
    data[8 * BLOCK : 10 * BLOCK] = bytes(2 * BLOCK)
    return base, bytes(data)


def _covering(extents: list[Extent], length: int) -> list[Extent]:
    total = 0
    out = []
    for e in extents:
        out.append(e)
        total += e.length
        if total >= length:
            break
    assert total >= length, "extents must cover the asked range"
    return out


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "trim"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 3 * BLOCK),
        st.integers(0, 255),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_cow_behaves_like_a_private_copy_and_never_touches_the_base(
    sequence: list[tuple[str, int, int, int]],
) -> None:
    base, original = _base()
    cow = CowFilter(base, block=BLOCK)
    model = bytearray(original)
    try:
        for op, offset, length, byte in sequence:
            length = min(length, SIZE - offset)
            if op == "write":
                cow.pwrite(bytes([byte]) * length, offset, False)
                model[offset : offset + length] = bytes([byte]) * length
            elif op == "zero":
                cow.zero(offset, length, True, False, False)
                model[offset : offset + length] = bytes(length)
            else:
                cow.trim(offset, length, False)
                model[offset : offset + length] = bytes(length)
        assert _read(cow, 0, SIZE) == bytes(model)
        assert _read(base, 0, SIZE) == original
        # Every extent flagged ZERO really reads as zeroes, and they tile the export.
        pos = 0
        for ext in _covering(cow.extents(0, SIZE), SIZE):
            if ext.flags & NBD_STATE_ZERO:
                assert model[pos : pos + ext.length] == bytes(min(ext.length, SIZE - pos))
            pos += ext.length
    finally:
        cow.close()


def test_extents_report_base_holes_overlay_data_and_overlay_zeroes() -> None:
    base, _ = _base()
    cow = CowFilter(base, block=BLOCK)
    try:
        cow.pwrite(b"\x01" * BLOCK, 0, False)  # overlay data in a base-data region
        cow.pwrite(b"\x02" * BLOCK, 8 * BLOCK, False)  # overlay data inside the base hole
        cow.zero(2 * BLOCK, 2 * BLOCK, True, False, False)  # overlay zeroes over base data
        got = _covering(cow.extents(0, 10 * BLOCK), 10 * BLOCK)
        hole = NBD_STATE_HOLE | NBD_STATE_ZERO
        assert got == [
            Extent(2 * BLOCK, 0),
            Extent(2 * BLOCK, hole),
            Extent(5 * BLOCK, 0),
            Extent(BLOCK, hole),
        ]
    finally:
        cow.close()


def test_untouched_cow_delegates_reads_and_extents_to_the_base() -> None:
    base, original = _base()
    cow = CowFilter(base, block=BLOCK)
    assert cow.extents(0, SIZE) == base.extents(0, SIZE)
    assert _read(cow, 100, 5000) == original[100:5100]
    assert cow.can_write and cow.fileno() is None
    cow.close()


def test_read_only_file_base_is_byte_identical_after_writes(tmp_path: Path) -> None:
    image = tmp_path / "base.img"
    image.write_bytes(os.urandom(256 * 1024))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    base = FileBackend(str(image), read_only=True)
    cow = CowFilter(base, cow_dir=str(tmp_path))
    try:
        assert not base.can_write and cow.can_write
        cow.pwrite(b"A" * 70000, 1234, True)
        cow.zero(100000, 50000, True, False, True)
        cow.trim(200000, 4096, False)
        cow.flush()
        assert _read(cow, 1234, 70000) == b"A" * 70000
        assert _read(cow, 100000, 50000) == bytes(50000)
        # The overlay was unlinked at creation: nothing is left in the cow directory.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["base.img"]
    finally:
        cow.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_concurrent_partial_writes_to_one_block_lose_nothing() -> None:
    base = MemoryBackend(BLOCK)
    base.pwrite(b"\xee" * BLOCK, 0, False)
    cow = CowFilter(base, block=BLOCK)
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        cow.pwrite(bytes([i]) * 256, i * 512, False)  # each writes its own slice

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = _read(cow, 0, BLOCK)
    for i in range(8):
        assert data[i * 512 : i * 512 + 256] == bytes([i]) * 256
        assert data[i * 512 + 256 : i * 512 + 512] == b"\xee" * 256
    cow.close()


def test_zeroes_fall_back_to_writing_where_holes_cannot_be_punched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno as errno_mod

    import nbdserver.filters.cow as cow_mod

    def no_punch(fd: int, offset: int, length: int) -> None:
        raise OSError(errno_mod.EOPNOTSUPP, "no hole punching here")

    monkeypatch.setattr(cow_mod, "punch_hole", no_punch)
    base = MemoryBackend(3 << 20)
    base.pwrite(b"\xff" * (3 << 20), 0, False)
    cow = CowFilter(base)
    try:
        cow.zero(100, (2 << 20) + 5, True, False, False)  # spans more than one fallback chunk
        data = _read(cow, 0, 3 << 20)
        assert data[:100] == b"\xff" * 100
        assert data[100 : 100 + (2 << 20) + 5] == bytes((2 << 20) + 5)
        assert data[100 + (2 << 20) + 5 :] == b"\xff" * ((1 << 20) - 105)
    finally:
        cow.close()
