"""Export identities: a short string that changes exactly when an export's data may differ from
what its clients saw, so a client that reconnects can tell "same data" from "same name".

Why: a memory export or a private overlay comes back empty after a restart under the same name
and size; only an identity tells a reconnecting client (the node agent) that it must not carry
on. Kinds and their lifetime:

- ``mem-``/``cow-`` + random: new per process (memory, non-persistent overlays);
- ``file-`` + random, kept in the image's extended attribute ``user.kube-nbd.identity``: stays
  with the inode across restarts, moves, node changes and PVC re-mounts, and a replaced or copied
  image (new inode, no attribute) gets a new one. Where the filesystem has no user xattrs, a
  sidecar ``.<image>.kube-nbd-id`` beside the image holds it, bound to the image's inode number;
- ``ro-`` + hash of inode number, size and modification time: a read-only export whose image
  carries no identity (it must not write its image); any change to the file changes it;
- ``blk-`` + hash of the device's WWID/serial (or major:minor) and size: a block device.

Identities are derived from no data content (that would need a read of everything).
This module must not decide policy on mismatches: clients do.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import uuid

log = logging.getLogger("nbdserver.identity")

XATTR = "user.kube-nbd.identity"
_NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.EROFS)


def new_identity(kind: str) -> str:
    """A fresh identity for data that lives only as long as this process."""
    return f"{kind}-{uuid.uuid4().hex}"


def digest(kind: str, *parts: object) -> str:
    text = "\0".join(str(p) for p in parts)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _sidecar(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.kube-nbd-id")


def _read_xattr(fd: int) -> str | None:
    try:
        return os.getxattr(fd, XATTR).decode("ascii")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, *_NO_XATTR):
            return None
        raise


def _read_sidecar(path: str, inode: int) -> str | None:
    try:
        with open(_sidecar(path), encoding="ascii") as f:
            value, _, ino = f.read().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return None
    return value if ino == str(inode) else None  # a sidecar of a replaced image is stale


def _write_sidecar(path: str, inode: int, value: str) -> bool:
    tmp = _sidecar(path) + ".tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{value} {inode}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _sidecar(path))
    except OSError:
        return False
    return True


def file_identity(fd: int, path: str, read_only: bool) -> str:
    """The identity of an image file opened as ``fd`` (see the module docstring)."""
    st = os.fstat(fd)
    found = _read_xattr(fd) or _read_sidecar(path, st.st_ino)
    if found is not None:
        return found
    if read_only:
        return digest("ro", st.st_ino, st.st_size, st.st_mtime_ns)
    value = new_identity("file")
    try:
        os.setxattr(fd, XATTR, value.encode(), os.XATTR_CREATE)
        return value
    except FileExistsError:  # another server set it between our read and write
        return _read_xattr(fd) or value
    except OSError as exc:
        if exc.errno not in _NO_XATTR:
            raise
    if _write_sidecar(path, st.st_ino, value):
        return value
    log.warning("%s: no place to keep an identity; it changes with every restart", path)
    return value


def block_identity(fd: int, size: int) -> str:
    """A block device's identity: its hardware name where sysfs has one, else its numbers."""
    rdev = os.fstat(fd).st_rdev
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    name = number
    for leaf in ("device/wwid", "wwid", "device/serial", "serial"):
        try:
            with open(f"/sys/dev/block/{number}/{leaf}", encoding="utf-8") as f:
                name = f.read().strip() or name
            break
        except OSError:
            continue
    return digest("blk", name, size)
