"""Export identity seen by real clients: nbdinfo (libnbd) lists ``x-kube-nbd:identity=<id>``,
and ``nbdserver.client.export_identity`` (what the node agent uses) reads it. It stays across a
restart exactly when the data does: file and persistent-overlay exports keep it, memory and
private-overlay exports get a new one. Peers (nbdkit, qemu-nbd) tell none."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from nbdserver import client
from tests.interop.conftest import NbdServerFactory, Server
from tests.interop.test_client_servers import free_port, spawn, unix_connector

pytestmark = pytest.mark.interop
__all__ = ["spawn"]  # the fixture, imported for this module's tests


def listed_identities(server: Server) -> dict[str, str]:
    """export name -> identity, as ``nbdinfo --list --json`` reports the contexts."""
    out = subprocess.run(
        ["nbdinfo", "--list", "--json", server.uri],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    found = {}
    for export in json.loads(out)["exports"]:
        for ctx in export.get("contexts", []):
            if ctx.startswith("x-kube-nbd:identity="):
                found[export["export-name"]] = ctx.split("=", 1)[1]
    return found


def restarted(nbdserver: NbdServerFactory, server: Server, *args: str) -> Server:
    server.stop()
    return nbdserver(*args, image=None)


def test_nbdinfo_lists_a_file_identity_that_survives_a_restart_and_a_memory_one_that_does_not(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    args = (str(tmp_path / "disk.img"), "--size", "4M", "-e", "scratch=memory,size=4M")
    srv = nbdserver(*args, image=None)
    before = listed_identities(srv)
    assert before[""].startswith("file-") and before["scratch"].startswith("mem-")
    assert client.export_identity(srv.uri) == before[""]
    assert client.export_identity(srv.export_uri("scratch")) == before["scratch"]
    after = listed_identities(restarted(nbdserver, srv, *args))
    assert after[""] == before[""]
    assert after["scratch"] != before["scratch"]


def test_a_persistent_overlay_keeps_its_identity_and_writes_a_private_one_does_not(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"B" * (1 << 20))
    (tmp_path / "cow").mkdir()
    keep = (str(base), "--copy-on-write", "persistent", "--cow-dir", str(tmp_path / "cow"))
    srv = nbdserver(*keep, image=None)
    first = client.export_identity(srv.uri)
    with client.connect(srv.uri) as conn:
        conn.pwrite(b"clone", 4096)
        conn.disconnect()
    srv = restarted(nbdserver, srv, *keep)
    assert client.export_identity(srv.uri) == first
    with client.connect(srv.uri) as conn:
        assert conn.pread(4096, 5) == b"clone"
        conn.disconnect()
    assert base.read_bytes() == b"B" * (1 << 20)
    private = (str(base), "--copy-on-write", "--cow-dir", str(tmp_path / "cow"))
    srv = restarted(nbdserver, srv, *private)
    one = client.export_identity(srv.uri)
    assert one is not None and one.startswith("cow-") and one != first
    assert client.export_identity(restarted(nbdserver, srv, *private).uri) != one


def test_peers_without_identities_answer_none(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "nbdkit.sock"
    spawn(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", "4M"],
          unix_connector(sock))  # fmt: skip
    assert client.export_identity(f"nbd+unix:///?socket={sock}") is None
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    port = free_port()
    spawn(["qemu-nbd", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
           "--persistent", str(image)],
          lambda: socket.create_connection(("127.0.0.1", port)))  # fmt: skip
    assert client.export_identity(f"nbd://127.0.0.1:{port}/disk") is None


def test_an_unknown_export_is_an_error_not_a_missing_identity(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver()
    with pytest.raises(client.NBDUnknownExport):
        client.export_identity(srv.export_uri("nope"))
