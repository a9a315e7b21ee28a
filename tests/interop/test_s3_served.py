"""``nbdserver serve s3://bucket/key`` against moto's S3 server, started here on 127.0.0.1:
qemu-img compares what is served with the object; the endpoint comes from ``--s3-endpoint`` or
``AWS_ENDPOINT_URL``; a missing key or bucket is a one-line refusal naming the status; a qcow2
object is served as the disk inside with ``--format qcow2``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http_origin import holey_image
from tests.interop.conftest import REPO, NbdServerFactory

botocore_session = pytest.importorskip("botocore.session")
moto_server = pytest.importorskip("moto.server")
pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
SIZE = 3 * 1024 * 1024 + 512


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment (the chain's first link); nothing else is asked."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def endpoint(aws_env: None) -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def image(endpoint: str, tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    holey_image(path, SIZE, 8192, tag=False)
    client = botocore_session.get_session().create_client("s3", endpoint_url=endpoint)
    try:
        client.create_bucket(Bucket="images")
        client.put_object(Bucket="images", Key="golden/disk.img", Body=path.read_bytes())
    finally:
        client.close()
    return path


def compare(uri: str, image: Path) -> subprocess.CompletedProcess[str]:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(image)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def test_an_s3_object_is_served_as_its_bytes(
    nbdserver: NbdServerFactory, endpoint: str, image: Path
) -> None:
    srv = nbdserver("s3://images/golden/disk.img", "--s3-endpoint", endpoint,
                    "--cache-size", "2M", image=None)  # fmt: skip
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr
    (image.parent / "other.img").write_bytes(bytes(SIZE))
    differs = compare(srv.uri, image.parent / "other.img")
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_the_endpoint_comes_from_aws_endpoint_url_without_the_flag(
    nbdserver: NbdServerFactory,
    endpoint: str,
    image: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    srv = nbdserver("s3://images/golden/disk.img", image=None)
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("url", "words"),
    [("s3://images/golden/missing.img", "HTTP 404"), ("s3://nobucket/disk.img", "HTTP 404")],
)
def test_a_missing_object_or_bucket_is_a_one_line_refusal(
    endpoint: str, image: Path, url: str, words: str
) -> None:
    res = serve_once(url, "--s3-endpoint", endpoint)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserver: ") and words in last and url in last, res.stderr


def test_an_unreachable_store_fails_reads_with_eio_and_the_server_stays_up(
    nbdserver: NbdServerFactory, aws_env: None, image: Path, tmp_path: Path
) -> None:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = botocore_session.get_session().create_client(
            "s3", endpoint_url=f"http://{host}:{port}"
        )
        client.create_bucket(Bucket="bucket")
        client.put_object(Bucket="bucket", Key="k", Body=image.read_bytes())
        client.close()
        srv = nbdserver("s3://bucket/k", "--s3-endpoint", f"http://{host}:{port}",
                        "--remote-timeout", "1", image=None)  # fmt: skip
    finally:
        server.stop()  # the store goes away under a running server
    cmd = ["qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", srv.uri]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert "Input/output error" in res.stdout + res.stderr, res
    assert srv.proc.poll() is None
    srv.wait_log("giving up")


def test_a_compressed_qcow2_object_is_served_as_the_disk_inside(
    nbdserver: NbdServerFactory, endpoint: str, image: Path
) -> None:
    """--format qcow2 over s3:// reads the container through the S3 backend (cache under it)."""
    qcow2 = image.parent / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(image), str(qcow2)],
                   check=True, timeout=60)  # fmt: skip
    client = botocore_session.get_session().create_client("s3", endpoint_url=endpoint)
    try:
        client.put_object(Bucket="images", Key="golden/disk.qcow2", Body=qcow2.read_bytes())
    finally:
        client.close()
    srv = nbdserver("s3://images/golden/disk.qcow2", "--s3-endpoint", endpoint, "--format",
                    "qcow2", "--cache-size", "4M", image=None)  # fmt: skip
    res = compare(srv.uri, image)
    assert res.returncode == 0, res.stdout + res.stderr
