"""nbdserver driven by QEMU's NBD client: qemu-img (info, convert both ways, compare) and
qemu-io (pattern writes and reads, discard, write zeroes)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory

pytestmark = pytest.mark.interop


def run(*cmd: str) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    out = run(*args, uri)
    assert "Pattern verification failed" not in out, out
    assert "failed" not in out.lower(), out
    return out


def test_qemu_img_info_reports_the_export_size(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="48M")
    out = run("qemu-img", "info", "--output=json", srv.uri)
    assert '"virtual-size": 50331648' in out


def test_qemu_img_convert_into_and_out_of_the_export_round_trips(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src.raw"
    # Data and holes mixed, so both allocated and sparse paths are crossed.
    with open(src, "wb") as f:
        f.truncate(16 << 20)
        for i in range(0, 16, 3):
            f.seek(i << 20)
            f.write(os.urandom(300_000))
    srv = nbdserver(size="16M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri)
    back = tmp_path / "back.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", srv.uri, str(back))
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src), str(back))
    assert srv.image is not None and srv.image.read_bytes() == src.read_bytes()


def test_qemu_img_compare_notices_a_difference(nbdserver: NbdServerFactory, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(1 << 20))
    srv = nbdserver(size="1M")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri)
    qemu_io(srv.uri, "write -P 0x5a 4096 512")
    res = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1, res.stdout + res.stderr


def test_qemu_io_patterns_discard_and_write_zeroes(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="8M")
    qemu_io(
        srv.uri,
        "write -P 0xab 0 1M",
        "write -P 0xcd 1M 64k",
        "aio_write -P 0x11 2M 4k",
        "aio_write -P 0x22 3M 4k",
        "aio_flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 64k",
        "read -P 0x11 2M 4k",
        "read -P 0x22 3M 4k",
        "discard 0 512k",
        "write -z 512k 512k",
        "write -z -u 1M 64k",
        "read -P 0 512k 576k",
        "flush",
    )
    assert srv.image is not None
    data = srv.image.read_bytes()
    assert data[2 << 20 : (2 << 20) + 4096] == b"\x11" * 4096
    assert data[512 << 10 : (1 << 20) + (64 << 10)] == bytes(576 << 10)


def test_qemu_io_reads_a_pattern_that_fails_to_verify(nbdserver: NbdServerFactory) -> None:
    """The pattern check above can fail: a wrong pattern is reported by qemu-io."""
    srv = nbdserver(size="1M")
    res = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", "-c", "read -P 0x02 0 4k", srv.uri],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Pattern verification failed" in res.stdout + res.stderr
