"""SIGHUP re-reads the ``--config`` file: added exports appear, removed ones stop being offered,
and connections already open keep working; without a config file SIGHUP does no harm
(issue 12, defect 4: it used to kill the server with status 129)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from nbdserver.client import NBDOptionError, connect, list_exports
from tests.interop.security_helpers import free_port, serve, wait_for

pytestmark = pytest.mark.interop


def _config(path: Path, port: int, exports: dict[str, Path]) -> None:
    text = f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\nallowlist = true\n"
    for name, image in exports.items():
        text += f"[{name}]\nexportname = {image}\nfilesize = 1048576\n"
    path.write_text(text)


def test_sighup_applies_added_and_removed_exports_and_keeps_connections(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "c.conf"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _config(conf, port, {"a": a})
    with serve(["--config", str(conf)], tmp_path, port=port, cli_listen=False) as srv:
        held = connect(f"nbd://127.0.0.1:{port}/a")
        try:
            held.pwrite(b"A" * 512, 0)
            _config(conf, port, {"b": b})
            srv.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: "reloaded" in srv.log(), what="the reload log line")
            names = [name for name, _ in list_exports(f"nbd://127.0.0.1:{port}/")]
            assert names == ["b"]
            with connect(f"nbd://127.0.0.1:{port}/b") as c:
                assert c.details.size == 1 << 20
            with pytest.raises(NBDOptionError):
                connect(f"nbd://127.0.0.1:{port}/a")
            held.pwrite(b"B" * 512, 512)  # the removed export's open connection goes on
            assert held.pread(0, 1024) == b"A" * 512 + b"B" * 512
        finally:
            held.disconnect()
        assert srv.proc.poll() is None
    assert a.read_bytes()[:1024] == b"A" * 512 + b"B" * 512


def test_a_broken_config_on_sighup_keeps_the_old_exports(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "c.conf"
    _config(conf, port, {"a": tmp_path / "a.img"})
    with serve(["--config", str(conf)], tmp_path, port=port, cli_listen=False) as srv:
        conf.write_text("[generic]\nbogus = 1\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "unknown key 'bogus'" in srv.log(), what="the reload error")
        with connect(f"nbd://127.0.0.1:{port}/a") as c:
            assert c.details.size == 1 << 20


def test_sighup_without_a_config_file_does_no_harm(tmp_path: Path) -> None:
    with serve(["--backend", "memory", "--size", "1M"], tmp_path) as srv:
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP" in srv.log(), what="the SIGHUP log line")
        with connect(f"nbd://127.0.0.1:{srv.port}/") as c:
            assert c.details.size == 1 << 20
        assert srv.proc.poll() is None
