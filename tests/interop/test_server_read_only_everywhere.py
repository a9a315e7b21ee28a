"""``--read-only`` covers every export, and a read-only export never writes, grows or creates
its image (issue 12, defects 1 and 2).

nbd-server's ``filesize`` forces the export's size; for a read-only export that can only mean a
view of the first ``filesize`` bytes, never a bigger file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver.client import connect
from tests.interop.security_helpers import REPO, free_port, run, serve

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed"),
]


def _image(path: Path, size: int) -> str:
    path.write_bytes(bytes(range(256)) * (size // 256))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _serve_exit(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=30)


def test_read_only_flag_covers_the_exports_of_a_config_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    before = _image(image, 1 << 20)
    port = free_port()
    conf = tmp_path / "c.conf"
    conf.write_text(f"[generic]\nport = {port}\nlistenaddr = 127.0.0.1\n"
                    f"[disk]\nexportname = {image}\n")  # fmt: skip
    with serve(["--config", str(conf), "--read-only"], tmp_path, port=port, cli_listen=False):
        r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k",
                 f"nbd://127.0.0.1:{port}/disk"])  # fmt: skip
        assert "failed" in (r.stdout + r.stderr).lower() or r.returncode != 0, r.stdout
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_read_only_flag_covers_every_export_spec(tmp_path: Path) -> None:
    image = tmp_path / "e.img"
    before = _image(image, 1 << 20)
    with serve(["--export", f"e={image}", "--read-only"], tmp_path) as srv:
        c = connect(f"nbd://127.0.0.1:{srv.port}/e")
        with c:
            assert c.details.read_only
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_a_read_only_export_never_grows_its_image(tmp_path: Path) -> None:
    image = tmp_path / "small.img"
    before = _image(image, 1 << 20)
    res = _serve_exit([str(image), "--size", "8M", "--read-only"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "read-only" in res.stderr.splitlines()[-1] and "Traceback" not in res.stderr
    assert image.stat().st_size == 1 << 20
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_a_read_only_export_never_creates_its_image(tmp_path: Path) -> None:
    image = tmp_path / "absent.img"
    res = _serve_exit([str(image), "--size", "8M", "--read-only"], tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert not image.exists()


def test_a_read_only_size_below_the_file_serves_that_many_bytes(tmp_path: Path) -> None:
    image = tmp_path / "big.img"
    before = _image(image, 1 << 20)
    with serve([str(image), "--size", "256K", "--read-only"], tmp_path) as srv:
        c = connect(f"nbd://127.0.0.1:{srv.port}/")
        with c:
            assert c.details.size == 256 << 10 and c.details.read_only
            assert c.pread(0, 512) == bytes(range(256)) * 2
    assert image.stat().st_size == 1 << 20
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before
