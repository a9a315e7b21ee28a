"""A read-only backend over HTTP(S): an image on a web server, read with Range requests.

Why: golden images live on web servers; serving one directly saves a copy. The standard
library's ``http.client`` does it (nbdserver has no third-party dependency to keep): one kept-alive
connection per serving thread (a ``threading.local``), so the pool is as large as the number of
threads reading, and no lock is held across a request.

At open: one ``GET`` of the first byte learns the size (``Content-Range``), that ranges work (a
``200`` with the whole body is refused) and the validators; 403, 404 and any other status there
are a ``ConfigError`` naming it. Per request: transient failures (5xx, 429, resets, timeouts)
are retried with exponential backoff until ``RemoteOptions.timeout`` has passed since the
request began; then, or on any other status, the request fails with ``EIO`` and the server
stays up. A strong ``ETag`` is sent back as ``If-Match``: an image replaced while it is served
fails its reads (412) instead of mixing two images.

Identity: ``url-`` + hash of URL, size and ``ETag`` (else ``Last-Modified``); an image with
neither gets a new identity per process, since nothing says it is the same data.

Must not: write, cache (``nbdserver.filters.cache`` does), or follow redirects (refused at open
with the status and ``Location``).
"""

from __future__ import annotations

import errno
import http.client
import re
import ssl
import threading
from urllib.parse import urlsplit

from nbdserver.backends._retry import Transient, within
from nbdserver.backends.base import Backend, BackendKind, BlockSize, RemoteOptions
from nbdserver.backends.identity import digest, new_identity
from nbdserver.errors import ConfigError

_SCHEMES = ("http", "https")
_TRANSIENT = (429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)")


def is_url(path: str) -> bool:
    return path.partition("://")[0].lower() in _SCHEMES


class HttpBackend(Backend):
    """Range reads of one URL; safe from many threads (each has its own connection)."""

    can_multi_conn = True  # read-only: every connection sees the same bytes
    block_size = BlockSize(minimum=1, preferred=64 * 1024, maximum=32 * 1024 * 1024)

    def __init__(self, url: str, options: RemoteOptions) -> None:
        parts = urlsplit(url)
        if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
            raise ConfigError(f"{url}: not an http:// or https:// URL")
        self._url = url
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout = options.timeout
        self._ssl = _ssl_context(options.ca_bundle) if self._https else None
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._if_match: dict[str, str] = {}
        self._size, etag, modified = self._probe()
        if etag and not etag.startswith("W/"):
            self._if_match = {"If-Match": etag}
        validator = etag or modified
        self.identity = (
            digest("url", url, self._size, validator) if validator else new_identity("url")
        )

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        end = offset + len(buf) - 1
        body = self._fetch({"Range": f"bytes={offset}-{end}", **self._if_match}, len(buf))
        buf[:] = body

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- the connection of this thread

    def _conn(self, timeout: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _request(
        self, headers: dict[str, str], timeout: float
    ) -> tuple[http.client.HTTPResponse, bytes]:
        """One attempt; connection trouble is ``Transient`` (the connection is dropped)."""
        try:
            conn = self._conn(timeout)
            conn.request("GET", self._target, headers=headers)
            resp = conn.getresponse()
            # A 200 ignored the range: its body may be the whole image, so it is not read.
            body = b"" if resp.status == 200 else resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise  # not transient: the certificate will not change
            raise Transient(str(exc) or type(exc).__name__) from None
        if resp.will_close or resp.status == 200:
            self._drop()
        return resp, body

    def _fetch(self, headers: dict[str, str], length: int) -> bytes:
        """The body of a 206 of ``length`` bytes, retried within the deadline, else EIO."""

        def attempt(remaining: float) -> bytes:
            resp, body = self._request(headers, remaining)
            if resp.status == 206 and len(body) == length:
                return body
            if resp.status in _TRANSIENT:
                raise Transient(_status(resp))
            raise OSError(errno.EIO, f"{self._url}: {_status(resp)} for {headers['Range']}")

        return within(self._timeout, f"{self._url} {headers['Range']}", attempt)

    def _probe(self) -> tuple[int, str, str]:
        """Size, ETag and Last-Modified from a one-byte range request; refusals are one line."""
        try:
            resp, _ = self._request({"Range": "bytes=0-0"}, self._timeout)
        except Transient as exc:
            raise ConfigError(f"{self._url}: {exc}") from None
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(f"{self._url}: {exc.verify_message or exc}") from None
        total = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range", "").strip())
        if resp.status == 200:
            raise ConfigError(f"{self._url}: the server does not support range requests")
        if resp.status in (206, 416) and total:
            return (
                int(total.group(1)),
                resp.getheader("ETag", ""),
                resp.getheader("Last-Modified", ""),
            )
        where = resp.getheader("Location")
        more = f" (to {where}: give that URL)" if where and 300 <= resp.status < 400 else ""
        raise ConfigError(f"{self._url}: {_status(resp)}{more}")


def _status(resp: http.client.HTTPResponse) -> str:
    return f"HTTP {resp.status} {resp.reason}".rstrip()


def _ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-bundle {ca_bundle}: {exc}") from None


def _refuse_open(path: str | None, size: int | None, read_only: bool) -> Backend:
    raise ConfigError(f"{path}: an http(s) image is opened by its URL")


KIND = BackendKind(
    "http", _refuse_open, claims=is_url, open_remote=lambda url, o: HttpBackend(url, o)
)
