"""The http backend against a local origin: sizes, refusals, retries, deadlines, identity, TLS."""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from nbdserver.backends.base import RemoteOptions
from nbdserver.backends.http import HttpBackend
from nbdserver.errors import ConfigError
from tests.http_origin import Origin

DATA = os.urandom(3 * 65536 + 123)


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    (tmp_path / "disk.img").write_bytes(DATA)
    with Origin(tmp_path, slow=5.0) as o:
        yield o


def read(backend: HttpBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    backend.pread(memoryview(buf), offset)
    return bytes(buf)


def test_size_and_ranges_come_from_the_origin(origin: Origin) -> None:
    backend = HttpBackend(origin.url("disk.img"), RemoteOptions())
    try:
        assert backend.size() == len(DATA)
        assert read(backend, 70000, 5000) == DATA[70000:75000]
        assert read(backend, len(DATA) - 10, 10) == DATA[-10:]
        assert not backend.can_write
    finally:
        backend.close()


@pytest.mark.parametrize("status", [403, 404, 500])
def test_a_url_answering_an_error_at_start_is_refused_naming_the_status(
    origin: Origin, status: int
) -> None:
    origin.status["disk.img"] = status
    with pytest.raises(ConfigError, match=f"HTTP {status}"):
        HttpBackend(origin.url("disk.img"), RemoteOptions(timeout=0.5))


def test_a_missing_file_is_refused_as_404(origin: Origin) -> None:
    with pytest.raises(ConfigError, match=r"missing\.img: HTTP 404 Not Found"):
        HttpBackend(origin.url("missing.img"), RemoteOptions())


def test_a_server_without_ranges_is_refused(origin: Origin) -> None:
    origin.ranges = False
    with pytest.raises(ConfigError, match="does not support range requests"):
        HttpBackend(origin.url("disk.img"), RemoteOptions())


def test_reads_succeed_after_injected_503s_and_resets(origin: Origin) -> None:
    backend = HttpBackend(origin.url("disk.img"), RemoteOptions(timeout=10))
    try:
        origin.fail(2, "503")
        origin.fail(2, "reset")
        assert read(backend, 1000, 4096) == DATA[1000:5096]
        assert read(backend, 0, 10) == DATA[:10]  # the connection was replaced and kept
    finally:
        backend.close()


@pytest.mark.parametrize(("fault", "words"), [("503", "503"), ("slow", "")])
def test_a_read_past_its_deadline_fails_with_eio_and_the_next_one_succeeds(
    origin: Origin, fault: str, words: str
) -> None:
    backend = HttpBackend(origin.url("disk.img"), RemoteOptions(timeout=0.5))
    try:
        origin.fail(1000, fault)
        with pytest.raises(OSError) as info:
            read(backend, 0, 512)
        assert info.value.errno == errno.EIO
        assert words in str(info.value)
        origin.clear()
        assert read(backend, 0, 512) == DATA[:512]
    finally:
        backend.close()


def test_identity_follows_the_etag_and_size(origin: Origin, tmp_path: Path) -> None:
    url = origin.url("disk.img")
    first = HttpBackend(url, RemoteOptions())
    again = HttpBackend(url, RemoteOptions())
    (tmp_path / "disk.img").write_bytes(DATA + b"x")
    changed = HttpBackend(url, RemoteOptions())
    for b in (first, again, changed):
        b.close()
    assert first.identity.startswith("url-")
    assert first.identity == again.identity != changed.identity


def test_an_image_replaced_while_served_fails_its_reads(origin: Origin, tmp_path: Path) -> None:
    backend = HttpBackend(origin.url("disk.img"), RemoteOptions(timeout=0.5))
    try:
        (tmp_path / "new.img").write_bytes(DATA[::-1])
        os.replace(tmp_path / "new.img", tmp_path / "disk.img")
        with pytest.raises(OSError):
            read(backend, 0, 512)
    finally:
        backend.close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_https_is_verified_against_the_given_ca_bundle(tmp_path: Path, ca: trustme.CA) -> None:
    (tmp_path / "disk.img").write_bytes(DATA)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with Origin(tmp_path, tls=ctx) as o:
        url = o.url("disk.img", host="localhost")
        backend = HttpBackend(url, RemoteOptions(ca_bundle=str(bundle)))
        try:
            assert read(backend, 5, 100) == DATA[5:105]
        finally:
            backend.close()
        with pytest.raises(ConfigError, match="certificate"):
            HttpBackend(url, RemoteOptions())  # the system store does not know the test CA
