"""Copy-on-write in its three modes (issue 12, defect 6).

- ``connection``: each connection has its own overlay, dropped when it disconnects; this is what
  nbd-server's ``copyonwrite = true`` means, so a config file gets it.
- ``shared``: one overlay for every connection, for the life of the process.
- ``persistent``: the overlay lives in ``--cow-dir`` and survives restarts: a writable clone.
The base image is never written in any mode.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from nbdserver.client import connect
from nbdserver.protocol.constants import TransmissionFlag as TF
from tests.interop.security_helpers import free_port, serve, wait_for

pytestmark = pytest.mark.interop

ORIGINAL = bytes(range(256)) * 16  # the first 4 KiB of the base


def _base(path: Path) -> str:
    with open(path, "wb") as f:
        f.write(ORIGINAL)
        f.truncate(1 << 20)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nbd_server_copyonwrite_gives_each_connection_its_own_overlay(tmp_path: Path) -> None:
    base = tmp_path / "golden.img"
    digest = _base(base)
    port = free_port()
    conf = tmp_path / "c.conf"
    conf.write_text(f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\n"
                    f"[clone]\nexportname = {base}\ncopyonwrite = true\n")  # fmt: skip
    uri = f"nbd://127.0.0.1:{port}/clone"
    with serve(["--config", str(conf)], tmp_path, port=port, cli_listen=False):
        with connect(uri) as a, connect(uri) as b:
            assert not a.details.has(TF.NBD_FLAG_CAN_MULTI_CONN)  # the clients see different data
            a.pwrite(b"\xaa" * 4096, 0)
            assert a.pread(0, 4096) == b"\xaa" * 4096
            assert b.pread(0, 4096) == ORIGINAL  # the other client never sees a's writes
        with connect(uri) as again:  # a's overlay went with its connection
            assert again.pread(0, 4096) == ORIGINAL
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def _overlays(pid: int) -> int:
    """The server's open copy-on-write overlays (unlinked files named nbdserver-cow-*)."""
    fds = Path(f"/proc/{pid}/fd")
    return sum("nbdserver-cow-" in os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())


def test_a_per_connection_overlay_is_closed_when_its_client_disconnects(tmp_path: Path) -> None:
    base = tmp_path / "golden.img"
    _base(base)
    args = ["--export", f"c={base}", "--copy-on-write=connection"]
    with serve(args, tmp_path) as srv:
        with connect(f"nbd://127.0.0.1:{srv.port}/c") as a:
            a.pwrite(b"\xdd" * 4096, 0)
            assert _overlays(srv.proc.pid) == 1
        wait_for(lambda: _overlays(srv.proc.pid) == 0, what="the overlay to be closed")


def test_shared_copy_on_write_is_one_overlay_for_every_connection(tmp_path: Path) -> None:
    base = tmp_path / "golden.img"
    digest = _base(base)
    with serve(["--export", f"s={base}", "--copy-on-write=shared"], tmp_path) as srv:
        uri = f"nbd://127.0.0.1:{srv.port}/s"
        with connect(uri) as a:
            a.pwrite(b"\xbb" * 4096, 0)
            a.flush()
        with connect(uri) as b:
            assert b.pread(0, 4096) == b"\xbb" * 4096
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def test_persistent_copy_on_write_survives_a_restart(tmp_path: Path) -> None:
    base = tmp_path / "golden.img"
    digest = _base(base)
    cow_dir = tmp_path / "cow"
    cow_dir.mkdir()
    args = ["--export", f"p={base}", "--copy-on-write=persistent", "--cow-dir", str(cow_dir)]
    with serve(args, tmp_path) as srv, connect(f"nbd://127.0.0.1:{srv.port}/p") as c:
        c.pwrite(b"\xcc" * 4096, 8192)
        c.flush()
    with serve(args, tmp_path) as srv, connect(f"nbd://127.0.0.1:{srv.port}/p") as c:
        assert c.pread(8192, 4096) == b"\xcc" * 4096
        assert c.pread(0, 4096) == ORIGINAL
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
