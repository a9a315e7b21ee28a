"""nbdserver tells the size it serves: one JSON object on a line of its own per export at
start, on stderr, whatever ``--log-level`` says. The operator reads it from the head of the
server pod's log for exports whose size only the server knows (a device, a qcow2 image's
virtual size, a remote)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.interop.security_helpers import free_port, serve, wait_for

pytestmark = pytest.mark.interop
MiB = 2**20


def announced(log: str) -> list[dict[str, object]]:
    """The lines of the log that are JSON objects (the announcements)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def test_a_raw_file_is_announced_with_its_size_even_at_log_level_error(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(3 * MiB + 512)
    args = [str(disk), "--name", "disk", "--format", "raw", "--log-level", "error"]
    with serve(args, tmp_path) as srv:
        wait_for(lambda: bool(announced(srv.log())), 10, "the announcement")
        assert announced(srv.log()) == [
            {"export": "disk", "sizeBytes": 3 * MiB + 512, "readOnly": False}
        ]
        assert "listening" not in srv.log()  # the level did hide the ordinary log lines


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_a_qcow2_image_is_announced_with_its_virtual_size(tmp_path: Path) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True, timeout=60
    )
    assert disk.stat().st_size < MiB  # the file is far smaller than the disk it holds
    args = [str(disk), "--name", "vm", "--format", "qcow2", "--read-only"]
    with serve(args, tmp_path) as srv:
        wait_for(lambda: bool(announced(srv.log())), 10, "the announcement")
        assert announced(srv.log()) == [{"export": "vm", "sizeBytes": 64 * MiB, "readOnly": True}]


def test_an_export_added_by_sighup_is_announced_too(tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "c.conf"

    def config(*names: str) -> None:
        text = f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\nallowlist = true\n"
        for name in names:
            text += f"[{name}]\nexportname = {tmp_path / name}.img\nfilesize = {MiB}\n"
        conf.write_text(text)

    config("a")
    with serve(["--config", str(conf)], tmp_path, port=port, cli_listen=False) as srv:
        wait_for(lambda: bool(announced(srv.log())), 10, "the first announcement")
        config("a", "b")
        srv.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(announced(srv.log())) == 2, 10, "the added export's announcement")
        assert announced(srv.log()) == [
            {"export": "a", "sizeBytes": MiB, "readOnly": False},
            {"export": "b", "sizeBytes": MiB, "readOnly": False},
        ]
