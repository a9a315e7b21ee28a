"""Start, watch and stop the NBD servers that the bench compares.

Why: a fair comparison needs every server on the same image, on loopback, with the same caching
(all four go through the page cache with plain pread/pwrite), started the same way and declared
ready by the same test (the NBD greeting on its port), never by a guessed sleep. This module also
reads each server's memory and CPU time from /proc, over its whole process tree, because
nbd-server forks a child per connection and nbdserver may run workers.

What it must not do: measure anything with fio (see workloads.py), hide a server that cannot run
(callers get a reason string to print), or leave a server running: every start has a stop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
NBD_GREETING = b"NBDMAGIC"
# The nbdserver installed beside the interpreter running the bench (the project's venv).
DEFAULT_NBDSERVER = str(Path(sys.executable).parent / "nbdserver")


class ServerStartError(RuntimeError):
    """A server could not be started or never answered the NBD greeting."""


@dataclass(frozen=True)
class ServerSpec:
    """How to run one server: its command line, export name and whether it daemonizes."""

    name: str
    binary: str
    export: str = ""
    # nbd-server has no foreground mode that serves more than one client (-d serves one
    # connection and exits), so it runs as the daemon it is and reports its pid in a file.
    daemonizes: bool = False
    extra_args: tuple[str, ...] = ()
    image_format: str = "raw"  # or qcow2: each server reads the image through its qcow2 code

    def command(self, image: Path, port: int, workdir: Path) -> list[str]:
        if self.name == "nbdserver":
            return [self.binary, "serve", str(image), "--bind", HOST, "--port", str(port),
                    "--format", self.image_format, *self.extra_args]  # fmt: skip
        if self.name == "qemu-nbd":
            # -t: stay up between fio's connections; -e 8: allow the 4 multi-conn connections
            # (qemu-nbd then advertises CAN_MULTI_CONN); writeback: page cache like the others.
            return [
                self.binary, "-t", "-f", self.image_format, "--cache=writeback", "--aio=threads",
                "-e", "8", "-b", HOST, "-p", str(port), *self.extra_args, str(image),
            ]  # fmt: skip
        if self.name == "nbdkit":
            return [
                self.binary, "-f", "-i", HOST, "-p", str(port), *self.extra_args,
                *(["--filter=qcow2dec"] if self.image_format == "qcow2" else []),
                "file", f"file={image}",
            ]  # fmt: skip
        if self.name == "nbd-server":
            (workdir / "nbd-server.pid").unlink(missing_ok=True)
            config = workdir / "nbd-server.conf"
            config.write_text(
                "[generic]\n"
                f"    listenaddr = {HOST}\n"
                f"    port = {port}\n"
                f"[{self.export}]\n"
                f"    exportname = {image}\n"
                "    flush = true\n"
                "    fua = true\n"
                "    trim = true\n"
            )
            return [self.binary, "-C", str(config), "-p", str(workdir / "nbd-server.pid")]
        raise ValueError(f"unknown server {self.name!r}")

    def uri(self, port: int) -> str:
        return f"nbd://{HOST}:{port}/{self.export}"


def default_specs(
    nbdserver: str = DEFAULT_NBDSERVER,
    nbdserver_args: tuple[str, ...] = (),
    image_format: str = "raw",
) -> dict[str, ServerSpec]:
    fmt = image_format
    specs = [
        ServerSpec("nbdserver", nbdserver, extra_args=nbdserver_args, image_format=fmt),
        ServerSpec("qemu-nbd", "qemu-nbd", image_format=fmt),
        ServerSpec("nbdkit", "nbdkit", image_format=fmt),
        ServerSpec("nbd-server", "nbd-server", export="disk", daemonizes=True, image_format=fmt),
    ]
    return {s.name: s for s in specs}


def unavailable_reason(spec: ServerSpec) -> str | None:
    """Why this server cannot run here, or None when its binary is present."""
    if shutil.which(spec.binary) is None and not os.access(spec.binary, os.X_OK):
        return f"{spec.binary} not found (install it, see scripts/apt-packages.txt)"
    if spec.image_format == "qcow2" and spec.name == "nbd-server":
        return "nbd-server serves raw images only"
    if spec.image_format == "qcow2" and spec.name == "nbdkit":
        probe = [spec.binary, "--filter=qcow2dec", "null", "--version"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            return "this nbdkit has no qcow2dec filter (nbdkit 1.36 and later)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def answers_nbd(port: int, timeout: float = 0.5) -> bool:
    """True when something on the port sends the NBD greeting (the first 8 bytes)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            got = b""
            while len(got) < len(NBD_GREETING):
                chunk = s.recv(len(NBD_GREETING) - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == NBD_GREETING
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool], deadline: float, what: str, interval: float = 0.05
) -> None:
    """Poll condition until it holds; raise ServerStartError once the deadline passes."""
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise ServerStartError(f"timed out waiting for {what}")
        pause.wait(interval)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the tree, counting children it has already reaped."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3); utime, stime, cutime, cstime are fields 14-17.
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
    return user / tick, system / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


