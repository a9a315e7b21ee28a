"""qcow2, VMDK and xz images served from an HTTP origin (tests/http_origin.py) and from a
plugin: ``qemu-img compare`` reads the export through NBD against the local image as qemu reads
it. The read cache sits under the format, so a second full read fetches nothing; a remote
qcow2 that names a backing file is refused in one line."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_origin import Origin
from tests.interop.conftest import REPO, NbdServerFactory

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-img") is None or shutil.which("xz") is None,
        reason="needs qemu-img and xz",
    ),
]
MiB = 1 << 20
SIZE = 6 * MiB


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd}: {res.stdout}{res.stderr}"
    return res


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Random data with zero runs and a hole, so a wrong mapping cannot compare equal."""
    rng = random.Random(15)
    root = tmp_path / "www"
    root.mkdir()
    path = root / "disk.raw"
    data = bytearray(SIZE)
    for i in range(0, SIZE, 256 * 1024):
        if rng.random() < 0.7:
            data[i : i + 256 * 1024] = rng.randbytes(256 * 1024)
    path.write_bytes(data)
    return path


@pytest.fixture
def www(raw: Path) -> Path:
    root = raw.parent
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=65536", str(raw),
        str(root / "disk.qcow2"))  # fmt: skip
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", str(raw),
        str(root / "disk.vmdk"))  # fmt: skip
    xz = subprocess.run(["xz", "-c", "-1", "--block-size=1MiB", str(raw)], capture_output=True,
                        check=True, timeout=60)  # fmt: skip
    (root / "disk.xz").write_bytes(xz.stdout)
    return root


@pytest.fixture
def origin(www: Path) -> Iterator[Origin]:
    with Origin(www, slow=10.0) as o:
        yield o


def compare(uri: str, image: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", fmt, uri, str(image)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_the_qcow2_is_compressed_and_the_xz_has_several_blocks(www: Path) -> None:
    """The images are what the other tests claim (compressed clusters, many xz blocks)."""
    info = run("qemu-img", "check", "--output=json", str(www / "disk.qcow2")).stdout
    assert '"compressed-clusters": 0' not in info, info
    listing = run("xz", "--robot", "--list", str(www / "disk.xz")).stdout
    blocks = next(line for line in listing.splitlines() if line.startswith("totals"))
    assert int(blocks.split("\t")[2]) >= 6, listing


@pytest.mark.parametrize(
    ("name", "fmt", "qemu_fmt"),
    [("disk.qcow2", "qcow2", "qcow2"), ("disk.vmdk", "vmdk", "vmdk"), ("disk.xz", "xz", "raw")],
)
@pytest.mark.parametrize("cache", [[], ["--cache-size", "16M"]], ids=["uncached", "cached"])
def test_a_formatted_image_over_http_reads_as_qemu_reads_it(
    nbdserver: NbdServerFactory, origin: Origin, www: Path, raw: Path, name: str, fmt: str,
    qemu_fmt: str, cache: list[str],
) -> None:  # fmt: skip
    srv = nbdserver(origin.url(name), "--format", fmt, "--read-only", *cache, image=None)
    local = raw if fmt == "xz" else www / name
    res = compare(srv.uri, local, qemu_fmt)
    assert res.returncode == 0, res.stdout + res.stderr
    other = www / "other.raw"
    other.write_bytes(raw.read_bytes()[::-1])
    differs = compare(srv.uri, other, "raw")
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_the_cache_under_the_format_fetches_each_block_about_once(
    nbdserver: NbdServerFactory, origin: Origin, www: Path
) -> None:
    srv = nbdserver(origin.url("disk.qcow2"), "--format", "qcow2", "--cache-size", "64M",
                    image=None)  # fmt: skip
    assert compare(srv.uri, www / "disk.qcow2", "qcow2").returncode == 0
    first = origin.gets("disk.qcow2")
    blocks = -(-(www / "disk.qcow2").stat().st_size // MiB)
    assert first <= blocks + 2, (first, blocks)  # each 1 MiB block once, and the size probe
    assert compare(srv.uri, www / "disk.qcow2", "qcow2").returncode == 0
    assert origin.gets("disk.qcow2") == first


def test_a_qcow2_over_http_is_read_only_and_copy_on_write_takes_writes(
    nbdserver: NbdServerFactory, origin: Origin, www: Path, raw: Path, tmp_path: Path
) -> None:
    srv = nbdserver(origin.url("disk.qcow2"), "--format", "qcow2", image=None)
    listing = run("nbdinfo", "--json", srv.uri).stdout if shutil.which("nbdinfo") else ""
    if listing:
        assert '"is_read_only": true' in listing, listing
    srv.stop()
    before = (www / "disk.qcow2").read_bytes()
    srv = nbdserver(origin.url("disk.qcow2"), "--format", "qcow2", "--copy-on-write",
                    image=None)  # fmt: skip
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", srv.uri)
    got = run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", srv.uri)
    assert "Pattern verification failed" not in got.stdout, got.stdout
    assert (www / "disk.qcow2").read_bytes() == before


def test_a_remote_qcow2_with_a_backing_file_is_refused_in_one_line(
    origin: Origin, www: Path, raw: Path
) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw",
        str(www / "top.qcow2"))  # fmt: skip
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0",
           origin.url("top.qcow2"), "--format", "qcow2", "--read-only"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserver: ") and "backing file" in last, res.stderr
    assert "disk.raw" in last and "flatten" in last, last
