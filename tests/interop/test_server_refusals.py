"""Why a client was refused an export, as the client sees it.

A per-export allow list and a per-export connection limit answer NBD_OPT_GO with
NBD_REP_ERR_POLICY, a TLS-only export before STARTTLS with NBD_REP_ERR_TLS_REQD, each with a
message naming the reason; a real client (libnbd's nbdinfo) receives that message (libnbd
shows it in its debug output: "server error message: ..."). After TLS the
same export opens on the same server (the spec's SELECTIVETLS mode).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdserver.client import NBDServerRefused, NBDTLSRequired, NBDUnknownExport
from nbdserver.protocol.constants import OptionReply
from tests.interop.security_helpers import (
    Pki,
    make_pki,
    nbd_connect_from,
    run,
    serve,
    wait_for,
)

pytestmark = pytest.mark.interop


def nbdinfo_refusal(uri: str) -> str:
    """Run nbdinfo, expect it to fail, and return the server's error message libnbd received."""
    r = run(["nbdinfo", uri], env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0, r.stdout
    for line in r.stderr.splitlines():
        if "nbd_opt_go: handshake: server error message: " in line:
            return line.split("server error message: ", 1)[1]
    raise AssertionError(f"nbdinfo got no error message from the server:\n{r.stderr}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_per_export_allow_list_refuses_with_err_policy(tmp_path: Path) -> None:
    args = ["--export", "secret=memory,size=1M,allow=127.0.0.2", "--export", "pub=memory,size=1M"]
    with serve(args, tmp_path) as srv:
        with pytest.raises(NBDServerRefused) as refused:
            nbd_connect_from("127.0.0.3", srv.port, "secret")
        assert refused.value.reply == OptionReply.NBD_REP_ERR_POLICY
        assert "does not admit clients from this address" in str(refused.value)
        with pytest.raises(NBDUnknownExport):  # a name that does not exist stays UNKNOWN
            nbd_connect_from("127.0.0.3", srv.port, "nosuch")
        with nbd_connect_from("127.0.0.2", srv.port, "secret") as conn:
            assert conn.details.size == 1 << 20
        assert nbdinfo_refusal(f"nbd://127.0.0.1:{srv.port}/secret") == (
            "export 'secret' does not admit clients from this address"
        )


def test_per_export_connection_limit_refuses_with_err_policy(tmp_path: Path) -> None:
    with serve(["--export", "one=memory,size=1M,connections=1"], tmp_path) as srv:
        with nbd_connect_from("127.0.0.1", srv.port, "one"):
            with pytest.raises(NBDServerRefused) as refused:
                nbd_connect_from("127.0.0.1", srv.port, "one")
            assert refused.value.reply == OptionReply.NBD_REP_ERR_POLICY
            assert "reached its limit of 1 connections" in str(refused.value)
            assert nbdinfo_refusal(f"nbd://127.0.0.1:{srv.port}/one") == (
                "export 'one' has reached its limit of 1 connections"
            )
        # The slot is free again once the server has seen the first client leave (it learns
        # that from the closed socket, after the client's close returns: a deadline, not at once).
        wait_for(lambda: _admitted(srv.port, "one"), what="the connection slot to free")


def _admitted(port: int, export: str) -> bool:
    try:
        with nbd_connect_from("127.0.0.1", port, export) as conn:
            return bool(conn.details.size == 1 << 20)
    except NBDServerRefused as exc:
        assert "reached its limit" in str(exc)  # any other refusal is a failure
        return False


def test_tls_only_export_answers_tls_reqd_before_starttls(tmp_path: Path, pki: Pki) -> None:
    args = [
        "--export", "secure=memory,size=1M,tls=1", "--export", "open=memory,size=1M",
        "--tls", "on", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    ]  # fmt: skip
    with serve(args, tmp_path) as srv:
        with pytest.raises(NBDTLSRequired) as refused:
            nbd_connect_from("127.0.0.1", srv.port, "secure")
        assert "served only over TLS" in str(refused.value)
        with nbd_connect_from("127.0.0.1", srv.port, "open") as conn:  # clear text elsewhere
            assert conn.details.size == 1 << 20
        assert nbdinfo_refusal(f"nbd://localhost:{srv.port}/secure") == (
            "export 'secure' is served only over TLS"
        )
        uri = f"nbds://localhost:{srv.port}/secure?tls-certificates={pki.client_dir_no_cert}"
        tls = run(["nbdinfo", "--size", uri])
        assert tls.returncode == 0 and tls.stdout.strip() == str(1 << 20), tls.stderr
