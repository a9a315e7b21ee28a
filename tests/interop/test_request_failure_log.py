"""A request a backend fails is logged once, with export, command, offset, length and cause:
a plugin's exception on READ and an OSError on WRITE through a real server and qemu-io, the
remote timeout in tests/interop/test_http_served.py; and the lines are rate-limited."""

from __future__ import annotations

import errno
import logging
import subprocess
import textwrap
from pathlib import Path

import pytest

from nbdserver.edge.failures import RequestFailures
from nbdserver.protocol.constants import Command
from tests.interop.conftest import NbdServerFactory

pytestmark = pytest.mark.interop

# Reads of the second MiB raise a plain exception; writes there fail with ENOSPC.
BROKEN = textwrap.dedent(
    """
    MiB = 1 << 20

    def open(readonly, size):
        return bytearray(4 * MiB)

    def size(h):
        return len(h)

    def pread(h, buf, offset):
        if MiB <= offset < 2 * MiB:
            raise RuntimeError("sector unreadable")
        buf[:] = h[offset : offset + len(buf)]

    def pwrite(h, data, offset):
        if MiB <= offset < 2 * MiB:
            raise OSError(28, "the plugin's store is full")
        h[offset : offset + len(data)] = data
    """
)


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    res = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    return res.stdout + res.stderr


def test_a_failed_read_and_write_are_logged_with_their_request(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    plugin = tmp_path / "broken.py"
    plugin.write_text(BROKEN)
    srv = nbdserver("--backend", "plugin", "--name", "disk", image=str(plugin), size=None)
    assert "Input/output error" in qemu_io(srv.uri, "read 1M 4k")
    line = srv.wait_log(r"export 'disk': READ offset 1048576 length 4096 from \S+ failed")
    assert "EIO" in line and "sector unreadable" in line, line
    assert "No space left" in qemu_io(srv.uri, "write 1056768 512")
    line = srv.wait_log(r"export 'disk': WRITE offset 1056768 length 512 from \S+ failed")
    assert "ENOSPC" in line and "store is full" in line, line
    assert "Input/output error" not in qemu_io(srv.uri, "read 0 4k")  # still serving
    assert srv.text().count("sector unreadable") == 1, srv.text()  # once, not per layer
    assert srv.proc.poll() is None


def test_failures_are_rate_limited_per_export_and_the_gap_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    failures = RequestFailures(window=10.0, burst=3, clock=lambda: now[0])
    exc = OSError(errno.EIO, "remote timed out")
    read = int(Command.NBD_CMD_READ)
    with caplog.at_level(logging.ERROR, logger="nbdserver.requests"):
        codes = {failures.report("a", "peer", read, i, 512, exc) for i in range(50)}
        failures.report("b", "peer", read, 0, 512, exc)  # another export has its own budget
        failures.report("a", "peer", read, 0, 512, OSError(errno.ENOTSUP, "not fast"))
        now[0] = 11.0
        failures.report("a", "peer", read, 99, 512, exc)
    lines = [r.getMessage() for r in caplog.records]
    assert codes == {5}  # NBD_EIO
    assert [m.split(" from ")[0] for m in lines] == [
        "export 'a': READ offset 0 length 512",
        "export 'a': READ offset 1 length 512",
        "export 'a': READ offset 2 length 512",
        "export 'b': READ offset 0 length 512",
        "export 'a': READ offset 99 length 512",
    ]
    assert lines[-1].endswith("(47 more failures not logged)"), lines[-1]
    assert "EIO: remote timed out" in lines[0], lines[0]
