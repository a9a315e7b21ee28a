"""TLS end to end: real libnbd and qemu clients against ``nbdserver serve --tls ...``.

Certificates come from a throwaway CA made in the test (security_helpers.make_pki). Each server
is shared by the tests of one module to keep the suite fast.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserver.client import NBDTLSRequired, handshake
from tests.interop.security_helpers import Pki, Served, make_pki, run, serve, wait_for

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin is not installed"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mutual(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """--tls require with client certificates checked against the test CA."""
    tmp = tmp_path_factory.mktemp("mutual")
    args = [
        "--backend", "memory", "--size", "4M", "--tls", "require",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca),
    ]  # fmt: skip
    with serve(args, tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def optional(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """--tls on, server certificate only."""
    tmp = tmp_path_factory.mktemp("optional")
    args = [
        "--backend", "memory", "--size", "4M", "--tls", "on",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    ]  # fmt: skip
    with serve(args, tmp) as srv:
        yield srv


def _nbds(srv: Served, client_dir: Path) -> str:
    return f"nbds://localhost:{srv.port}/?tls-certificates={client_dir}"


def test_nbdinfo_over_nbds_with_a_client_certificate(mutual: Served, pki: Pki) -> None:
    r = run(["nbdinfo", "--json", _nbds(mutual, pki.client_dir)])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 << 20
    wait_for(lambda: "client certificate 'client.example'" in mutual.log(), what="TLS log line")


def test_nbdsh_writes_and_reads_over_nbds(mutual: Served, pki: Pki) -> None:
    uri = _nbds(mutual, pki.client_dir)
    script = (
        "h.set_uri_allow_local_file(True)\n"  # the tls-certificates= directory is a local file
        f"h.connect_uri({uri!r})\n"
        "assert h.get_tls_negotiated()\n"
        "h.pwrite(b'tls!' * 1024, 65536)\n"
        "assert h.pread(4096, 65536) == b'tls!' * 1024\n"
        "h.flush()\n"
        "print('ok')\n"
    )
    # nbdsh is "python3 -m nbd" with the system python (python3-libnbd), not PATH's python3
    r = run(["/usr/bin/python3", "-m", "nbd", "-c", script])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed")
def test_qemu_with_tls_creds_x509(mutual: Served, pki: Pki) -> None:
    obj = f"tls-creds-x509,id=tls0,dir={pki.client_dir},endpoint=client"
    opts = f"driver=nbd,host=localhost,port={mutual.port},export=,tls-creds=tls0"
    r = run(["qemu-io", "--object", obj, "--image-opts", opts,
             "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"])  # fmt: skip
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    r = run(["qemu-img", "info", "--output=json", "--object", obj, "--image-opts", opts])
    assert r.returncode == 0, r.stderr
    assert '"virtual-size": 4194304' in r.stdout


def test_plaintext_is_refused_under_require(mutual: Served) -> None:
    # libnbd without TLS: negotiation fails.
    r = run(["nbdinfo", f"nbd://localhost:{mutual.port}/"])
    assert r.returncode != 0
    # At the byte level: NBD_OPT_GO before STARTTLS is answered with NBD_REP_ERR_TLS_REQD.
    sock = socket.create_connection(("127.0.0.1", mutual.port), timeout=10)
    try:
        with pytest.raises(NBDTLSRequired):
            handshake(sock, "")
    finally:
        sock.close()


@pytest.mark.parametrize(
    "which", ["client_dir_no_cert", "client_dir_wrong_ca", "client_dir_untrusting"]
)
def test_mutual_tls_refuses_bad_client_credentials(mutual: Served, pki: Pki, which: str) -> None:
    before = mutual.log().count("TLS handshake failed")
    r = run(["nbdinfo", _nbds(mutual, getattr(pki, which))])
    assert r.returncode != 0
    if which != "client_dir_untrusting":  # that client itself gives up on our certificate
        wait_for(
            lambda: mutual.log().count("TLS handshake failed") > before,
            what="the server to log the failed handshake",
        )


def test_tls_on_serves_both_plaintext_and_tls_clients(optional: Served, pki: Pki) -> None:
    plain = run(["nbdinfo", f"nbd://localhost:{optional.port}/"])
    assert plain.returncode == 0 and "without TLS" in plain.stdout, plain.stderr
    tls = run(["nbdinfo", _nbds(optional, pki.client_dir_no_cert)])
    assert tls.returncode == 0 and "with TLS" in tls.stdout, tls.stderr


def test_tls_off_refuses_starttls(tmp_path: Path, pki: Pki) -> None:
    with serve(["--backend", "memory", "--size", "1M"], tmp_path) as srv:
        r = run(["nbdinfo", _nbds(srv, pki.client_dir)])
        assert r.returncode != 0


def test_missing_certificate_file_is_a_startup_error(tmp_path: Path, pki: Pki) -> None:
    import sys

    r = run([sys.executable, "-m", "nbdserver.cli", "serve", "--backend", "memory", "--size",
             "1M", "--port", "0", "--tls", "require", "--tls-cert", str(tmp_path / "nope.pem"),
             "--tls-key", str(pki.server_key)])  # fmt: skip
    assert r.returncode == 2
    assert f"'{tmp_path / 'nope.pem'}' does not exist" in r.stderr


def test_tls_only_export_is_invisible_and_unopenable_without_tls(tmp_path: Path, pki: Pki) -> None:
    args = [
        "--export", "secure=memory,size=1M,tls=1", "--export", "open=memory,size=1M",
        "--tls", "on", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    ]  # fmt: skip
    with serve(args, tmp_path) as srv:
        plain = run(["nbdinfo", "--list", "--json", f"nbd://localhost:{srv.port}/"])
        assert plain.returncode == 0, plain.stderr
        names = {e["export-name"] for e in json.loads(plain.stdout)["exports"]}
        assert names == {"open"}
        assert run(["nbdinfo", f"nbd://localhost:{srv.port}/secure"]).returncode != 0
        tls = run(
            ["nbdinfo", "--json", _nbds(srv, pki.client_dir_no_cert).replace("/?", "/secure?")]
        )
        assert tls.returncode == 0, tls.stderr
        assert json.loads(tls.stdout)["exports"][0]["export-name"] == "secure"
