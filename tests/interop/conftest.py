"""Fixtures for driving a real ``nbdserver serve`` process (shared by interop, fuzz, TLS, bench).

``nbdserver`` is a factory: ``srv = nbdserver("--read-only", size="16M")`` starts
``python -m nbdserver serve IMAGE --size SIZE --bind 127.0.0.1 --port 0 ARGS...`` with a fresh
image in the test's tmp_path, waits until the server logs the port it listens on (no sleeps,
no port races: the kernel picked the port), and returns a ``Server`` with ``uri``, ``port``,
``proc``, ``image`` and the log lines so far. Pass ``image=None`` to give every export through
``--export`` yourself. Every server still running at teardown gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_LISTEN = re.compile(r"nbdserver listening on (\S+)")
_START_TIMEOUT = 20.0
_DEFAULT = object()
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    uri: str
    port: int | None
    proc: subprocess.Popen[str]
    image: Path | None
    unix: str | None = None
    log: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def export_uri(self, name: str) -> str:
        if self.port is None:
            return f"nbd+unix:///{name}?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait until a log line matches ``pattern`` (regex); return it, or fail the test."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.log:
                    if rx.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader_alive()):
                    raise AssertionError(f"no log line matching {pattern!r}:\n" + self.text())
                self._changed.wait(remaining)

    def text(self) -> str:
        with self._changed:
            return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server and wait for it to exit; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"nbdserver ignored signal {sig} for {timeout}s") from None

    _reader: threading.Thread | None = field(default=None, repr=False)

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()


def _pump(server: Server) -> None:
    assert server.proc.stderr is not None
    for line in server.proc.stderr:
        with server._changed:
            server.log.append(line)
            server._changed.notify_all()
    with server._changed:
        server._changed.notify_all()


def start_server(
    args: list[str], image: Path | None, cwd: Path, timeout: float = _START_TIMEOUT
) -> Server:
    cmd = [sys.executable, "-m", "nbdserver", "serve", *args]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=cwd, env=env
    )
    server = Server(uri="", port=None, proc=proc, image=image)
    server._reader = threading.Thread(target=_pump, args=(server,), daemon=True)
    server._reader.start()
    try:
        line = server.wait_log(_LISTEN.pattern, timeout)
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    where = _LISTEN.search(line)
    assert where is not None
    addr = where.group(1)
    # The TCP listener (if any) is logged before the unix one; the unix path follows it.
    if "--unix" in args:
        unix_line = server.wait_log(r"nbdserver listening on unix:", timeout)
        found = _LISTEN.search(unix_line)
        assert found is not None
        server.unix = found.group(1)[5:]
    if addr.startswith("unix:"):
        server.uri = server.export_uri("")
    else:
        server.port = int(addr.rsplit(":", 1)[1])
        server.uri = f"nbd://127.0.0.1:{server.port}/"
    return server


NbdServerFactory = Callable[..., Server]


@pytest.fixture
def nbdserver(tmp_path: Path) -> Iterator[NbdServerFactory]:
    """Factory: ``nbdserver(*args, image=<tmp>/disk.img, size="64M") -> Server``."""
    started: list[Server] = []

    def factory(*args: str, image: object = _DEFAULT, size: str | None = "64M") -> Server:
        argv: list[str] = []
        path: Path | None
        if image is _DEFAULT:
            path = tmp_path / f"disk{len(started)}.img"
        else:
            path = Path(str(image)) if image is not None else None
        if path is not None:
            argv.append(str(path))
            if size is not None:
                argv += ["--size", size]
        argv += ["--bind", "127.0.0.1", "--port", "0", *args]
        server = start_server(argv, path, tmp_path)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
                try:
                    server.proc.wait(15)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()
