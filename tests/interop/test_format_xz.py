"""xz files made by ``xz --block-size`` read through XzBackend: bytes equal the source at random
offsets (one stream or several, with stream padding), only the needed blocks are decompressed,
one huge block is refused with advice, and corruption raises only ImageFormatError."""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver.formats._image import ImageFormatError
from nbdserver.formats.xz import Block, XzBackend

pytestmark = pytest.mark.skipif(shutil.which("xz") is None, reason="needs xz")
KiB, MiB = 1 << 10, 1 << 20


def random_and_zero(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(size)
    for _ in range(10):
        start = rng.randrange(0, size)
        length = min(size - start, rng.choice([1, 4096, 100_000, 700_000]))
        data[start : start + length] = rng.randbytes(length)
    return bytes(data)


def compress(data: bytes, *options: str) -> bytes:
    return subprocess.run(
        ["xz", "-T1", "-c", *options], input=data, check=True, capture_output=True
    ).stdout


def read(b: XzBackend, offset: int, length: int) -> bytes:
    buf = bytearray(b"#" * length)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def open_bytes(tmp_path: Path, image: bytes, **kwargs: int) -> XzBackend:
    path = tmp_path / "disk.xz"
    path.write_bytes(image)
    return XzBackend(str(path), **kwargs)


def compare_at_random_offsets(b: XzBackend, source: bytes, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(150):
        offset = rng.randrange(0, len(source))
        length = rng.randrange(1, min(len(source) - offset, 3 * MiB) + 1)
        assert read(b, offset, length) == source[offset : offset + length]


@pytest.mark.parametrize(
    ("size", "block"), [(5 * MiB + 123, "1MiB"), (3 * MiB, "64KiB"), (2 * MiB, "4MiB")]
)
def test_xz_reads_equal_the_source_at_random_offsets(tmp_path: Path, size: int, block: str) -> None:
    source = random_and_zero(size, seed=size)
    b = open_bytes(tmp_path, compress(source, f"--block-size={block}"))
    try:
        assert b.size() == size
        assert read(b, 0, size) == source
        compare_at_random_offsets(b, source, seed=1)
    finally:
        b.close()


def test_concatenated_streams_with_padding_read_as_one_disk(tmp_path: Path) -> None:
    first = random_and_zero(2 * MiB + 5, seed=1)
    second = random_and_zero(3 * MiB, seed=2)
    third = random_and_zero(100 * KiB, seed=3)
    image = (
        compress(first, "--block-size=512KiB")
        + bytes(8)
        + compress(second, "--block-size=1MiB", "--check=sha256")
        + compress(third, "--check=none")
        + bytes(4)
    )
    b = open_bytes(tmp_path, image)
    try:
        source = first + second + third
        assert b.size() == len(source)
        compare_at_random_offsets(b, source, seed=2)
    finally:
        b.close()


def test_a_read_decompresses_only_the_blocks_it_touches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = random_and_zero(8 * MiB, seed=4)
    b = open_bytes(tmp_path, compress(source, "--block-size=1MiB"), cache_blocks=2)
    decoded: list[int] = []
    real = b._decompress

    def counting(block: Block) -> bytes:
        decoded.append(block.data_offset)
        return real(block)

    monkeypatch.setattr(b, "_decompress", counting)
    try:
        assert read(b, 5 * MiB + 10, 100) == source[5 * MiB + 10 : 5 * MiB + 110]
        assert read(b, 5 * MiB + 500, 100) == source[5 * MiB + 500 : 5 * MiB + 600]
        assert decoded == [5 * MiB]  # the second read came from the cache
        assert read(b, MiB - 50, 100) == source[MiB - 50 : MiB + 50]
        assert decoded == [5 * MiB, 0, MiB]
        assert len(b._cache) == 2  # bounded
    finally:
        b.close()


def test_a_single_block_xz_is_refused_with_advice(tmp_path: Path) -> None:
    source = random_and_zero(3 * MiB, seed=5)
    with pytest.raises(ImageFormatError, match=r"xz --block-size=16MiB"):
        open_bytes(tmp_path, compress(source), max_block=MiB)
    open_bytes(tmp_path, compress(source, "--block-size=1MiB"), max_block=MiB).close()


def test_a_file_that_is_not_xz_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageFormatError, match="not an xz file"):
        open_bytes(tmp_path, bytes(4096) + b"hello world!")


def test_a_corrupt_block_fails_only_the_reads_that_touch_it(tmp_path: Path) -> None:
    source = random_and_zero(4 * MiB, seed=6)
    image = bytearray(compress(source, "--block-size=1MiB"))
    image[12 + 200] ^= 0xFF  # inside the first block's compressed data
    b = open_bytes(tmp_path, bytes(image))
    try:
        with pytest.raises(ImageFormatError) as caught:
            read(b, 0, 4096)
        assert caught.value.errno == 5
        assert read(b, 2 * MiB, 4096) == source[2 * MiB : 2 * MiB + 4096]
    finally:
        b.close()


@pytest.fixture(scope="module")
def seed_image() -> bytes:
    return compress(random_and_zero(600 * KiB, seed=7), "--block-size=64KiB")


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(-400, 400), st.binary(min_size=1, max_size=6)), min_size=1, max_size=5
    ),
)
def test_fuzzed_xz_raises_only_image_format_errors(
    seed_image: bytes, tmp_path: Path, edits: list[tuple[int, bytes]]
) -> None:
    """Edits near the start (stream header, first blocks) and the end (index, footer)."""
    data = bytearray(seed_image)
    for where, patch in edits:
        at = where if where >= 0 else len(data) + where
        data[at : at + len(patch)] = patch
    try:
        b = open_bytes(tmp_path, bytes(data))
    except ImageFormatError:
        return
    try:
        for offset in range(0, b.size(), 64 * KiB):
            with contextlib.suppress(ImageFormatError):
                read(b, offset, min(64 * KiB, b.size() - offset))
    finally:
        b.close()
