"""Helpers that run *inside* a UML guest: start NBD servers, run the agent, record results.

Why it exists: kernel scenarios (tests/kernel/scenarios_agent.py, bench/agent_attach.py) start
real servers (nbdserver, nbdkit, qemu-nbd, nbd-server) on the guest's loopback and drive the
agent's CLI exactly as a user would. Results go to ``$WORK/results.json`` so the host-side test
asserts on data, not on log text.

What it must not do: run on the host (it assumes the guest's root privileges and a private
loopback), or sleep as synchronisation: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WORK = Path(os.environ.get("WORK", "."))
SCRATCH = Path(os.environ.get("SCRATCH", "/tmp"))
PY = os.environ.get("PY", sys.executable)


def wait_until(cond: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``cond`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)  # bounded poll of a condition that has no notification


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


class Server:
    """A server process on 127.0.0.1:port; ``argv`` must keep it in the foreground."""

    def __init__(
        self, kind: str, argv: Sequence[str], port: int, pidfile: Path | None = None
    ) -> None:
        self.kind, self.argv, self.port = kind, list(argv), port
        self.pidfile = pidfile  # set for servers that daemonize
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        log = open(WORK / f"server-{self.kind}-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        proc = self.proc
        if self.pidfile:
            if self.proc.wait(15) != 0:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}")
            wait_until(lambda: self.pidfile and self.pidfile.exists(), 15, f"{self.kind} pid")
            wait_until(lambda: port_open(self.port), 15, f"{self.kind} port")
            return self
        wait_until(lambda: port_open(self.port) or proc.poll() is not None, 15, self.kind)
        if proc.poll() is not None:
            raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}: {self.argv}")
        return self

    def _pgid(self) -> int | None:
        if self.pidfile:
            text = self.pidfile.read_text().strip() if self.pidfile.exists() else ""
            return os.getpgid(int(text)) if text.isdigit() else None
        if self.proc and self.proc.poll() is None:
            return self.proc.pid
        return None

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            pgid = self._pgid()
            if pgid is not None:
                os.killpg(pgid, sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: no NBD_CMD_DISC, sockets reset by the kernel."""
        self._signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self._reap()
        except TimeoutError:
            self.kill()

    def _reap(self) -> None:
        if self.proc and not self.pidfile:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(self.kind) from exc
        else:
            wait_until(lambda: not port_open(self.port), 10, f"{self.kind} to stop")
            if self.pidfile:
                self.pidfile.unlink(missing_ok=True)


def make_image(name: str, size: int) -> Path:
    path = SCRATCH / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def tls_certificates() -> Path:
    """A fresh CA and a server certificate for 127.0.0.1 in SCRATCH/certs: ``ca-cert.pem`` (the
    name libnbd-style ``tls-certificates=DIR`` URIs look for), ``server.pem``, ``server.key``."""
    import trustme  # only the TLS scenarios need it

    certs = SCRATCH / "certs"
    certs.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(certs / "ca-cert.pem"))
    cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    cert.private_key_pem.write_to_path(str(certs / "server.key"))
    return certs


def server(kind: str, image: Path, *, name: str = "", port: int | None = None) -> Server:
    """A writable server of ``kind`` exporting ``image`` as ``name``."""
    port = port or free_port()
    if kind == "nbdserver":
        argv = [PY, "-m", "nbdserver", "serve", str(image), "--name", name]
        argv += ["--bind", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    elif kind == "nbdkit":
        # nbdkit ignores the export name; --exportname-strict would refuse others.
        argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", str(image)]
    elif kind == "qemu-nbd":
        argv = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-x", name]
        argv += ["--persistent", "--shared=8", str(image)]  # else it exits after one client
    elif kind == "nbd-server":
        conf = SCRATCH / f"nbd-server-{port}.conf"
        conf.write_text(
            f"[generic]\n\tlistenaddr = 127.0.0.1\n\tport = {port}\n\tallowlist = true\n"
            f"[{name or 'default'}]\n\texportname = {image}\n\tflush = true\n"
        )
        # nbd-server forks per client (and -d serves one client only): run it as a daemon.
        argv = ["nbd-server", "-C", str(conf), "-p", str(SCRATCH / f"nbd-server-{port}.pid")]
    else:
        raise ValueError(kind)
    pidfile = SCRATCH / f"nbd-server-{port}.pid" if kind == "nbd-server" else None
    return Server(kind, argv, port, pidfile)


def run(argv: Sequence[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)


def agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "nbd_agent.cli", *args], timeout=timeout)


def configured_devices() -> list[int]:
    """Indexes the kernel holds a configuration for (via the agent's own netlink STATUS)."""
    from nbd_agent.netlink import NbdNetlink

    with NbdNetlink() as nl:
        return [s.index for s in nl.status() if s.connected]


def getsize64(dev: str) -> int:
    return int(run(["blockdev", "--getsize64", dev]).stdout.strip() or -1)


class Results:
    """A dict saved to $WORK/results.json after every change, so a crash keeps what was done."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = WORK / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(WORK / "results.json")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def load_results(workdir: Path) -> dict[str, Any]:
    path = workdir / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}
