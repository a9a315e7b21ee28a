"""What the format readers share: the error they raise, exact positional reads, a small cache.

Why: every reader must turn corrupt metadata into one clear error (at open or for the one
request that touches it) and must never read a short buffer as if it were whole.
Must not know any format's layout.
"""

from __future__ import annotations

import errno
import os
from typing import TypeVar

from nbdserver.errors import ConfigError

K = TypeVar("K")
V = TypeVar("V")


class ImageFormatError(ConfigError, OSError):
    """An image that is corrupt or of a kind this server refuses.

    A ``ConfigError`` when raised at open (the command line reports it in one line) and an
    ``OSError`` with ``EIO`` when raised for a request (the edge sends NBD_EIO; the server stays
    up).
    """

    def __init__(self, message: str) -> None:
        OSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset`` or an ``ImageFormatError`` naming ``what`` was cut short."""
    if offset < 0 or length < 0:
        raise ImageFormatError(f"{what} at a negative offset")
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise ImageFormatError(f"{what} at byte {offset} runs past the end of the file")
        data += more
    return data
