"""``nbdserver serve http(s)://...`` end to end: qemu-img compares what is served over NBD with
the image on the origin; refusals at start are one line with exit 2; a read past its deadline is
an NBD error while the server keeps serving; the cache fetches each block about once."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.http_origin import Origin, holey_image
from tests.interop.conftest import REPO, NbdServerFactory

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-img and qemu-io",
)
MIB = 1024 * 1024
SIZE = 8 * MIB + 4096  # a short last cache block


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    path = root / "disk.img"
    holey_image(path, SIZE, 4096)
    return path


@pytest.fixture
def origin(image: Path) -> Iterator[Origin]:
    with Origin(image.parent, slow=10.0) as o:
        yield o


def compare(uri: str, image: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(image)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def qemu_io(uri: str, *commands: str, read_only: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for c in commands:
        cmd += ["-c", c]
    return subprocess.run([*cmd, uri], capture_output=True, text=True, timeout=60)


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def one_line_refusal(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserver: ") and all(w in last for w in words), res.stderr


@pytest.mark.parametrize("cache", [[], ["--cache-size", "4M"]], ids=["uncached", "cached"])
def test_an_http_image_is_served_as_its_bytes(
    nbdserver: NbdServerFactory, origin: Origin, image: Path, cache: list[str]
) -> None:
    srv = nbdserver(origin.url("disk.img"), *cache, image=None)
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr
    (image.parent / "other.img").write_bytes(image.read_bytes()[::-1])
    differs = compare(srv.uri, image.parent / "other.img")
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_an_https_image_is_served_when_the_ca_bundle_vouches_for_it(
    nbdserver: NbdServerFactory, image: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with Origin(image.parent, tls=ctx) as o:
        url = o.url("disk.img", host="localhost")
        one_line_refusal(serve_once(url), "certificate")
        srv = nbdserver(url, "--ca-bundle", str(bundle), image=None)
        res = compare(srv.uri, image)
        assert res.returncode == 0, res.stdout + res.stderr
        srv.stop()


@pytest.mark.parametrize("status", [403, 404])
def test_a_url_answering_403_or_404_at_start_is_a_one_line_refusal(
    origin: Origin, status: int
) -> None:
    origin.status["disk.img"] = status
    one_line_refusal(serve_once(origin.url("disk.img")), f"HTTP {status}")


def test_a_server_without_range_support_is_a_one_line_refusal(origin: Origin) -> None:
    origin.ranges = False
    one_line_refusal(serve_once(origin.url("disk.img")), "range requests")


def test_reads_succeed_through_injected_503s_resets_and_slowness(
    nbdserver: NbdServerFactory, origin: Origin, image: Path
) -> None:
    srv = nbdserver(origin.url("disk.img"), "--remote-timeout", "20", image=None)
    origin.fail(3, "503")
    origin.fail(2, "reset")
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr
    assert srv.proc.poll() is None


def test_a_read_past_its_deadline_is_an_eio_and_the_server_keeps_serving(
    nbdserver: NbdServerFactory, origin: Origin, image: Path
) -> None:
    srv = nbdserver(origin.url("disk.img"), "--remote-timeout", "1", image=None)
    origin.fail(100000, "503")
    failed = qemu_io(srv.uri, "read 0 4k")
    assert "Input/output error" in failed.stdout + failed.stderr, failed
    line = srv.wait_log(r"export '': READ offset 0 length 4096 from \S+ failed: EIO")
    assert "503" in line, line
    origin.clear()
    ok = qemu_io(srv.uri, "read -P 0 8200 100")  # past the random bytes: a hole
    assert ok.returncode == 0 and "read 100/100" in ok.stdout, ok
    assert srv.proc.poll() is None


def test_the_cache_fetches_each_block_about_once(
    nbdserver: NbdServerFactory, origin: Origin, image: Path
) -> None:
    srv = nbdserver(origin.url("disk.img"), "--cache-size", "16M", image=None)
    probe = origin.gets("disk.img")
    for _ in range(3):
        assert compare(srv.uri, image).returncode == 0
    blocks = -(-SIZE // MIB)
    fetched = origin.gets("disk.img") - probe
    assert blocks <= fetched <= blocks + 2, origin.requests  # two clients may race for one


def test_writes_go_to_a_local_overlay_with_copy_on_write(
    nbdserver: NbdServerFactory, origin: Origin, image: Path
) -> None:
    before = image.read_bytes()
    plain = nbdserver(origin.url("disk.img"), image=None)
    refused = qemu_io(plain.uri, "write -P 7 0 4k", read_only=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused  # read-only
    cow = nbdserver(origin.url("disk.img"), "--copy-on-write", "--cache-size", "2M", image=None)
    wrote = qemu_io(cow.uri, "write -P 7 0 4k", "read -P 7 0 4k", read_only=False)
    assert wrote.returncode == 0 and "read 4096/4096" in wrote.stdout, wrote
    assert image.read_bytes() == before
