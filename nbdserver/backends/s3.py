"""A read-only backend over S3: ``s3://bucket/key`` read with ranged GetObject calls.

Why: golden images live in object stores; the real SDK (botocore) brings what users expect:
the credentials chain (environment, profiles, web identity, instance metadata), regions, and
``AWS_ENDPOINT_URL`` for S3-compatible stores, which ``--s3-endpoint`` overrides. Addressing is
path-style (``endpoint/bucket/key``), which every S3-compatible store understands.

botocore is the optional extra ``s3`` (``pip install 'kube-nbd[s3]'``), imported only when an
``s3://`` export opens; without it that export is refused in one line. botocore's own retries
are off: ``nbdserver.backends._retry`` retries 5xx, throttling, resets and timeouts within
``--remote-timeout``, as for HTTP, then fails that request with ``EIO``.

At open, HeadObject gives the size and validators; 403, 404 or a missing bucket are a one-line
refusal naming the status (``RemoteUnavailable`` for a transient one). ``validator`` (size and ETag)
tells ``nbdserver import`` whether a partial download is of the same object. Identity: ``s3-`` +
hash of endpoint, URL, size and ETag; the ETag is sent as ``IfMatch`` so an object replaced while
served fails its reads instead of mixing.

Must not: write, cache, or reach any endpoint but the one configured.
"""

from __future__ import annotations

import errno
from typing import Any
from urllib.parse import urlsplit

from nbdserver.backends._retry import Transient, within
from nbdserver.backends.base import Backend, BackendKind, BlockSize, RemoteOptions
from nbdserver.backends.identity import digest
from nbdserver.errors import ConfigError, RemoteUnavailable

_TRANSIENT = (429, 500, 502, 503, 504)
_POOL = 32  # botocore's connection pool: at least one per serving thread


def is_s3(path: str) -> bool:
    return path.lower().startswith("s3://")


class S3Backend(Backend):
    """Ranged reads of one object; botocore clients are safe to share between threads."""

    can_multi_conn = True
    block_size = BlockSize(minimum=1, preferred=64 * 1024, maximum=32 * 1024 * 1024)

    def __init__(self, url: str, options: RemoteOptions) -> None:
        parts = urlsplit(url)
        self._url = url
        self._bucket, self._key = parts.netloc, parts.path.lstrip("/")
        if not self._bucket or not self._key:
            raise ConfigError(f"{url}: expected s3://BUCKET/KEY")
        self._timeout = options.timeout
        self._botocore = _botocore()
        self._client = self._make_client(options)
        head = self._head()
        self._size = int(head["ContentLength"])
        self._etag = str(head.get("ETag", ""))
        self.validator = f"{self._size}:{self._etag or head.get('LastModified', '')}"
        endpoint = self._client.meta.endpoint_url
        self.identity = digest("s3", endpoint, url, self._size, self._etag)

    def _make_client(self, options: RemoteOptions) -> Any:
        from botocore.config import Config

        session = self._botocore.session.get_session()
        config = Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1},
            connect_timeout=options.timeout,
            read_timeout=options.timeout,
            max_pool_connections=_POOL,
        )
        region = session.get_config_variable("region") or "us-east-1"
        return session.create_client(
            "s3", region_name=region, endpoint_url=options.s3_endpoint, config=config
        )

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        what = f"{self._url} bytes={offset}-{offset + len(buf) - 1}"

        def attempt(remaining: float) -> bytes:
            body = self._call(
                "get_object",
                Bucket=self._bucket,
                Key=self._key,
                Range=f"bytes={offset}-{offset + len(buf) - 1}",
                **({"IfMatch": self._etag} if self._etag else {}),
            )["Body"]
            try:
                data: bytes = body.read()
            except (OSError, self._botocore.exceptions.BotoCoreError) as exc:
                raise Transient(str(exc) or type(exc).__name__) from None
            if len(data) != len(buf):
                raise Transient(f"short answer: {len(data)} of {len(buf)} bytes")
            return data

        buf[:] = within(self._timeout, what, attempt)

    def close(self) -> None:
        self._client.close()

    def _call(self, op: str, **params: Any) -> Any:
        """One SDK call: throttling, 5xx and connection trouble are ``Transient``; any other
        answer is ``EIO`` naming the status."""
        exceptions = self._botocore.exceptions
        try:
            return getattr(self._client, op)(**params)
        except exceptions.ClientError as exc:
            status = _status(exc)
            if status in _TRANSIENT:
                raise Transient(_describe(exc)) from None
            raise OSError(errno.EIO, f"{self._url}: {_describe(exc)}") from None
        except (exceptions.BotoCoreError, OSError) as exc:
            if isinstance(exc, exceptions.NoCredentialsError):
                raise
            raise Transient(str(exc) or type(exc).__name__) from None

    def _head(self) -> Any:
        try:
            return self._call("head_object", Bucket=self._bucket, Key=self._key)
        except Transient as exc:
            raise RemoteUnavailable(f"{self._url}: {exc}") from None
        except OSError as exc:
            raise ConfigError(str(exc.strerror)) from None
        except self._botocore.exceptions.NoCredentialsError:
            raise ConfigError(f"{self._url}: no AWS credentials found") from None


def _status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _describe(exc: Any) -> str:
    code = exc.response.get("Error", {}).get("Code", "")
    status = _status(exc)
    return f"HTTP {status} {code if code != str(status) else ''}".rstrip()


def _botocore() -> Any:
    try:
        import botocore.exceptions
        import botocore.session
    except ImportError:
        raise ConfigError(
            "s3:// images need botocore: pip install 'kube-nbd[s3]' (or botocore)"
        ) from None
    return botocore


def _refuse_open(path: str | None, size: int | None, read_only: bool) -> Backend:
    raise ConfigError(f"{path}: an s3:// image is opened by its URL")


KIND = BackendKind("s3", _refuse_open, claims=is_s3, open_remote=lambda url, o: S3Backend(url, o))
