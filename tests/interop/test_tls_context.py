"""nbdserver.policy.tls against Python's own TLS client over a local socket pair of real sockets.

These pin down the context itself (TLS 1.2 floor, mutual TLS, error messages); the interop
tests in test_tls_clients.py drive the whole server with libnbd and qemu.
"""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from nbdserver.policy.tls import (
    TlsConfigError,
    TlsHandshakeError,
    TlsMode,
    TlsSettings,
    build_server_context,
    peer_subject,
    psk_supported,
    server_handshake,
)
from tests.interop.security_helpers import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _client_ctx(pki: Pki, client_dir: Path | None = None, **kw: object) -> ssl.SSLContext:
    d = client_dir or pki.client_dir
    ctx = ssl.create_default_context(cafile=str(d / "ca-cert.pem"))
    if (d / "client-cert.pem").exists():
        ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object]:
    """Run both sides over a real TCP connection; return (server result, client result)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            tls = server_handshake(server_ctx, conn, timeout=10)
            result["server"] = (tls.version(), peer_subject(tls))
            tls.sendall(b"ok")
            tls.close()
        except TlsHandshakeError as exc:
            result["server"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as c:
                client: object = c.recv(2)
        except (ssl.SSLError, OSError) as exc:
            client = exc
    finally:
        t.join(timeout=15)
        listener.close()
    return result["server"], client


def test_off_builds_no_context() -> None:
    assert build_server_context(TlsSettings()) is None


def test_server_only_tls_handshake_is_at_least_tls12(pki: Pki) -> None:
    ctx = build_server_context(TlsSettings(TlsMode.ON, str(pki.server_cert), str(pki.server_key)))
    assert ctx is not None and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    server, client = _handshake(ctx, _client_ctx(pki, pki.client_dir_no_cert))
    assert client == b"ok"
    assert isinstance(server, tuple) and server[0] in ("TLSv1.2", "TLSv1.3") and server[1] is None


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls11_client_is_refused(pki: Pki) -> None:
    ctx = build_server_context(TlsSettings(TlsMode.ON, str(pki.server_cert), str(pki.server_key)))
    assert ctx is not None
    old = _client_ctx(pki, pki.client_dir_no_cert)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    server, client = _handshake(ctx, old)
    assert isinstance(server, TlsHandshakeError)
    assert isinstance(client, (ssl.SSLError, OSError))


def _mutual(pki: Pki) -> ssl.SSLContext:
    ctx = build_server_context(
        TlsSettings(TlsMode.REQUIRE, str(pki.server_cert), str(pki.server_key), str(pki.ca))
    )
    assert ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED
    return ctx


def test_mutual_tls_accepts_a_client_certificate_from_the_ca(pki: Pki) -> None:
    server, client = _handshake(_mutual(pki), _client_ctx(pki))
    assert client == b"ok"
    assert isinstance(server, tuple) and server[1] == "client.example"


@pytest.mark.parametrize("which", ["client_dir_no_cert", "client_dir_wrong_ca"])
def test_mutual_tls_refuses_missing_or_foreign_client_certificates(pki: Pki, which: str) -> None:
    server, _client = _handshake(_mutual(pki), _client_ctx(pki, getattr(pki, which)))
    assert isinstance(server, TlsHandshakeError)
    assert "certificate" in str(server).lower()


def test_configuration_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match="TLS needs a server certificate"):
        build_server_context(TlsSettings(TlsMode.ON))
    with pytest.raises(TlsConfigError, match=r"'/nonexistent.pem' does not exist"):
        build_server_context(TlsSettings(TlsMode.ON, "/nonexistent.pem", str(pki.server_key)))
    wrong_key = tmp_path / "other-key.pem"
    make_pki(tmp_path / "other").server_key.rename(wrong_key)
    with pytest.raises(TlsConfigError, match="cannot load certificate"):
        build_server_context(TlsSettings(TlsMode.ON, str(pki.server_cert), str(wrong_key)))
    with pytest.raises(TlsConfigError, match="cannot load client CA"):
        build_server_context(
            TlsSettings(TlsMode.ON, str(pki.server_cert), str(pki.server_key), str(wrong_key))
        )


def test_psk_is_refused_clearly_where_python_cannot_do_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:00112233445566778899aabbccddeeff\n")
    if psk_supported():  # Python >= 3.13: the context must build
        assert build_server_context(TlsSettings(TlsMode.ON, pskfile=str(keys))) is not None
    else:
        with pytest.raises(TlsConfigError, match=r"TLS-PSK needs Python 3\.13"):
            build_server_context(TlsSettings(TlsMode.ON, pskfile=str(keys)))
