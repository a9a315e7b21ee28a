"""Retries of one remote read within a deadline, with exponential backoff: shared by the http
and s3 backends so both fail the same way.

Why: a transient failure (a 5xx, a reset, a timeout) must not fail a client's read, but a read
must not hang either: past its deadline it fails with ``EIO`` and the server carries on.
Must not know HTTP or S3: the caller says what is transient by raising ``Transient``.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("nbdserver.remote")

FIRST_BACKOFF = 0.05
MAX_BACKOFF = 2.0


class Transient(Exception):
    """A failure worth another attempt; its message says what happened."""


def within(timeout: float, what: str, attempt: Callable[[float], T]) -> T:
    """``attempt(seconds_left)`` until it returns, retrying ``Transient`` with backoff while
    ``timeout`` seconds have not passed; then ``OSError(EIO)`` naming ``what`` and the last
    failure. Any other exception passes through at once."""
    deadline = time.monotonic() + timeout
    backoff = FIRST_BACKOFF
    while True:
        try:
            return attempt(max(deadline - time.monotonic(), 0.001))
        except Transient as exc:
            why = str(exc)
        if deadline - time.monotonic() <= backoff:
            log.warning("%s: giving up: %s", what, why)
            raise OSError(errno.EIO, f"{what}: {why}")
        log.debug("%s: %s; retrying in %.2fs", what, why, backoff)
        time.sleep(backoff)  # backoff between attempts, not synchronisation
        backoff = min(backoff * 2, MAX_BACKOFF)
