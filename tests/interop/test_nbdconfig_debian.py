"""Debian's shipped ``/etc/nbd-server/config`` works as is, and the nbd-server keys whose
features nbdserver has are honoured: ``user``/``group`` (privileges dropped after every file and
socket is open), ``includedir``, ``unixsock``, ``temporary`` and ``%s`` in ``exportname``
(issue 12, defect 7). Any other unknown key is refused with its file and line."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver.client import connect
from tests.interop.conftest import start_server
from tests.interop.security_helpers import REPO, free_port, serve

pytestmark = pytest.mark.interop

# The file as the nbd-server package ships it (Debian bookworm), tabs and all; only the
# includedir is pointed at the test's own directory.
DEBIAN_CONFIG = """\
[generic]
# If you want to run everything as root rather than the nbd user, you
# may either say "root" in the two following lines, or remove them
# altogether. Do not remove the [generic] section, however.
\tuser = nbd
\tgroup = nbd
\tincludedir = /etc/nbd-server/conf.d

# What follows are export definitions. You may create as much of them as
# you want, but the section header has to be unique.
"""


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError("no Uid line")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to user nbd needs root")
def test_debians_shipped_config_serves_its_conf_d_and_drops_to_user_nbd(tmp_path: Path) -> None:
    try:
        nbd = pwd.getpwnam("nbd")
    except KeyError:
        pytest.skip("no user nbd (the nbd-server package creates it)")
    confd = tmp_path / "conf.d"
    confd.mkdir()
    image = tmp_path / "disk.img"
    image.write_bytes(b"debian" * 1000)
    os.chmod(image, 0o600)  # readable by root only: opened before the privileges go
    (confd / "disk.conf").write_text(f"[disk]\n\texportname = {image}\n")
    (confd / "ignored.txt").write_text("not a .conf file, never read\n")
    conf = tmp_path / "config"
    conf.write_text(DEBIAN_CONFIG.replace("/etc/nbd-server/conf.d", str(confd)))
    port = free_port()
    args = ["--config", str(conf), "--bind", "127.0.0.1", "--port", str(port)]
    with serve(args, tmp_path, port=port, cli_listen=False) as srv:
        with connect(f"nbd://127.0.0.1:{port}/disk") as c:
            assert c.pread(0, 12) == b"debiandebian"
            c.pwrite(b"DEBIAN", 0)
        assert _uid_of(srv.proc.pid) == nbd.pw_uid
    assert image.read_bytes()[:12] == b"DEBIANdebian"


def test_unixsock_temporary_and_percent_s(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    (tmp_path / "per-unix.img").write_bytes(b"unix-client" + bytes(4085))
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"[generic]\nunixsock = {sock}\n"
        f"[scratch]\nexportname = {tmp_path}/tmpXXXXXX\ntemporary = true\nfilesize = 1048576\n"
        f"[mine]\nexportname = {tmp_path}/per-%s.img\n"
    )
    srv = start_server(["--config", str(conf)], None, tmp_path)
    try:
        with connect(f"nbd+unix:///scratch?socket={sock}") as c:
            assert c.details.size == 1 << 20
            c.pwrite(b"x" * 512, 0)
            assert c.pread(0, 512) == b"x" * 512
        with connect(f"nbd+unix:///mine?socket={sock}") as c:  # %s is "unix" over a unix socket
            assert c.pread(0, 11) == b"unix-client"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")) == []
        assert srv.port is None  # unixsock: no TCP listener, as nbd-server
    finally:
        assert srv.stop() == 0


def test_an_unknown_key_is_refused_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"[generic]\n[a]\nexportname = {tmp_path}/a.img\nfrobnicate = true\n")
    res = subprocess.run([sys.executable, "-m", "nbdserver", "serve", "--config", str(conf)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{conf}:4: [a] unknown key 'frobnicate'" in res.stderr


def test_includedir_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(f"[generic]\nincludedir = {tmp_path}/absent\n")
    res = subprocess.run([sys.executable, "-m", "nbdserver", "serve", "--config", str(conf)],
                         capture_output=True, text=True, cwd=REPO, timeout=30)  # fmt: skip
    assert res.returncode == 2 and f"{conf}:2:" in res.stderr and "Traceback" not in res.stderr
