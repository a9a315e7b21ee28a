"""The userspace client (what the agent runs before handing a socket to the kernel) against real
NBD servers from Debian packages: nbdkit, qemu-nbd and nbd-server.

Each test starts its own server on a unix socket or a free loopback port and stops it after.
A handshake is proven "positioned at transmission" by doing real I/O on the same socket.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from nbdserver import client

pytestmark = pytest.mark.interop

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_connectable(proc: subprocess.Popen[bytes], connect: Callable[[], socket.socket]) -> None:
    """Poll until the server accepts connections (a condition with a deadline)."""
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited early: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            connect().close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def tcp_listening(port: int) -> Callable[[], socket.socket]:
    """A probe that does not connect: nbd-server -d serves one session at a time and exits
    when a session fails, so a probe connection would kill it. Reads /proc/net/tcp instead."""

    def probe() -> socket.socket:
        needle = f"0100007F:{port:04X} 00000000:0000 0A"
        with open("/proc/net/tcp") as f:
            if any(needle in line for line in f):
                return socket.socket()  # closed by the caller; never connected
        raise OSError(f"nothing listens on 127.0.0.1:{port} yet")

    return probe


def unix_connector(path: Path) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
        except OSError:
            s.close()
            raise
        return s

    return connect


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], connect: Callable[[], socket.socket]) -> subprocess.Popen[bytes]:
        if shutil.which(argv[0]) is None:
            pytest.fail(f"{argv[0]} is not installed (scripts/apt-packages.txt lists it)")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_connectable(proc, connect)
        return proc

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"K" * 4096)
    return path


def exercise(conn: client.NBDConnection) -> None:
    """Write, flush, read back, disconnect: proves the socket was left at transmission."""
    pattern = os.urandom(8192)
    conn.pwrite(pattern, 2 * MiB)
    if conn.details.transmission_flags & (1 << 2):
        conn.flush()
    assert conn.pread(2 * MiB, 8192) == pattern
    assert conn.pread(MiB, 4096) == b"K" * 4096 or conn.details.size == MiB
    conn.disconnect()


# --- nbdkit ----------------------------------------------------------------------------------
def test_nbdkit_memory_default_handshake_then_simple_replies(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "nbdkit.sock"
    spawn(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", "4M"],
        unix_connector(sock),
    )
    conn = client.connect(f"nbd+unix:///?socket={sock}")
    assert conn.details.size == 4 * MiB and not conn.details.structured_replies
    assert not conn.details.transmission_flags & (1 << 7)  # no DF without structured replies
    pattern = os.urandom(4096)
    conn.pwrite(pattern, 0)
    assert conn.pread(0, 4096) == pattern
    conn.disconnect()


def test_nbdkit_structured_replies_read_holes_and_data(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "nbdkit.sock"
    spawn(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", "4M"],
        unix_connector(sock),
    )
    conn = client.connect(f"nbd+unix:///?socket={sock}", structured_replies=True)
    assert conn.details.structured_replies
    assert conn.details.meta_contexts.keys() == {"base:allocation"}
    conn.pwrite(b"x" * 512, 65536)
    data = conn.pread(0, 256 * 1024)  # mostly hole: nbdkit answers with OFFSET_HOLE chunks
    assert data[65536 : 65536 + 512] == b"x" * 512 and data.count(b"x") == 512
    conn.disconnect()


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """Certificates laid out as both nbdkit (gnutls) and libnbd's tls-certificates expect."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    d = tmp_path / "pki"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca-cert.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server-cert.pem"))
    cert.private_key_pem.write_to_path(str(d / "server-key.pem"))
    return d


