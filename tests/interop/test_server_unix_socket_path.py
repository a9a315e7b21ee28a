"""``--unix PATH`` removes only a stale socket: a regular file or a live server's socket at
PATH is refused with one line and exit 2, and left as it was (issue 12, defect 3)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver.client import connect
from tests.interop.conftest import start_server
from tests.interop.security_helpers import REPO

pytestmark = pytest.mark.interop


def _serve_exit(args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--backend", "memory", "--size", "1M"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=30)


def test_unix_refuses_to_delete_a_regular_file(tmp_path: Path) -> None:
    victim = tmp_path / "disk.img"
    victim.write_bytes(b"precious" * 512)
    res = _serve_exit(["--no-tcp", "--unix", str(victim)])
    assert res.returncode == 2, res.stderr
    assert "--unix" in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
    assert victim.read_bytes() == b"precious" * 512


def test_unix_refuses_a_live_servers_socket(tmp_path: Path) -> None:
    path = tmp_path / "nbd.sock"
    first = start_server(
        ["--backend", "memory", "--size", "1M", "--no-tcp", "--unix", str(path)], None, tmp_path
    )
    try:
        res = _serve_exit(["--no-tcp", "--unix", str(path)])
        assert res.returncode == 2, res.stderr
        assert "in use" in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
        with connect(f"nbd+unix:///?socket={path}") as c:  # the first server still owns it
            assert c.details.size == 1 << 20
    finally:
        assert first.stop() == 0


def test_unix_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()  # the file stays behind, nobody listens: what a killed server leaves
    srv = start_server(
        ["--backend", "memory", "--size", "1M", "--no-tcp", "--unix", str(path)], None, tmp_path
    )
    try:
        with connect(f"nbd+unix:///?socket={path}") as c:
            assert c.details.size == 1 << 20
    finally:
        assert srv.stop() == 0
    assert not path.exists()
