"""A read-only backend over HTTP(S): an image on a web server, read with Range requests.

Why: golden images live on web servers; serving one directly saves a copy. The standard
library's ``http.client`` does it (nbdserver has no third-party dependency to keep): one kept-alive
connection per serving thread (a ``threading.local``), so the pool is as large as the number of
threads reading, and no lock is held across a request.

At open: one ``GET`` of the first byte learns the size (``Content-Range``), that ranges work (a
``200`` with the whole body is refused) and the validators; 403, 404 and any other status there are
a ``ConfigError`` naming it (``RemoteUnavailable`` for a transient one). Redirects (301, 302, 303,
307, 308) are followed there, at most ``MAX_REDIRECTS`` of them and never from https to http; every
later read goes straight to where they led. Per request: transient failures (5xx, 429, resets,
timeouts) are retried with exponential backoff until ``RemoteOptions.timeout`` has passed since the
request began; then, or on any other status, the request fails with ``EIO`` and the server stays up.
A strong ``ETag`` is sent back as ``If-Match``: an image replaced while it is served fails its reads
(412) instead of mixing two images.

Identity: ``url-`` + hash of URL, size and ``ETag`` (else ``Last-Modified``); an image with
neither gets a new identity per process, since nothing says it is the same data.

``validator`` (ETag, else Last-Modified, with the size) lets ``nbdserver import`` tell whether a
partial download is still of the same object.

Must not: write, cache (``nbdserver.filters.cache`` does), or follow a redirect after open (a
read answered with one fails with EIO, as any unexpected status).
"""

from __future__ import annotations

import errno
import http.client
import logging
import re
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from nbdserver.backends._retry import Transient, within
from nbdserver.backends.base import Backend, BackendKind, BlockSize, RemoteOptions
from nbdserver.backends.identity import digest, new_identity
from nbdserver.errors import ConfigError, RemoteUnavailable

log = logging.getLogger("nbdserver.remote")
_SCHEMES = ("http", "https")
_TRANSIENT = (429, 500, 502, 503, 504)
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
_CONTENT_RANGE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)")


def is_url(path: str) -> bool:
    return path.partition("://")[0].lower() in _SCHEMES


@dataclass(frozen=True)
class _Where:
    """Where requests go: the URL itself, or where its redirects led at open."""

    url: str
    https: bool
    host: str
    port: int | None
    target: str


def _where(url: str) -> _Where:
    parts = urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES or not parts.hostname:
        raise ConfigError(f"{url}: not an http:// or https:// URL")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{url}: not a valid port") from None
    return _Where(url, parts.scheme.lower() == "https", parts.hostname, port, target)


class HttpBackend(Backend):
    """Range reads of one URL; safe from many threads (each has its own connection)."""

    can_multi_conn = True  # read-only: every connection sees the same bytes
    block_size = BlockSize(minimum=1, preferred=64 * 1024, maximum=32 * 1024 * 1024)

    def __init__(self, url: str, options: RemoteOptions) -> None:
        self._url = url
        self._where = _where(url)
        self._timeout = options.timeout
        self._ca_bundle = options.ca_bundle
        self._ssl = _ssl_context(options.ca_bundle) if self._where.https else None
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._if_match: dict[str, str] = {}
        self._size, etag, modified = self._probe()
        if etag and not etag.startswith("W/"):
            self._if_match = {"If-Match": etag}
        validator = etag or modified
        self.validator = f"{self._size}:{validator}" if validator else ""
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
            where = self._where
            if where.https:
                conn = http.client.HTTPSConnection(
                    where.host, where.port, timeout=timeout, context=self._ssl
                )
            else:
                conn = http.client.HTTPConnection(where.host, where.port, timeout=timeout)
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
            conn.request("GET", self._where.target, headers=headers)
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
        """Size, ETag and Last-Modified from a one-byte range request, after any redirects;
        refusals are one line."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp, _ = self._request({"Range": "bytes=0-0"}, self._timeout)
            except Transient as exc:
                raise RemoteUnavailable(f"{self._url}: {exc}") from None
            except ssl.SSLCertVerificationError as exc:
                raise ConfigError(f"{self._url}: {exc.verify_message or exc}") from None
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                return self._answer(resp)
            self._follow(urljoin(self._where.url, location))
        raise ConfigError(f"{self._url}: more than {MAX_REDIRECTS} redirects")

    def _follow(self, url: str) -> None:
        """Send every later request to ``url``; a downgrade to plain http is refused, since it
        would hand an image asked for over TLS to anyone on the path."""
        where = _where(url)
        if self._where.https and not where.https:
            raise ConfigError(f"{self._url}: redirected from https to http ({url}): refused")
        log.info("%s: redirected to %s", self._where.url, url)
        self._drop()
        self._where = where
        if where.https and self._ssl is None:
            self._ssl = _ssl_context(self._ca_bundle)

    def _answer(self, resp: http.client.HTTPResponse) -> tuple[int, str, str]:
        """Size and validators from the probe's final answer, or its status as a refusal."""
        total = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range", "").strip())
        if resp.status == 200:
            raise ConfigError(f"{self._url}: the server does not support range requests")
        if resp.status in (206, 416) and total:
            return (
                int(total.group(1)),
                resp.getheader("ETag", ""),
                resp.getheader("Last-Modified", ""),
            )
        if resp.status in _TRANSIENT:
            raise RemoteUnavailable(f"{self._url}: {_status(resp)}")
        raise ConfigError(f"{self._url}: {_status(resp)}")


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
