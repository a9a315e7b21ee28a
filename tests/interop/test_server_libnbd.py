"""nbdserver driven by libnbd's tools: nbdinfo (list, map, --can/--is probes), nbdsh scripts
(structured replies, block status, DF, FAST_ZERO, error replies, multi-conn flush) and nbdcopy.

nbdsh runs under Debian's /usr/bin/python3 (python3-libnbd), so it gets a PATH where that
interpreter comes first; each script asserts and exits non-zero on failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory

pytestmark = pytest.mark.interop

SYSTEM_ENV = dict(os.environ, PATH="/usr/bin:/bin")


def run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=SYSTEM_ENV)
    if ok:
        assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def nbdsh(uri: str, script: str, *, meta: bool = True) -> str:
    """Run ``script`` in nbdsh with ``h`` connected to ``uri`` (base:allocation requested)."""
    prologue = ("h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)\n" if meta else "") + (
        f"h.connect_uri({uri!r})\n"
    )
    return run("nbdsh", "-c", prologue + textwrap.dedent(script)).stdout


def test_nbdinfo_lists_every_export_with_its_description(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(
        "--name", "disk", "--description", "the main disk",
        "--export", "scratch=memory,size=1M,description=ram scratch",
    )  # fmt: skip
    out = run("nbdinfo", "--list", "--json", srv.uri).stdout
    assert '"export-name": "disk"' in out and '"export-name": "scratch"' in out
    assert "the main disk" in out and "ram scratch" in out
    assert '"export-size": 1048576' in out


def test_default_export_name_reaches_a_single_export(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver("--name", "only", size="2M")
    assert "export-size: 2097152" in run("nbdinfo", srv.uri).stdout
    assert "export-size: 2097152" in run("nbdinfo", srv.uri + "only").stdout
    assert run("nbdinfo", srv.uri + "missing", ok=False).returncode != 0


def test_default_export_name_is_refused_among_several_exports(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver("--name", "a", "--export", "b=memory,size=1M")
    assert run("nbdinfo", srv.uri, ok=False).returncode != 0
    assert "export-size: 1048576" in run("nbdinfo", srv.uri + "b").stdout


def test_nbdinfo_map_shows_data_and_holes(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="4M")
    nbdsh(srv.uri, "h.pwrite(b'x' * 65536, 1 << 20)\nh.flush()\n")
    out = run("nbdinfo", "--map", srv.uri).stdout.split("\n")
    rows = [line.split() for line in out if line.strip()]
    assert rows[0][:2] == ["0", "1048576"] and "hole,zero" in rows[0][-1]
    assert rows[1][:2] == ["1048576", "65536"] and rows[1][-1] == "data"
    assert rows[2][:2] == ["1114112", str((4 << 20) - 1114112)] and "hole" in rows[2][-1]


PROBES_RW = {
    ("--can", "trim"): 0,
    ("--can", "zero"): 0,
    ("--can", "fast-zero"): 0,
    ("--can", "fua"): 0,
    ("--can", "flush"): 0,
    ("--can", "multi-conn"): 0,
    ("--can", "cache"): 0,
    ("--can", "df"): 0,
    ("--can", "structured-reply"): 0,
    ("--can", "write"): 0,
    ("--is", "read-only"): 2,
    ("--is", "rotational"): 2,
}
PROBES_RO = {
    ("--is", "read-only"): 0,
    ("--can", "write"): 2,
    ("--can", "trim"): 2,
    ("--can", "zero"): 2,
    ("--can", "fast-zero"): 2,
    ("--can", "flush"): 0,
}


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
def test_nbdinfo_probes_match_the_capabilities(
    nbdserver: NbdServerFactory, read_only: bool, tmp_path: Path
) -> None:
    image = tmp_path / "probe.img"
    image.write_bytes(bytes(1 << 20))  # a read-only export never creates its image
    srv = nbdserver(*(["--read-only"] if read_only else []), image=image, size=None)
    probes = PROBES_RO if read_only else PROBES_RW
    got = {p: run("nbdinfo", *p, srv.uri, ok=False).returncode for p in probes}
    assert got == probes


def test_nbdsh_structured_replies_block_status_df_and_fast_zero(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(size="8M")
    nbdsh(
        srv.uri,
        """
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        assert h.can_df() and h.can_fast_zero() and h.can_zero() and h.can_trim()
        h.pwrite(b"\\x07" * (1 << 20), 1 << 20)
        seen = []
        def cb(context, offset, entries, err):
            assert context == nbd.CONTEXT_BASE_ALLOCATION
            seen.append((offset, list(entries)))
        h.block_status(4 << 20, 0, cb)
        (off, e), = seen
        assert off == 0
        assert e[0:2] == [1 << 20, nbd.STATE_HOLE | nbd.STATE_ZERO], e
        assert e[2:4] == [1 << 20, 0], e
        seen.clear()
        h.block_status(4 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert len(seen[0][1]) == 2, seen
        # DF: one data chunk for the whole read
        chunks = []
        def chunk(sub, offset, status, err):
            chunks.append((offset, len(sub), status))
            return 0
        buf = h.pread_structured(128 * 1024, (1 << 20) - 4096, chunk, nbd.CMD_FLAG_DF)
        assert len(chunks) == 1 and chunks[0][1] == 128 * 1024, chunks
        assert buf == bytes(4096) + b"\\x07" * (124 * 1024)
        # FAST_ZERO on a file: fallocate punch/zero is fast, so it succeeds and reads zero
        h.zero(65536, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(65536, 1 << 20) == bytes(65536)
        h.zero(65536, (1 << 20) + 65536, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(65536, (1 << 20) + 65536) == bytes(65536)
        h.trim(65536, 0)
        h.flush()
        h.shutdown()
        """,
    )


def test_nbdsh_invalid_requests_get_the_spec_errors(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="1M")
    nbdsh(
        srv.uri,
        """
        import errno
        h.set_strict_mode(0)   # let bad requests reach the server
        def expect(fn, err):
            try:
                fn()
            except nbd.Error as e:
                assert e.errnum == err, (e, err)
            else:
                raise AssertionError("no error")
        expect(lambda: h.pread(4096, 1 << 20), errno.EINVAL)            # beyond the end
        expect(lambda: h.pwrite(b"x" * 4096, (1 << 20) - 1), errno.ENOSPC)
        expect(lambda: h.trim(4096, 1 << 20), errno.EINVAL)
        expect(lambda: h.zero(4096, 1 << 20), errno.ENOSPC)
        expect(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL)  # flag not for READ
        # the connection still works after the errors
        h.pwrite(b"ok" * 256, 0)
        assert h.pread(512, 0) == b"ok" * 256
        h.shutdown()
        """,
    )


def test_nbdsh_read_only_export_refuses_writes_with_eperm(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(bytes(1 << 20))  # a read-only export never creates its image
    srv = nbdserver("--read-only", image=image, size=None)
    nbdsh(
        srv.uri,
        """
        import errno
        h.set_strict_mode(0)
        assert h.is_read_only()
        for fn in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0)):
            try:
                fn()
            except nbd.Error as e:
                assert e.errnum == errno.EPERM, e
            else:
                raise AssertionError("write accepted on a read-only export")
        assert h.pread(512, 0) == bytes(512)
        """,
    )


def test_nbdsh_multi_conn_write_on_one_flush_on_another_is_visible(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(size="4M")
    nbdsh(
        srv.uri,
        f"""
        assert h.can_multi_conn()
        h2 = nbd.NBD()
        h2.connect_uri({srv.uri!r})
        h.pwrite(b"M" * 8192, 12288)
        h2.flush()
        assert h2.pread(8192, 12288) == b"M" * 8192
        h2.pwrite(b"N" * 4096, 0, nbd.CMD_FLAG_FUA)
        assert h.pread(4096, 0) == b"N" * 4096
        h2.shutdown()
        h.shutdown()
        """,
    )
    assert srv.image is not None
    data = srv.image.read_bytes()
    assert data[:4096] == b"N" * 4096 and data[12288:20480] == b"M" * 8192


def test_nbdcopy_round_trip_keeps_the_checksum(nbdserver: NbdServerFactory, tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(32 << 20)
        for i in range(0, 32, 5):
            f.seek(i << 20)
            f.write(os.urandom(700_000))
    srv = nbdserver(size="32M")
    run("nbdcopy", "--connections=4", "--requests=16", str(src), srv.uri)
    out = tmp_path / "out.raw"
    run("nbdcopy", srv.uri, str(out))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert srv.image is not None
    assert hashlib.sha256(srv.image.read_bytes()).hexdigest() == digest


def test_nbdsh_requests_larger_than_the_buffers_round_trip(nbdserver: NbdServerFactory) -> None:
    """16 MiB and 32 MiB (the advertised maximum) exceed the 4 MiB receive buffer and read
    arena: they take the large-payload path in both directions."""
    srv = nbdserver(size="64M")
    nbdsh(
        srv.uri,
        """
        import hashlib
        big = bytes(range(256)) * (16 << 12)        # 16 MiB
        h.pwrite(big, 3 << 20)
        h.pwrite(b"\\xaa" * (32 << 20), 24 << 20)   # the maximum payload
        assert hashlib.sha256(h.pread(16 << 20, 3 << 20)).digest() == hashlib.sha256(big).digest()
        assert h.pread(32 << 20, 24 << 20) == b"\\xaa" * (32 << 20)
        assert h.pread(4096, (3 << 20) - 4096) == bytes(4096)
        h.shutdown()
        """,
    )
