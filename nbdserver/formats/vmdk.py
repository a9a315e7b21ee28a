"""VMDK images, read-only: the hosted sparse extent in its two single-file kinds.

Why: VM disks ship as VMDK (``qemu-img convert -O vmdk``, OVA appliances). The two kinds that
hold the whole disk in one file are read here:

- ``monolithicSparse``: a header, an embedded text descriptor, a grain directory (GD) of sector
  offsets of grain tables (GT), each GT a run of sector offsets of grains (fixed-size data
  blocks). A GT entry of 0 is an unallocated grain, 1 a zeroed grain: both read as zeroes and
  are holes in block status.
- ``streamOptimized``: the same tables, but every grain is deflate-compressed (zlib) behind a
  12-byte grain marker (its LBA and compressed length); when the header's GD offset is "at the
  end" the real header is the footer, 1024 bytes before the end of the file.

Refused with the subformat named: descriptor files pointing at other extents (monolithicFlat,
twoGbMaxExtent*, vmfs*), VMFS sparse (COWD) extents, and delta disks with a parent.

Corrupt metadata raises ``ImageFormatError`` at open (header, descriptor, GD) or for the read
that touches it (a GT or grain past the end of the file, a grain that does not inflate).
Why no library: the one maintained reader on PyPI, libvmdk-python (libyal), is a C extension
(LGPL-3.0) that parses untrusted images in C inside the server and offers reads only, not the
grain allocation that block status needs; the structures needed here are few, read with
``struct`` and inflated with the standard ``zlib``.
Must not write the image or validate requests (the protocol core does).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from nbdserver.backends.base import Backend, Extent
from nbdserver.backends.identity import digest
from nbdserver.formats._image import ImageFile, ImageFormatError, as_image, pread_exact
from nbdserver.lru import BoundedCache
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO

SECTOR = 512
MAGIC = 0x564D444B  # "KDMV" on disk
_HEADER = struct.Struct("<IIIQQQQIQQQB4sH")
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_FLAG_COMPRESSED = 1 << 16
_FLAG_MARKERS = 1 << 17
_COMPRESSION_DEFLATE = 1
_GTE_ZEROED = 1
_GRAIN_MARKER = struct.Struct("<QI")
_HOLE = NBD_STATE_HOLE | NBD_STATE_ZERO
_SUPPORTED = ("monolithicSparse", "streamOptimized")
# Bounds that keep a hostile header from making us allocate or read without limit.
_MAX_GRAIN_SECTORS = 1 << 16  # 32 MiB grains
_MAX_GTES = 1 << 16
_MAX_GD_BYTES = 64 << 20
_MAX_DESCRIPTOR_BYTES = 1 << 20
# One block status reply looks at most this many grains (the client asks again from its end).
_STATUS_GRAINS = 1 << 16
_GT_CACHE = 256
_GRAIN_CACHE = 16


@dataclass(frozen=True)
class VmdkHeader:
    version: int
    flags: int
    capacity: int  # sectors
    grain_sectors: int
    descriptor_offset: int
    descriptor_size: int
    gtes_per_gt: int
    gd_offset: int
    compression: int

    @classmethod
    def parse(cls, raw: bytes) -> VmdkHeader:
        fields = _HEADER.unpack_from(raw)
        if fields[0] != MAGIC:
            raise ImageFormatError("not a VMDK sparse extent (bad magic)")
        return cls(
            version=fields[1],
            flags=fields[2],
            capacity=fields[3],
            grain_sectors=fields[4],
            descriptor_offset=fields[5],
            descriptor_size=fields[6],
            gtes_per_gt=fields[7],
            gd_offset=fields[9],
            compression=fields[13],
        )

    def check(self, file_size: int) -> None:
        if self.version not in (1, 2, 3):
            raise ImageFormatError(f"VMDK version {self.version} is not supported")
        gs = self.grain_sectors
        if gs < 1 or gs > _MAX_GRAIN_SECTORS or gs & (gs - 1):
            raise ImageFormatError(f"VMDK grain size of {gs} sectors is invalid")
        if not 1 <= self.gtes_per_gt <= _MAX_GTES:
            raise ImageFormatError(f"VMDK has {self.gtes_per_gt} entries per grain table")
        if self.capacity < 1 or self.capacity > (1 << 53):
            raise ImageFormatError(f"VMDK capacity of {self.capacity} sectors is invalid")
        if self.flags & _FLAG_COMPRESSED and self.compression != _COMPRESSION_DEFLATE:
            raise ImageFormatError(f"VMDK compression algorithm {self.compression} is unknown")
        if self.gd_offset == 0 or self.gd_offset * SECTOR >= file_size:
            raise ImageFormatError("VMDK grain directory lies outside the file")


def descriptor_create_type(text: str) -> str:
    """The ``createType`` a descriptor declares ("" when it declares none)."""
    found = re.search(r'^\s*createType\s*=\s*"([^"]*)"', text, re.MULTILINE)
    return found.group(1) if found else ""


def _check_descriptor(text: str) -> None:
    create_type = descriptor_create_type(text)
    if create_type not in _SUPPORTED:
        raise ImageFormatError(
            f"VMDK subformat {create_type or '(none declared)'!r} is not supported "
            f"(only {', '.join(_SUPPORTED)}; convert with qemu-img convert -O vmdk "
            "-o subformat=monolithicSparse)"
        )
    parent = re.search(r'^\s*parentCID\s*=\s*"?([0-9a-fA-F]+)', text, re.MULTILINE)
    if parent and parent.group(1).lower() != "ffffffff":
        raise ImageFormatError("VMDK delta disks (with a parent) are not supported")
    extents = re.findall(r"^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+(\S+)", text, re.MULTILINE)
    if len(extents) != 1 or extents[0] != "SPARSE":
        raise ImageFormatError(f"VMDK {create_type} with extents {extents} is not supported")


class VmdkBackend(Backend):
    """A monolithicSparse or streamOptimized VMDK file, read-only."""

    can_extents = True
    can_multi_conn = True

    def __init__(self, source: str | ImageFile) -> None:
        """``source``: a path, or an ``ImageFile`` over any backend (closed with this)."""
        self._img = as_image(source)
        try:
            self._open()
        except BaseException:
            self._img.close()
            raise

    def _open(self) -> None:
        file_size = self._img.size()
        first = self._img.read(SECTOR, 0)
        if first[:4] == b"COWD":
            raise ImageFormatError("VMDK subformat 'vmfsSparse' (COWD) is not supported")
        if first[:4] != b"KDMV":
            text = first.decode("latin-1")
            kind = descriptor_create_type(text)
            raise ImageFormatError(
                f"VMDK subformat {kind or 'unknown'!r} (a descriptor file with separate "
                "extents) is not supported; only monolithicSparse and streamOptimized"
            )
        if len(first) < SECTOR:
            raise ImageFormatError("VMDK header is cut short")
        header = VmdkHeader.parse(first)
        self._read_descriptor(header, file_size)
        if header.gd_offset == _GD_AT_END:
            header = VmdkHeader.parse(
                pread_exact(self._img, SECTOR, file_size - 2 * SECTOR, "footer")
            )
        header.check(file_size)
        self._header = header
        self._size = header.capacity * SECTOR
        self._grain = header.grain_sectors * SECTOR
        self._file_size = file_size
        grains = -(-header.capacity // header.grain_sectors)
        entries = -(-grains // header.gtes_per_gt)
        if entries * 4 > _MAX_GD_BYTES:
            raise ImageFormatError(f"VMDK grain directory of {entries} entries is too large")
        raw = pread_exact(self._img, entries * 4, header.gd_offset * SECTOR, "grain directory")
        self._gd = struct.unpack(f"<{entries}I", raw)
        self._compressed = bool(header.flags & _FLAG_COMPRESSED)
        self._markers = bool(header.flags & _FLAG_MARKERS)
        self._tables: BoundedCache[int, tuple[int, ...]] = BoundedCache(_GT_CACHE)
        self._grains: BoundedCache[int, bytes] = BoundedCache(_GRAIN_CACHE)
        self.identity = digest("vmdk", self._img.identity)

    def _read_descriptor(self, header: VmdkHeader, file_size: int) -> None:
        length = header.descriptor_size * SECTOR
        offset = header.descriptor_offset * SECTOR
        if not 0 < length <= _MAX_DESCRIPTOR_BYTES or offset + length > file_size:
            raise ImageFormatError("VMDK embedded descriptor is missing or outside the file")
        raw = pread_exact(self._img, length, offset, "descriptor")
        _check_descriptor(raw.split(b"\0", 1)[0].decode("latin-1"))

    def size(self) -> int:
        return self._size

    def close(self) -> None:
        self._img.close()

    # -- locating grains -------------------------------------------------------------------

    def _table(self, gd_index: int) -> tuple[int, ...]:
        def load() -> tuple[int, ...]:
            n = self._header.gtes_per_gt
            where = self._gd[gd_index] * SECTOR
            return struct.unpack(f"<{n}I", pread_exact(self._img, n * 4, where, "grain table"))

        return self._tables.get(gd_index, load)

    def _entry(self, grain: int) -> int:
        """The GT entry of ``grain``: 0 unallocated, 1 zeroed, else the grain's sector."""
        n = self._header.gtes_per_gt
        if self._gd[grain // n] == 0:
            return 0
        return self._table(grain // n)[grain % n]

    def _inflate(self, grain: int, sector: int) -> bytes:
        offset = sector * SECTOR
        if self._markers:
            lba, length = _GRAIN_MARKER.unpack(
                pread_exact(self._img, _GRAIN_MARKER.size, offset, "grain marker")
            )
            if lba != grain * self._header.grain_sectors:
                raise ImageFormatError(f"VMDK grain marker at sector {sector} names LBA {lba}")
            offset += _GRAIN_MARKER.size
        else:
            length = min(2 * self._grain + 1024, self._file_size - offset)
        if length > 2 * self._grain + 1024:
            raise ImageFormatError(f"VMDK compressed grain of {length} bytes is too large")
        data = pread_exact(self._img, length, offset, "compressed grain")
        try:
            inflater = zlib.decompressobj()
            out = inflater.decompress(data, self._grain)
        except zlib.error as exc:
            raise ImageFormatError(
                f"VMDK grain at sector {sector} does not inflate: {exc}"
            ) from None
        return out + bytes(self._grain - len(out))

    def _grain_bytes(self, grain: int, sector: int) -> bytes:
        return self._grains.get(grain, lambda: self._inflate(grain, sector))

    # -- the Backend interface -------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            grain, within = divmod(offset + done, self._grain)
            n = min(len(buf) - done, self._grain - within)
            sector = self._entry(grain)
            target = buf[done : done + n]
            if sector in (0, _GTE_ZEROED):
                target[:] = bytes(n)
            elif self._compressed:
                target[:] = self._grain_bytes(grain, sector)[within : within + n]
            else:
                target[:] = pread_exact(self._img, n, sector * SECTOR + within, "grain")
            done += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = min(offset + length, offset + _STATUS_GRAINS * self._grain)
        while offset < end and len(out) < 1024:
            grain, within = divmod(offset, self._grain)
            n = min(end - offset, self._grain - within)
            flags = _HOLE if self._entry(grain) in (0, _GTE_ZEROED) else 0
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].length + n, flags)
            else:
                out.append(Extent(n, flags))
            offset += n
        return out
