"""Redirects at open: ``serve`` and ``import`` of an http(s) URL follow 301, 302, 303, 307 and
308 (also to another host), at most five of them, and refuse a downgrade from https to http."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.http_origin import Origin
from tests.import_helpers import one_line_failure, run_import
from tests.interop.conftest import REPO, NbdServerFactory

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
SIZE = 3 * 1024 * 1024 + 512


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    path = root / "disk.img"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def origin(image: Path) -> Iterator[Origin]:
    with Origin(image.parent) as o:
        yield o


def compare(a: str, b: Path) -> None:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", a, str(b)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_serve_and_import_follow_a_redirect(
    nbdserver: NbdServerFactory, origin: Origin, image: Path, tmp_path: Path, status: int
) -> None:
    origin.redirects["old.img"] = (status, "/moved/here")
    origin.redirects["moved/here"] = (status, origin.url("disk.img"))  # relative, then absolute
    srv = nbdserver(origin.url("old.img"), image=None)
    compare(srv.uri, image)
    dest = tmp_path / "out.img"
    res = run_import(origin.url("old.img"), str(dest))
    assert res.returncode == 0, res.stderr
    compare(str(dest), image)


def test_a_redirect_to_another_host_sends_every_read_there(
    nbdserver: NbdServerFactory, origin: Origin, image: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    with Origin(tmp_path / "empty") as front:
        front.redirects["disk.img"] = (302, origin.url("disk.img"))
        srv = nbdserver(front.url("disk.img"), image=None)
        compare(srv.uri, image)
        assert front.requests == []
        assert origin.gets("disk.img") >= 2


def test_a_redirect_loop_is_a_one_line_refusal(origin: Origin, tmp_path: Path) -> None:
    origin.redirects["a.img"] = (302, "/b.img")
    origin.redirects["b.img"] = (302, "/a.img")
    res = serve_once(origin.url("a.img"))
    one_line_failure(res, 2, "more than 5 redirects")
    one_line_failure(run_import(origin.url("a.img"), str(tmp_path / "o.img")), 2, "redirects")


def test_a_redirect_from_https_to_http_is_refused(origin: Origin, tmp_path: Path) -> None:
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    (tmp_path / "empty").mkdir()
    with Origin(tmp_path / "empty", tls=ctx) as secure:
        secure.redirects["disk.img"] = (301, origin.url("disk.img"))
        url = secure.url("disk.img", host="localhost")
        one_line_failure(serve_once(url, "--ca-bundle", str(bundle)), 2, "https to http")
        res = run_import(url, str(tmp_path / "o.img"), "--ca-bundle", str(bundle))
        one_line_failure(res, 2, "https to http")
    assert origin.requests == []
