"""``nbdserver import s3://...`` against moto's S3 server, and both ``serve`` and ``import``
through a proxy answering 503 SlowDown: a few are retried away, a store that never recovers
fails one read with EIO (the server stays up) or the import with exit 1."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_origin import holey_image
from tests.import_helpers import one_line_failure, progress_lines, run_import
from tests.interop.conftest import NbdServerFactory
from tests.s3_store import FaultyProxy, moto_store, put

pytest.importorskip("botocore.session")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
SIZE = 17 * 1024 * 1024 + 512  # three 8 MiB import requests, the last one short
KEY = "golden/disk.img"
URL = f"s3://images/{KEY}"


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Credentials from the environment (the chain's first link); nothing else is asked."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto_store() as url:
        yield url


@pytest.fixture
def image(endpoint: str, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    holey_image(path, SIZE, 8192, tag=False)
    put(endpoint, "images", KEY, path.read_bytes())
    return path


@pytest.fixture
def proxy(endpoint: str) -> Iterator[FaultyProxy]:
    with FaultyProxy(endpoint, match=KEY) as p:
        yield p


def compare(a: str, b: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", a, str(b)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_an_s3_object_is_imported_and_verified(endpoint: str, image: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out.img"
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    res = run_import(URL, str(dest), "--s3-endpoint", endpoint, "--sha256", digest,
                     "--progress", "json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert compare(str(dest), image).returncode == 0
    assert progress_lines(res.stdout)[-1] == {
        "phase": "done",
        "bytes": SIZE,
        "totalBytes": SIZE,
        "rateBytesPerSecond": progress_lines(res.stdout)[-1]["rateBytesPerSecond"],
        "message": f"imported {SIZE} bytes from {URL}",
        "sha256": digest,
    }


def test_a_missing_s3_key_is_exit_2_naming_the_status(endpoint: str, tmp_path: Path) -> None:
    res = run_import("s3://images/none.img", str(tmp_path / "o.img"), "--s3-endpoint", endpoint)
    one_line_failure(res, 2, "HTTP 404")


def test_s3_503s_are_retried_by_serve_and_import(
    nbdserver: NbdServerFactory, proxy: FaultyProxy, image: Path, tmp_path: Path
) -> None:
    proxy.fail(4)  # the HeadObject at open among them
    srv = nbdserver(URL, "--s3-endpoint", proxy.endpoint, "--remote-timeout", "20", image=None)
    proxy.fail(4)
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr
    proxy.fail(5)
    dest = tmp_path / "out.img"
    done = run_import(URL, str(dest), "--s3-endpoint", proxy.endpoint, "--remote-timeout", "20")
    assert done.returncode == 0, done.stderr
    assert compare(str(dest), image).returncode == 0
    assert proxy.hits >= 13


def test_an_s3_store_that_never_recovers_fails_that_read_and_the_server_stays_up(
    nbdserver: NbdServerFactory, proxy: FaultyProxy, image: Path, tmp_path: Path
) -> None:
    srv = nbdserver(URL, "--s3-endpoint", proxy.endpoint, "--remote-timeout", "1", image=None)
    proxy.fail(-1)
    cmd = ["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", srv.uri]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert "Input/output error" in res.stdout + res.stderr, res
    assert srv.proc.poll() is None
    srv.wait_log("SlowDown")
    failed = run_import(URL, str(tmp_path / "o.img"), "--s3-endpoint", proxy.endpoint,
                        "--remote-timeout", "1")  # fmt: skip
    one_line_failure(failed, 1, "HTTP 503")
    proxy.clear()
    ok = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", srv.uri],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "read 4096/4096" in ok.stdout, ok
