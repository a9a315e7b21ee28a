"""Test helpers for the security features (owned with nbdserver's TLS/ACL/cow/QoS/metrics work).

Certificates are made fresh per test session with trustme (a throwaway CA, a server certificate
for localhost/127.0.0.1, and a client certificate), laid out the way each real client expects:
libnbd's ``tls-certificates=DIR`` and qemu's ``tls-creds-x509,dir=DIR,endpoint=client`` both read
``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem`` from one directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pki:
    server_cert: Path
    server_key: Path
    ca: Path  # the CA that signed both server and client certificates
    client_dir: Path  # ca-cert.pem + client-cert.pem + client-key.pem
    client_dir_no_cert: Path  # ca-cert.pem only: a client without a certificate
    client_dir_wrong_ca: Path  # a client certificate from a CA the server does not trust
    client_dir_untrusting: Path  # a client that trusts another CA (cannot verify the server)


def _write_client_dir(path: Path, ca: trustme.CA, leaf: trustme.LeafCert | None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path / "ca-cert.pem"))
    if leaf is not None:
        leaf.cert_chain_pems[0].write_to_path(str(path / "client-cert.pem"))
        leaf.private_key_pem.write_to_path(str(path / "client-key.pem"))
    return path


def make_pki(root: Path) -> Pki:
    ca = trustme.CA(organization_name="kube-nbd test CA")
    other = trustme.CA(organization_name="an unrelated CA")
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    client = ca.issue_cert("client.example", common_name="client.example")
    stranger = other.issue_cert("stranger.example", common_name="stranger.example")
    root.mkdir(parents=True, exist_ok=True)
    server.cert_chain_pems[0].write_to_path(str(root / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(root / "server-key.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    for p in ("server-key.pem",):
        os.chmod(root / p, 0o600)
    return Pki(
        server_cert=root / "server-cert.pem",
        server_key=root / "server-key.pem",
        ca=root / "ca.pem",
        client_dir=_write_client_dir(root / "client", ca, client),
        client_dir_no_cert=_write_client_dir(root / "client-nocert", ca, None),
        client_dir_wrong_ca=_write_client_dir(root / "client-wrongca", ca, stranger),
        client_dir_untrusting=_write_client_dir(root / "client-untrusting", other, client),
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling interval of a deadline wait, not synchronisation by sleep


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054


def raw_greeting(host: str, port: int, source: str | None = None, timeout: float = 5.0) -> bytes:
    """Connect (from ``source`` if given) and read what the server says first: the 18-byte
    newstyle greeting, or b"" when the server closes the connection without a word."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        data = b""
        while len(data) < 18:
            try:
                chunk = s.recv(18 - len(data))
            except ConnectionResetError:
                return data
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


def is_greeting(data: bytes) -> bool:
    if len(data) != 18:
        return False
    magic, opt, _flags = struct.unpack(">QQH", data)
    return magic == NBDMAGIC and opt == IHAVEOPT


class Served:
    """A running ``nbdserver serve`` subprocess; ``log()`` returns its stderr so far."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, logfile: Path) -> None:
        self.proc = proc
        self.port = port
        self.logfile = logfile

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


@contextlib.contextmanager
def serve(  # type: ignore[no-untyped-def]
    args: list[str],
    tmp: Path,
    port: int | None = None,
    bind: str = "127.0.0.1",
    preexec_fn: Callable[[], None] | None = None,
    cli_listen: bool = True,
):
    """Start ``nbdserver serve ARGS --bind BIND --port PORT``; stop it (SIGTERM) afterwards."""
    port = port or free_port()
    logfile = tmp / f"nbdserver-{port}.log"
    cmd = [sys.executable, "-m", "nbdserver.cli", "serve", *args]
    if cli_listen:  # else the address comes from the arguments (a --config file)
        cmd += ["--bind", bind, "--port", str(port)]
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=preexec_fn
        )
    served = Served(proc, port, logfile)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"nbdserver exited {proc.returncode}:\n{served.log()}")
            try:
                socket.create_connection(
                    ("127.0.0.1" if bind in ("0.0.0.0", "::") else bind, port), 0.5
                ).close()
                return True
            except OSError:
                return False

        wait_for(listening, 20, f"nbdserver to listen on port {port}")
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def run(cmd: list[str], timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


REPO = Path(__file__).resolve().parents[2]


def nbd_connect_from(source: str, port: int, export: str = "", host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    """A negotiated nbdserver.client connection whose source address is ``source`` (any of
    127.0.0.0/8 routes over lo, so tests can be several client hosts at once)."""
    from nbdserver.client import NBDConnection, handshake

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect((host, port))
        sock, details = handshake(sock, export)
    except BaseException:
        sock.close()
        raise
    return NBDConnection(sock, details)