@dataclass
class RunningServer:
    spec: ServerSpec
    port: int
    pid: int
    workdir: Path
    popen: subprocess.Popen[bytes] | None
    log: Path
    peak_tree_rss_kib: int = 0
    _stop_sampling: threading.Event = field(default_factory=threading.Event)
    _sampler: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.spec.uri(self.port)

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def tree_rss_kib(self) -> int:
        return sum(_status_kib(p, "VmRSS") for p in process_tree(self.pid))

    def hwm_kib(self) -> int:
        """VmHWM (peak resident set) of the main process, as the kernel recorded it."""
        return _status_kib(self.pid, "VmHWM")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def start_sampling(self, interval: float = 0.2) -> None:
        """Keep the highest summed RSS of the process tree (children may come and go)."""

        def loop() -> None:
            while not self._stop_sampling.is_set():
                self.peak_tree_rss_kib = max(self.peak_tree_rss_kib, self.tree_rss_kib())
                self._stop_sampling.wait(interval)

        self._sampler = threading.Thread(target=loop, name=f"rss-{self.spec.name}", daemon=True)
        self._sampler.start()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            if self.popen is not None and not self.spec.daemonizes:
                self.popen.wait(timeout)
            else:
                wait_until(lambda: not self.alive(), deadline, f"{self.spec.name} to exit")
        except (subprocess.TimeoutExpired, ServerStartError):
            for p in reversed(process_tree(self.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            if self.popen is not None:
                self.popen.wait(timeout)


def start_server(
    spec: ServerSpec, image: Path, workdir: Path, timeout: float = 20.0
) -> RunningServer:
    """Start spec on a free port and return once it sends the NBD greeting."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{spec.name}.log"
    last_error = ""
    # A free port can be taken by another engineer's test between our probe and the server's
    # bind; try a few ports before giving up.
    for _attempt in range(3):
        port = free_port()
        cmd = spec.command(image, port, workdir)
        with open(log, "wb") as logf:
            popen = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        try:
            pid = _main_pid(spec, popen, workdir, deadline)
            server = RunningServer(spec, port, pid, workdir, popen, log)
            wait_until(
                functools.partial(_ready_or_dead, server),
                deadline,
                f"{spec.name} to answer on port {port}",
            )
            if server.alive():
                return server
            last_error = f"{spec.name} exited during start: {server.log_tail()}"
        except ServerStartError as e:
            last_error = f"{e}: {log.read_text(errors='replace').strip()[-400:]}"
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)
    raise ServerStartError(last_error)


def _ready_or_dead(server: RunningServer) -> bool:
    return not server.alive() or answers_nbd(server.port)


def _main_pid(
    spec: ServerSpec, popen: subprocess.Popen[bytes], workdir: Path, deadline: float
) -> int:
    if not spec.daemonizes:
        return popen.pid
    pidfile = workdir / "nbd-server.pid"

    def has_pid() -> bool:
        if popen.poll() not in (None, 0):
            raise ServerStartError(f"{spec.name} exited with {popen.returncode}")
        return pidfile.exists() and pidfile.read_text().strip().isdigit()

    wait_until(has_pid, deadline, f"{spec.name} pid file")
    return int(pidfile.read_text().strip())
