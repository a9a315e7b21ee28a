"""A Range-capable HTTP(S) origin for tests, with faults on demand (shared by unit and interop).

``Origin(root)`` serves the files under ``root`` on 127.0.0.1 over HTTP/1.1 with kept-alive
connections, ``Range: bytes=A-B`` (206 with ``Content-Range``), an ``ETag`` and
``Last-Modified`` (an ``If-Match`` of another ETag answers 412).

Faults, taken by the next GET requests in turn: ``fail(n, "503")``; ``fail(n, "reset")`` (the
connection is closed with an RST); ``fail(n, "slow")`` (no answer until ``slow`` seconds pass or the
origin stops). ``status[path] = 403`` answers a path with that status; ``ranges = False`` ignores
Range (200 and the whole file); ``redirects[path] = (301, "/other")`` answers a path with that
redirect; ``delay`` seconds pass before each answer with data (an origin slow enough to kill a
download half-way). ``requests`` records every (path, Range header) served, for counting. Use as a
context manager: leaving it stops the server, its threads and any slow answer."""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


def holey_image(path: Path, size: int, data: int = 4096, tag: bool = True) -> Path:
    """A sparse test image of ``size`` bytes: ``data`` random bytes (then, with ``tag``, the
    offset as 8 bytes) at each MiB, holes between, so a wrong offset cannot compare equal."""
    with open(path, "wb") as f:
        for i in range(0, size, 1024 * 1024):
            f.seek(i)
            f.write(os.urandom(data) + (i.to_bytes(8, "little") if tag else b""))
        f.truncate(size)
    return path


class Origin:
    def __init__(self, root: Path, tls: ssl.SSLContext | None = None, slow: float = 5.0) -> None:
        self.root = root
        self.status: dict[str, int] = {}
        self.ranges = True
        self.redirects: dict[str, tuple[int, str]] = {}
        self.delay = 0.0
        self.slow = slow
        self.requests: list[tuple[str, str]] = []
        self._faults: list[str] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/{path}"

    def fail(self, n: int, kind: str) -> None:
        with self._lock:
            self._faults += [kind] * n

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def gets(self, path: str) -> int:
        """How many GETs of ``path`` were answered with data (the probe included)."""
        with self._lock:
            return sum(1 for p, _ in self.requests if p == path)

    def _take_fault(self) -> str | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _record(self, path: str, rng: str) -> None:
        with self._lock:
            self.requests.append((path, rng))

    def __enter__(self) -> Origin:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            fault = origin._take_fault()
            if fault == "reset":
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.close_connection = True
                return
            if fault == "slow" and origin._stopped.wait(origin.slow):
                return
            if fault == "503":
                return self._send(503, b"busy\n", {})
            path = self.path.lstrip("/")
            if path in origin.redirects:
                status, location = origin.redirects[path]
                return self._send(status, b"moved\n", {"Location": location})
            if path in origin.status:
                return self._send(origin.status[path], b"no\n", {})
            file = origin.root / path
            if not file.is_file():
                return self._send(404, b"not found\n", {})
            data = file.read_bytes()
            st = os.stat(file)
            tag = hashlib.sha256(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()
            headers = {
                "ETag": f'"{tag[:16]}"',
                "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
                "Accept-Ranges": "bytes" if origin.ranges else "none",
            }
            match = self.headers.get("If-Match")
            if match is not None and match != headers["ETag"]:
                return self._send(412, b"changed\n", {})
            if origin.delay and origin._stopped.wait(origin.delay):
                return
            rng = self.headers.get("Range", "")
            origin._record(path, rng)
            found = _RANGE.fullmatch(rng)
            if not origin.ranges or not found:
                return self._send(200, data, headers)
            start = int(found.group(1))
            end = min(int(found.group(2) or len(data) - 1), len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