def test_nbdkit_tls_required_with_nbds_uri(spawn, tmp_path: Path, tls_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "tls.sock"
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "--tls=require",
            f"--tls-certificates={tls_dir}", "memory", "4M"]  # fmt: skip
    spawn(argv, unix_connector(sock))
    uri = f"nbds+unix:///?socket={sock}&tls-certificates={tls_dir}&tls-hostname=localhost"
    conn = client.connect(uri)
    assert conn.details.tls and isinstance(conn.sock, ssl.SSLSocket)
    conn.pwrite(b"secret" * 100, 0)
    assert conn.pread(0, 600) == b"secret" * 100
    conn.disconnect()
    with pytest.raises(client.NBDTLSRequired):  # the same server refuses clear text
        client.connect(f"nbd+unix:///?socket={sock}")
    with pytest.raises(client.NBDTLSError):  # and a client that does not trust its CA fails
        client.connect(f"nbds+unix:///?socket={sock}&tls-hostname=localhost")


# --- qemu-nbd --------------------------------------------------------------------------------
def test_qemu_nbd_tcp_named_export_with_block_sizes(spawn, image: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    argv = ["qemu-nbd", "-f", "raw", "-x", "disk", "-D", "a qemu disk", "-b", "127.0.0.1",
            "-p", str(port), "--persistent", "--shared=4", str(image)]  # fmt: skip
    spawn(argv, lambda: socket.create_connection(("127.0.0.1", port)))
    conn = client.connect(f"nbd://127.0.0.1:{port}/disk")
    d = conn.details
    assert d.size == 4 * MiB and d.block_size_reported and d.minimum_block in (1, 512)
    assert d.description == "a qemu disk" and d.via_go
    exercise(conn)
    assert client.list_exports(f"nbd://127.0.0.1:{port}/") == [("disk", "a qemu disk")]
    with pytest.raises(client.NBDUnknownExport):
        client.connect(f"nbd://127.0.0.1:{port}/nope")
    conn = client.connect(f"nbd://127.0.0.1:{port}/disk", structured_replies=True)
    assert conn.pread(0, 65536) == bytes(65536)  # sparse start: read through hole chunks
    assert conn.pread(MiB, 4096) == b"K" * 4096
    conn.disconnect()


def test_qemu_nbd_read_only_export_reports_read_only(spawn, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sock = tmp_path / "qemu.sock"
    spawn(["qemu-nbd", "-f", "raw", "-r", "-k", str(sock), str(image)], unix_connector(sock))
    conn = client.connect(f"nbd+unix:///?socket={sock}")
    assert conn.details.read_only
    with pytest.raises(OSError) as err:
        conn.pwrite(b"x" * 512, 0)
    assert err.value.errno in (1, 22)  # qemu-nbd 7.2 answers EINVAL where the spec suggests EPERM
    assert conn.pread(MiB, 16) == b"K" * 16
    conn.disconnect()


# --- nbd-server ------------------------------------------------------------------------------
@pytest.fixture
def nbd_server(spawn, image: Path, tmp_path: Path) -> int:  # type: ignore[no-untyped-def]
    port = free_port()
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(
        "[generic]\n"
        f"port = {port}\nlistenaddr = 127.0.0.1\nallowlist = true\n"
        "[disk]\n"
        f"exportname = {image}\nflush = true\nfua = true\ntrim = true\n"
    )
    spawn(["nbd-server", "-C", str(conf), "-d"], tcp_listening(port))
    return port


def test_nbd_server_go_list_and_unknown_export(nbd_server: int) -> None:
    port = nbd_server
    # nbd-server -d keeps serving handshake-only sessions but exits after one transmission
    # session, so the data session comes last.
    assert [name for name, _ in client.list_exports(f"nbd://127.0.0.1:{port}")] == ["disk"]
    with pytest.raises(client.NBDUnknownExport):
        client.connect(f"nbd://127.0.0.1:{port}/nope")
    conn = client.connect(f"nbd://127.0.0.1:{port}/disk")
    assert conn.details.size == 4 * MiB
    exercise(conn)


def test_unreachable_server_is_a_connect_error() -> None:
    with pytest.raises(client.NBDConnectError):
        client.connect(f"nbd://127.0.0.1:{free_port()}/disk", timeout=5)
