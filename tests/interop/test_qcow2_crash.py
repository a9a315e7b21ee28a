"""qcow2 crash safety, with real clients: libnbd clients keep many writes, zeroes and trims in
flight while the server is killed (SIGKILL, several times over the same image: ``qemu-img
check`` may find leaked clusters, never a corruption) or stopped (SIGTERM: no leak either); and
clusters freed by trims and zeroes are reused, so a trim/rewrite loop does not grow the file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory, Server
from tests.interop.qcow2_helpers import compare, qcow2, run
from tests.interop.security_helpers import wait_for

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not (shutil.which("qemu-img") and shutil.which("qemu-io") and os.path.exists(
            "/usr/bin/python3")),
        reason="needs qemu-img, qemu-io and python3-libnbd",
    ),
]  # fmt: skip
MiB = 1 << 20
SYSTEM_ENV = dict(os.environ, PATH="/usr/bin:/bin")  # python3-libnbd lives in Debian's python
# A client that never stops on its own: random writes (often unaligned), zeroes and trims, up
# to 32 in flight, until the server goes away or answers an error (ESHUTDOWN once it stops).
STORM = """
import random, sys
import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
rng = random.Random(int(sys.argv[2]))
size = h.get_size()
failed = []


def done(error):
    if error.value:
        failed.append(error.value)
    return 1


try:
    while not failed:
        while h.aio_in_flight() < 32:
            length = rng.choice((4096, 65536, 200000, 1 << 20))
            offset = rng.randrange(0, size - length) & ~rng.choice((0, 511, 65535))
            pick = rng.random()
            if pick < 0.6:
                h.aio_pwrite(rng.randbytes(length), offset, completion=done)
            elif pick < 0.8:
                h.aio_zero(length, offset, completion=done)
            else:
                h.aio_trim(length, offset, completion=done)
        h.poll(-1)
except nbd.Error:
    pass
"""


def storm(uri: str, seed: int, script: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["/usr/bin/python3", str(script), uri, str(seed)], env=SYSTEM_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def wait_for_growth(image: Path, beyond: int, clients: list[subprocess.Popen[bytes]]) -> None:
    """Until the image has grown past ``beyond`` bytes (the storm is under way)."""

    def grown() -> bool:
        assert all(c.poll() is None for c in clients), "a storm client ended early"
        return image.stat().st_size > beyond

    wait_for(grown, 30, "the storm to write")


def check(image: Path) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "check", "-f", "qcow2", str(image), ok=(0, 1, 2, 3))


def end_storm(clients: list[subprocess.Popen[bytes]]) -> None:
    for c in clients:
        try:
            c.wait(timeout=30)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()


@pytest.mark.parametrize("options", [(), ("extended_l2=on",)], ids=["plain", "extended-l2"])
def test_sigkill_during_a_write_storm_never_corrupts_the_image(
    nbdserver: NbdServerFactory, tmp_path: Path, options: tuple[str, ...]
) -> None:
    image = qcow2(tmp_path / "crash.qcow2", "cluster_size=65536", *options, size=32 * MiB)
    script = tmp_path / "storm.py"
    script.write_text(STORM)
    for round_ in range(4):
        srv: Server = nbdserver("--format", "qcow2", image=str(image), size=None)
        clients = [storm(srv.uri, 10 * round_ + i, script) for i in range(3)]
        wait_for_growth(image, image.stat().st_size + (round_ + 1) * 2 * MiB, clients)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        end_storm(clients)
        res = check(image)
        # 0 clean, 3 leaked clusters only; 2 would be a corruption, 1 a check failure
        assert res.returncode in (0, 3), res.stdout + res.stderr
        assert "ERROR" not in res.stdout, res.stdout


def test_sigterm_during_a_write_storm_leaves_no_leak(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    image = qcow2(tmp_path / "term.qcow2", "cluster_size=65536", size=32 * MiB)
    script = tmp_path / "storm.py"
    script.write_text(STORM)
    for round_ in range(2):
        srv = nbdserver("--format", "qcow2", image=str(image), size=None)
        clients = [storm(srv.uri, 100 + 10 * round_ + i, script) for i in range(3)]
        wait_for_growth(image, image.stat().st_size + 2 * MiB, clients)
        assert srv.stop(signal.SIGTERM) == 0
        end_storm(clients)
        res = check(image)
        assert res.returncode == 0, res.stdout + res.stderr


def test_clusters_freed_by_trim_and_zero_are_reused(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    """20 rounds of writing 4 MiB and trimming (or zeroing) it again: without reuse the file
    grows by 80 MiB; with it, by about one round plus the clusters kept counted in reserve."""
    image = qcow2(tmp_path / "loop.qcow2", "cluster_size=65536", size=16 * MiB)
    reference = tmp_path / "loop.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(reference), str(16 * MiB))
    start = image.stat().st_size
    srv = nbdserver("--format", "qcow2", image=str(image), size=None)
    commands = []
    for i in range(20):
        drop = "discard" if i % 2 else "write -z"
        commands += [f"write -P {i + 1} {i % 3}M 4M", f"{drop} {i % 3}M 4M"]
    commands.append("write -P 0x77 5M 3M")
    args = [a for c in commands for a in ("-c", c)]
    run("qemu-io", "-f", "raw", *args, srv.uri)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 5M 3M", str(reference))
    assert srv.stop() == 0
    grown = image.stat().st_size - start
    assert grown <= 12 * MiB, f"the file grew by {grown} bytes"
    assert check(image).returncode == 0
    assert compare(str(image), "qcow2", str(reference), "raw").returncode == 0
