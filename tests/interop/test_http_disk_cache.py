"""``--cache-dir``: the read cache of a URL export in a file on local disk, bounded by
``--cache-size``: a second full read by another connection asks the origin nothing, a cache
smaller than the image stays within its bound and still serves the right bytes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_origin import Origin, holey_image
from tests.interop.conftest import REPO, NbdServerFactory

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
MIB = 1024 * 1024
SIZE = 8 * MIB + 4096


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    path = root / "disk.img"
    holey_image(path, SIZE, 4096)
    return path


@pytest.fixture
def origin(image: Path) -> Iterator[Origin]:
    with Origin(image.parent) as o:
        yield o


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


def compare(uri: str, image: Path) -> None:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(image)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def cache_file_size(pid: int) -> int:
    """Size of the server's (unlinked) cache file, found among its open descriptors."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if "nbdserver-cache-" in os.readlink(f"/proc/{pid}/fd/{fd}"):
            return os.stat(f"/proc/{pid}/fd/{fd}").st_size
    raise AssertionError("the server holds no cache file")


def test_a_second_full_read_asks_the_origin_nothing(
    nbdserver: NbdServerFactory, origin: Origin, image: Path, cache_dir: Path
) -> None:
    srv = nbdserver(origin.url("disk.img"), "--cache-size", "16M", "--cache-dir",
                    str(cache_dir), image=None)  # fmt: skip
    compare(srv.uri, image)
    fetched = origin.gets("disk.img")
    assert fetched >= -(-SIZE // MIB)
    compare(srv.uri, image)  # another connection
    assert origin.gets("disk.img") == fetched, origin.requests[fetched:]
    assert list(cache_dir.iterdir()) == []  # unlinked at once: nothing left behind


def test_a_cache_smaller_than_the_image_keeps_its_bound(
    nbdserver: NbdServerFactory, origin: Origin, image: Path, cache_dir: Path
) -> None:
    srv = nbdserver(origin.url("disk.img"), "--cache-size", "2M", "--cache-dir",
                    str(cache_dir), image=None)  # fmt: skip
    for _ in range(2):
        compare(srv.uri, image)
    assert 0 < cache_file_size(srv.proc.pid) <= 2 * MIB


def test_a_cache_dir_without_a_cache_size_is_a_one_line_refusal(
    origin: Origin, cache_dir: Path
) -> None:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0",
           origin.url("disk.img"), "--cache-dir", str(cache_dir)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--cache-dir" in res.stderr.strip().splitlines()[-1]
