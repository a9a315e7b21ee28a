"""What ``nbdserver import`` reads: a URL through the serving backends, or a local file.

Why the backends: they already hold the one Range-request path, the retry loop within
``--remote-timeout``, redirects, TLS verification and the botocore client; a second client would
fail differently. A transient failure at open is retried within the same deadline (by
``nbdserver.backends.registry.open_remote``, as for ``serve``).

Must not: write anything, or decide what a failure means for the import (``run`` does).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from nbdserver.backends.base import RemoteOptions
from nbdserver.backends.registry import is_remote, kind_for, open_remote
from nbdserver.errors import ConfigError


class Source(Protocol):
    """The few calls an import makes; the http and s3 backends have them."""

    validator: str  # changes when the object does; "" = nothing says it is the same

    def size(self) -> int: ...

    def pread(self, buf: memoryview, offset: int) -> None: ...

    def close(self) -> None: ...


class LocalSource:
    """A local file or block device read with ``os.pread``; its validator is its size, mtime
    and inode."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        st = os.fstat(self._fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self._fd)
            raise ConfigError(f"{path}: not a regular file or block device")
        self._size = os.lseek(self._fd, 0, os.SEEK_END)  # a block device's st_size is 0
        self.validator = f"{self._size}:{st.st_mtime_ns}:{st.st_ino}"

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        got = os.preadv(self._fd, [buf], offset)
        if got != len(buf):
            raise OSError(5, f"short read: {got} of {len(buf)} bytes at {offset}")

    def close(self) -> None:
        os.close(self._fd)


def open_source(url: str, options: RemoteOptions) -> Source:
    """The source at ``url``; a transient failure at open is retried within the deadline
    (then ``RemoteUnavailable``), a refusal (404, 403, bad URL) is a ``ConfigError`` at once."""
    if not is_remote(url):
        return LocalSource(url)
    backend = open_remote(kind_for("auto", url), url, options)
    return backend  # type: ignore[return-value]  # http/s3 backends carry a validator


def chunks(source: Source, start: int, end: int, chunk: int, ahead: int) -> Iterator[memoryview]:
    """The bytes of ``source`` from ``start`` to ``end`` in order, ``chunk`` bytes at a time,
    with up to ``ahead`` requests in flight at once (each backend thread has its own
    connection): one stream pays a round trip per request and leaves the link idle while the
    caller hashes and writes. A failed request raises when its chunk's turn comes; leaving
    early cancels what has not started."""
    pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="import-fetch")
    pending: deque[tuple[bytearray, Future[None]]] = deque()
    offsets = iter(range(start, end, chunk))

    def submit() -> None:
        offset = next(offsets, None)
        if offset is not None:
            buf = bytearray(min(chunk, end - offset))
            pending.append((buf, pool.submit(source.pread, memoryview(buf), offset)))

    try:
        for _ in range(ahead):
            submit()
        while pending:
            buf, fetched = pending.popleft()
            fetched.result()
            submit()
            yield memoryview(buf)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
