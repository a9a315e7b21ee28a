"""One log line per request a backend failed: export, command, offset, length, peer and cause.

Why: an NBD client sees only an errno (EIO); the operator needs the cause (a remote that timed
out, a plugin's exception, a corrupt qcow2 table) and where it hit. A broken disk fails every
request, so lines are rate-limited per export: at most ``burst`` in any ``window`` seconds, and
the next line that gets through says how many were left out.

Must not: map errors itself (``nbdserver.errors.nbd_errno`` does) or log refusals the core
makes before a backend runs (invalid requests are the client's doing, answered without a line).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

from nbdserver.errors import nbd_errno
from nbdserver.protocol.constants import Command

log = logging.getLogger("nbdserver.requests")

# Expected answers rather than failures: a FAST_ZERO that cannot be fast, a stopping server.
_QUIET = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ESHUTDOWN})


def command_name(typ: int) -> str:
    try:
        return Command(typ).name.removeprefix("NBD_CMD_")
    except ValueError:
        return f"command {typ}"


def cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0, "")
        return f"{name}: {exc.strerror}" if name else exc.strerror
    return repr(exc)


class RequestFailures:
    """Logs failed requests, at most ``burst`` lines per export in any ``window`` seconds."""

    def __init__(
        self, window: float = 10.0, burst: int = 10, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self.burst = burst
        self._lock = threading.Lock()
        self._recent: dict[str, list[float]] = {}  # export -> times of lines in the window
        self._dropped: dict[str, int] = {}

    def report(self, export: str, peer: str, typ: int, offset: int, length: int,
               exc: BaseException) -> int:  # fmt: skip
        """Log the failure (unless rate-limited or expected); the NBD errno to answer."""
        code = nbd_errno(exc)
        if isinstance(exc, OSError) and exc.errno in _QUIET:
            return code
        now = self._clock()
        with self._lock:
            recent = [t for t in self._recent.get(export, ()) if now - t < self.window]
            if len(recent) >= self.burst:
                self._recent[export] = recent
                self._dropped[export] = self._dropped.get(export, 0) + 1
                return code
            recent.append(now)
            self._recent[export] = recent
            dropped = self._dropped.pop(export, 0)
        more = f" ({dropped} more failures not logged)" if dropped else ""
        log.error(
            "export %r: %s offset %d length %d from %s failed: %s%s",
            export, command_name(typ), offset, length, peer, cause(exc), more,
        )  # fmt: skip
        return code


FAILURES = RequestFailures()
