"""The on-disk state of a persistent copy-on-write overlay: the overlay file and its block map.

Why: a clone's writes must survive a restart of its server (a rescheduled pod), or the clone
silently falls back to its base. ``PATH`` holds the overlay data (sparse, export-sized);
``PATH.map`` holds a header and one byte per block saying whether the block lives in the
overlay. The header carries the overlay's own random id, from which, with the base's identity,
the clone's export identity is derived: a new overlay or a different base is different data.

Ordering: a block's data is written to the overlay before its map byte (both with pwrite), so a
killed process (the page cache survives it) never finds a block marked whose data is missing.
FLUSH and FUA fsync the overlay, then the map. After a power loss, writes since the last flush
may be lost, as with any disk; a block whose copy-up was not yet flushed may then read as
zeroes in its unwritten part, the one gap compared with a plain file export (documented).

It must not: touch the base, or accept a map made for another size or block size (the export's
data would be misread); both are refused with ``ValueError`` naming the path.
"""

from __future__ import annotations

import os
import struct
import uuid

from nbdserver.backends.identity import digest

MAGIC = b"KNBDCOW1"
_HEADER = struct.Struct(">8sQI32s")  # magic, export size, block size, overlay id (hex)
HEADER_SIZE = 64


class PersistentMap:
    """Opens (or creates) ``path`` and ``path.map``; exposes the overlay fd and presence map."""

    def __init__(self, path: str, size: int, block: int) -> None:
        self.path = path
        nblocks = (size + block - 1) // block
        self.present = bytearray(nblocks)
        map_path = path + ".map"
        if not os.path.exists(map_path):
            self._create(path, map_path, size, block)
        self.map_fd = os.open(map_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.overlay_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except BaseException:
            os.close(self.map_fd)
            raise
        try:
            self.overlay_id = self._load(map_path, size, block)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create(path: str, map_path: str, size: int, block: int) -> None:
        """A new, empty overlay; the map appears last (atomically), so a crash in between
        leaves no map and the next start begins afresh."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        header = _HEADER.pack(MAGIC, size, block, uuid.uuid4().hex.encode()).ljust(HEADER_SIZE)
        tmp = map_path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, HEADER_SIZE + (size + block - 1) // block)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, map_path)
        dfd = os.open(os.path.dirname(os.path.abspath(map_path)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _load(self, map_path: str, size: int, block: int) -> str:
        header = os.pread(self.map_fd, HEADER_SIZE, 0)
        if len(header) != HEADER_SIZE or header[:8] != MAGIC:
            raise ValueError(f"{map_path}: not a copy-on-write map")
        _, got_size, got_block, ident = _HEADER.unpack_from(header)
        if (got_size, got_block) != (size, block):
            raise ValueError(
                f"{map_path}: overlay made for {got_size} bytes in {got_block}-byte blocks, "
                f"the base now has {size} bytes in {block}-byte blocks"
            )
        raw = os.pread(self.map_fd, len(self.present), HEADER_SIZE)
        if len(raw) != len(self.present):
            raise ValueError(f"{map_path}: truncated copy-on-write map")
        self.present[:] = raw
        return str(ident.decode("ascii"))

    def identity(self, base_identity: str) -> str:
        return digest("cow", self.overlay_id, base_identity)

    def mark(self, first: int, last: int) -> None:
        """Record blocks first..last as living in the overlay (their data is already there)."""
        os.pwrite(self.map_fd, b"\x01" * (last - first + 1), HEADER_SIZE + first)

    def sync(self) -> None:
        os.fdatasync(self.overlay_fd)
        os.fdatasync(self.map_fd)

    def close(self) -> None:
        for fd in (getattr(self, "overlay_fd", -1), self.map_fd):
            if fd >= 0:
                os.close(fd)
        self.overlay_fd = self.map_fd = -1
