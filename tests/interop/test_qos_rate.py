"""QoS measured end to end: a byte-rate limit on writes and an IOPS limit on reads.

The limits are per export and shared by every connection, so nbdcopy's several connections
together must stay under the byte rate. Bounds are generous (a benchmark-style check on a noisy
2-core machine), but a server that ignored the limit would finish many times faster, and one that
throttled per connection or double-charged would take clearly longer.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.interop.security_helpers import run, serve

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("nbdcopy"), reason="libnbd-bin is not installed"),
]

MiB = 1 << 20
WRITE_BPS = 4 * MiB  # burst is one second's worth
READ_IOPS = 50


def test_write_bytes_and_read_iops_limits_hold(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(12 * MiB))
    args = [
        "--backend", "memory", "--size", "16M",
        "--qos-write-bps", str(WRITE_BPS), "--qos-read-iops", str(READ_IOPS),
    ]  # fmt: skip
    with serve(args, tmp_path) as srv:
        uri = f"nbd://127.0.0.1:{srv.port}/"
        t0 = time.monotonic()
        r = run(["nbdcopy", "--connections=4", str(src), uri], timeout=60)
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        # 12 MiB with a 4 MiB burst at 4 MiB/s: about 2 s.
        expected = (12 * MiB - WRITE_BPS) / WRITE_BPS
        assert 0.7 * expected <= elapsed <= 2.0 * expected + 1.5, elapsed

        n = 150  # one read at a time: 150 reads, 50 in the burst, then 50/s: about 2 s
        script = (
            "import time\n"
            f"h.connect_uri({uri!r})\n"
            "t = time.monotonic()\n"
            f"for i in range({n}): h.pread(4096, i * 4096)\n"
            "print(time.monotonic() - t)\n"
        )
        r = run(["/usr/bin/python3", "-m", "nbd", "-c", script], timeout=60)
        assert r.returncode == 0, r.stderr
        took = float(r.stdout.strip())
        expected = (n - READ_IOPS) / READ_IOPS
        assert 0.7 * expected <= took <= 2.0 * expected + 1.5, took


def test_unlimited_export_is_not_throttled(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(12 * MiB))
    with serve(["--backend", "memory", "--size", "16M"], tmp_path) as srv:
        t0 = time.monotonic()
        r = run(["nbdcopy", str(src), f"nbd://127.0.0.1:{srv.port}/"], timeout=60)
        assert r.returncode == 0, r.stderr
        # The same copy without a limit takes a fraction of the throttled 2 s.
        assert time.monotonic() - t0 < 1.5
