"""What the format readers share: the error they raise, the container file they read (a local
descriptor or any backend), and exact positional reads.

Why: every reader must turn corrupt metadata into one clear error (at open or for the one
request that touches it) and must never read a short buffer as if it were whole. Reading the
container through ``ImageFile`` lets one reader serve a local file, a block device, a URL, an
S3 object or a plugin's bytes alike; a local file keeps its descriptor (``os.preadv``, no layer
in between) because that is the hot path of every qcow2 read.
Must not know any format's layout.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TypeVar

from nbdserver.backends.base import Backend
from nbdserver.backends.identity import file_identity
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


class ImageFile:
    """The bytes of an image's container file. Reads past the end come back short (a qcow2
    file may end inside its last cluster); writes are for a local file only."""

    name: str
    writable: bool = False
    identity: str = ""
    local: bool = False  # a path on this host: backing files may be looked up next to it
    fd: int = -1

    def size(self) -> int:
        raise NotImplementedError

    def readinto(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; the bytes read (fewer only at the end of the file)."""
        raise NotImplementedError

    def read(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        got = self.readinto(memoryview(buf), offset)
        return bytes(buf[:got]) if got < length else bytes(buf)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise OSError(errno.EROFS, f"{self.name}: the image file is read-only here")

    def resize(self, size: int) -> None:
        """Make a regular file ``size`` bytes long (a device keeps its size)."""
        raise OSError(errno.EROFS, f"{self.name}: the image file is read-only here")

    def sync(self) -> None:
        """Everything written is on disk (data and metadata of the file)."""

    def datasync(self) -> None:
        self.sync()

    def close(self) -> None:
        pass


class LocalImage(ImageFile):
    """A file or block device on this host, through its own descriptor."""

    local = True

    def __init__(self, path: str, writable: bool) -> None:
        self.name = path
        self.writable = writable
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            self.identity = file_identity(self.fd, path, not writable)
        except BaseException:
            os.close(self.fd)
            raise

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)  # a block device's st_size is 0

    def readinto(self, view: memoryview, offset: int) -> int:
        n = len(view)
        got = os.preadv(self.fd, [view], offset)
        while 0 < got < n:
            more = os.preadv(self.fd, [view[got:]], offset + got)
            if more == 0:
                break
            got += more
        return got

    def read(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        while 0 < len(data) < length:
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def resize(self, size: int) -> None:
        if stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.ftruncate(self.fd, size)

    def sync(self) -> None:
        os.fsync(self.fd)

    def datasync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BackendImage(ImageFile):
    """An image file read through a backend (http, s3, a plugin, ...): read-only here, because
    a format that writes grows its file, which these cannot; its size is asked once."""

    def __init__(self, backend: Backend, name: str) -> None:
        self.name = name
        self._backend = backend
        self._size = backend.size()
        self.identity = backend.identity

    def size(self) -> int:
        return self._size

    def readinto(self, view: memoryview, offset: int) -> int:
        # The backend contract: every range lies inside its size, so clip (and come back
        # short at the end, as a file does).
        n = max(0, min(len(view), self._size - offset))
        if n:
            self._backend.pread(view[:n], offset)
        return n

    def close(self) -> None:
        self._backend.close()


def as_image(source: str | ImageFile, writable: bool = False) -> ImageFile:
    """``source`` as an ``ImageFile``: a path is opened as a local file."""
    return LocalImage(source, writable) if isinstance(source, str) else source


def pread_exact(image: ImageFile, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset`` or an ``ImageFormatError`` naming ``what`` was cut short."""
    if offset < 0 or length < 0:
        raise ImageFormatError(f"{what} at a negative offset")
    data = image.read(length, offset)
    if len(data) < length:
        raise ImageFormatError(f"{what} at byte {offset} runs past the end of the file")
    return data
