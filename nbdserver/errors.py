"""The server's exception tree and the one place where OS errors become NBD wire errors.

Backends raise ``OSError`` with an errno; the edge calls :func:`nbd_errno` to turn it into one
of the few values the spec allows on the wire. Nothing else in the server maps errors.
"""

from __future__ import annotations

import errno

from nbdserver.protocol.constants import Errno


class NBDServerError(Exception):
    """Base of every error the server raises on purpose."""


class ConfigError(NBDServerError):
    """Bad command line or export configuration: reported to the operator, never to a client."""


class RemoteUnavailable(ConfigError):
    """A remote image could not be reached at open for a reason that may pass (a 5xx, a reset,
    a timeout): ``serve`` refuses to start as for any ``ConfigError``; ``import`` retries it."""


class ConnectionClosed(NBDServerError):
    """The peer went away or the connection must end; ``reason`` goes to the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ProtocolViolation(ConnectionClosed):
    """The client broke the protocol in a way that leaves the stream unusable."""


_OS_TO_NBD: dict[int, Errno] = {
    errno.EPERM: Errno.NBD_EPERM,
    errno.EACCES: Errno.NBD_EPERM,
    errno.EROFS: Errno.NBD_EPERM,
    errno.EIO: Errno.NBD_EIO,
    errno.ENOMEM: Errno.NBD_ENOMEM,
    errno.EINVAL: Errno.NBD_EINVAL,
    errno.ENOSPC: Errno.NBD_ENOSPC,
    errno.EDQUOT: Errno.NBD_ENOSPC,
    errno.EFBIG: Errno.NBD_ENOSPC,
    errno.EOVERFLOW: Errno.NBD_EOVERFLOW,
    errno.ENOTSUP: Errno.NBD_ENOTSUP,
    errno.EOPNOTSUPP: Errno.NBD_ENOTSUP,
    errno.ESHUTDOWN: Errno.NBD_ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> int:
    """The NBD error for an exception raised while serving a request (EIO when unknown)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return int(_OS_TO_NBD.get(exc.errno, Errno.NBD_EIO))
    if isinstance(exc, MemoryError):
        return int(Errno.NBD_ENOMEM)
    return int(Errno.NBD_EIO)
