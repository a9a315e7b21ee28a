"""fio's nbd engine (libnbd underneath) against nbdserver with crc32c verification: random
writes of mixed sizes at a deep queue, then every block read back and checked."""

from __future__ import annotations

import subprocess
import tempfile

import pytest

from tests.interop.conftest import NbdServerFactory

pytestmark = pytest.mark.interop


def fio(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    # fio writes "<job>-<n>-verify.state" files into its working directory when a verify job
    # fails; keep them out of the repository.
    cmd = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--output-format=terse"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir()
    )


@pytest.mark.parametrize(
    "workload",
    [
        pytest.param(["--rw=randwrite", "--bsrange=4k-128k", "--iodepth=32"], id="rand-qd32"),
        pytest.param(["--rw=write", "--bs=1M", "--iodepth=8"], id="seq-1M-qd8"),
        pytest.param(
            ["--rw=randwrite", "--bs=4k", "--iodepth=8", "--numjobs=2", "--offset_increment=8M"],
            id="two-connections",
        ),
    ],
)
def test_fio_verifies_crc32c_of_everything_it_wrote(
    nbdserver: NbdServerFactory, workload: list[str]
) -> None:
    srv = nbdserver(size="16M")
    res = fio(
        srv.uri, "--size=8M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", *workload
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify" not in res.stderr.lower(), res.stderr
    # terse v3: field 6 is KiB read; the verify pass read back everything that was written
    lines = [x for x in res.stdout.splitlines() if x.startswith("3;")]
    assert lines, res.stdout
    for line in lines:
        fields = line.split(";")
        assert int(fields[5]) > 0 and int(fields[46]) > 0, line


def test_fio_verify_fails_when_the_data_is_not_what_was_written(
    nbdserver: NbdServerFactory,
) -> None:
    """The check above can fail: verifying a region fio never wrote reports a mismatch."""
    srv = nbdserver(size="16M")
    res = fio(
        srv.uri, "--rw=read", "--bs=64k", "--size=1M", "--verify=crc32c", "--verify_only",
        "--verify_fatal=1",
    )  # fmt: skip
    assert res.returncode != 0
