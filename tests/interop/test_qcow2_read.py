"""qcow2 read through nbdserver, with qemu-img as the oracle: images of many option combinations
served with --format qcow2 compare equal (``qemu-img compare`` over NBD) to the image itself;
block status comes from the metadata; broken chains and foreign backing files are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory, start_server
from tests.interop.qcow2_helpers import (
    SIZE,
    compare,
    needs_qemu,
    qcow2,
    qemu_io,
    raw_with_data,
    run,
)

pytestmark = [pytest.mark.interop, needs_qemu]

VARIANTS = {
    "v3-64k": ("compat=1.1",),
    "v2-64k": ("compat=0.10",),
    "v3-512": ("cluster_size=512",),
    "v3-2M": ("cluster_size=2M",),
    "v3-4k-refcount64": ("compat=1.1", "cluster_size=4096", "refcount_bits=64"),
    "prealloc-metadata": ("preallocation=metadata",),
    "prealloc-falloc": ("preallocation=falloc", "cluster_size=8192"),
    "extended-l2-64k": ("extended_l2=on",),
    "extended-l2-2M": ("extended_l2=on", "cluster_size=2M"),
}


def _fill(image: Path) -> None:
    qemu_io(image, "qcow2", "write -P 0x44 0 300k", "write -z 2M 1M", "write -P 0x55 3M 5000",
            "discard 0 64k", "write -P 0x66 7M 1M")  # fmt: skip


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_an_image_made_with_options_reads_as_qemu_reads_it(
    tmp_path: Path, nbdserver: NbdServerFactory, variant: str
) -> None:
    image = qcow2(tmp_path / "a.qcow2", *VARIANTS[variant])
    _fill(image)
    srv = nbdserver("--format", "qcow2", "--read-only", image=image, size=None)
    assert compare(srv.uri, "raw", str(image), "qcow2").returncode == 0


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters_read_as_qemu_reads_them(
    tmp_path: Path, nbdserver: NbdServerFactory, compression: str
) -> None:
    pytest.importorskip("zstandard") if compression == "zstd" else None
    raw = raw_with_data(tmp_path / "src.raw")
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}",
        str(raw), str(image))  # fmt: skip
    srv = nbdserver("--format", "qcow2", "--read-only", image=image, size=None)
    assert compare(srv.uri, "raw", str(raw), "raw").returncode == 0


def test_a_backing_chain_of_raw_and_qcow2_files_reads_as_qemu_reads_it(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    raw_with_data(tmp_path / "base.raw", size=SIZE // 2)  # shorter than the images above it
    mid = qcow2(tmp_path / "mid.qcow2", "compat=0.10", backing=tmp_path / "base.raw")
    qemu_io(mid, "qcow2", "write -P 0x77 512k 512k")
    top = qcow2(tmp_path / "top.qcow2", "extended_l2=on", backing=mid, backing_fmt="qcow2")
    qemu_io(top, "qcow2", "write -P 0x88 600k 8k", "write -z 0 4k")
    srv = nbdserver("--format", "qcow2", image=top, size=None)
    assert compare(srv.uri, "raw", str(top), "qcow2").returncode == 0


def test_block_status_comes_from_the_metadata(tmp_path: Path, nbdserver: NbdServerFactory) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    qemu_io(image, "qcow2", "write -P 0x44 0 1M", "write -z 4M 1M")
    srv = nbdserver("--format", "qcow2", "--read-only", image=image, size=None)
    out = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri).stdout)
    runs = [(e["start"], e["length"], e["data"], e["zero"]) for e in out]
    assert runs == [(0, 1 << 20, True, False), (1 << 20, SIZE - (1 << 20), False, True)]


def _refused(tmp_path: Path, *args: str) -> str:
    with pytest.raises(AssertionError) as info:
        start_server([*args, "--bind", "127.0.0.1", "--port", "0"], None, tmp_path, timeout=20)
    return str(info.value)


def test_a_backing_file_outside_the_images_directory_is_refused_unless_allowed(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    outside = raw_with_data(tmp_path / "base.raw")
    (tmp_path / "vm").mkdir()
    top = tmp_path / "vm" / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw", str(top))
    log = _refused(tmp_path, str(top), "--format", "qcow2")
    assert "lies outside" in log and "--backing-anywhere" in log
    srv = nbdserver("--format", "qcow2", "--backing-anywhere", image=top, size=None)
    assert compare(srv.uri, "raw", str(outside), "raw").returncode == 0


def test_a_loop_in_the_backing_chain_is_refused(tmp_path: Path) -> None:
    a = qcow2(tmp_path / "a.qcow2")
    qcow2(tmp_path / "b.qcow2", backing=a, backing_fmt="qcow2")
    run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", str(a))
    assert "backing chain loops" in _refused(tmp_path, str(a), "--format", "qcow2", "-r")


def test_a_missing_backing_file_is_refused(tmp_path: Path) -> None:
    base = raw_with_data(tmp_path / "base.raw")
    top = qcow2(tmp_path / "top.qcow2", backing=base)
    base.unlink()
    assert "does not exist" in _refused(tmp_path, str(top), "--format", "qcow2", "-r")


def test_a_zstd_image_is_refused_clearly_without_the_zstd_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbdserver.formats.qcow2 import tables
    from nbdserver.formats.qcow2.backend import open_qcow2

    raw = raw_with_data(tmp_path / "src.raw")
    image = tmp_path / "z.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd",
        str(raw), str(image))  # fmt: skip
    monkeypatch.setattr(tables, "zstandard", None)
    with pytest.raises(OSError, match="zstd compression: install nbdserver's 'zstd' extra"):
        open_qcow2(str(image), True)


def test_identity_follows_the_file_rules_and_the_backing_chain(tmp_path: Path) -> None:
    from nbdserver.backends.file import FileBackend
    from nbdserver.formats.qcow2.backend import open_qcow2

    base = raw_with_data(tmp_path / "base.raw")
    top = qcow2(tmp_path / "top.qcow2", backing=base)

    def identity(read_only: bool = False) -> str:
        backend = open_qcow2(str(top), read_only)
        backend.close()
        return backend.identity

    first = identity()
    assert first.startswith("qcow2-") and identity() == first  # kept across reopen
    raw = FileBackend(str(top), read_only=True)
    raw.close()
    assert raw.identity != first  # the same file served as raw bytes is other data
    base.unlink()
    raw_with_data(base)  # a replaced backing file: the disk may differ
    assert identity() != first
