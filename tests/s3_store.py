"""An S3-compatible store for tests: moto's server on 127.0.0.1, and a proxy in front of it
that answers 503 on demand (moto has no fault injection of its own).

``moto_store()`` yields the endpoint URL of a fresh store; ``put(endpoint, bucket, key, data)``
creates the bucket and object. ``FaultyProxy(endpoint)`` forwards every request to the store;
``fail(n)`` makes the next ``n`` requests whose path contains ``match`` answer 503 SlowDown
(``n < 0``: all of them, until ``clear()``); ``hits`` counts the requests forwarded or failed.
Use as a context manager; leaving it stops the proxy and its threads.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import urlsplit

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@contextmanager
def moto_store() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def put(endpoint: str, bucket: str, key: str, data: bytes) -> None:
    import botocore.session

    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint)
    try:
        client.create_bucket(Bucket=bucket)
        client.put_object(Bucket=bucket, Key=key, Body=data)
    finally:
        client.close()


class FaultyProxy:
    def __init__(self, upstream: str, match: str = "") -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.match = match
        self.hits = 0
        self._failing = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail(self, n: int) -> None:
        with self._lock:
            self._failing = n

    def clear(self) -> None:
        self.fail(0)

    def _should_fail(self, path: str) -> bool:
        with self._lock:
            if self.match not in path:
                return False
            self.hits += 1
            if self._failing == 0:
                return False
            if self._failing > 0:
                self._failing -= 1
            return True

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler(proxy: FaultyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            if proxy._should_fail(self.path):
                return self._answer(503, {"Content-Type": "application/xml"}, _SLOW_DOWN)
            conn = http.client.HTTPConnection(*proxy._upstream, timeout=30)
            try:
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                skip = {"transfer-encoding", "connection", "content-length"}
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                self._answer(resp.status, headers, data, head=self.command == "HEAD",
                             length=resp.getheader("Content-Length"))  # fmt: skip
            finally:
                conn.close()

        def _answer(
            self,
            status: int,
            headers: dict[str, str],
            body: bytes,
            head: bool = False,
            length: str | None = None,
        ) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", length if head and length else str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler
