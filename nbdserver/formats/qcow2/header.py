"""The qcow2 header and its extensions: parsed once at open, checked against the file's size.

What it must not do: read tables or data, or write anything (``Header.pack_*`` give the bytes;
the backend writes them).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
# incompatible_features bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_KNOWN_INCOMPAT = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
# header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
AUTOCLEAR_OFFSET = 88  # where a v3 header keeps autoclear_features
RT_OFFSET = 48  # refcount_table_offset (u64), then refcount_table_clusters (u32) at 56
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 28 bytes at 72
MAX_L1_ENTRIES = 32 * 1024 * 1024 // 8  # qemu's own bound on the L1 table
MAX_BACKING_NAME = 1023


class Qcow2Error(OSError):
    """A qcow2 image that cannot be opened or a request its metadata cannot serve: EIO with a
    message naming what is wrong (the core maps it to NBD_EIO; at open, to one config line)."""

    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(code, message)


@dataclass(frozen=True)
class Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    rt_offset: int
    rt_clusters: int
    nb_snapshots: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    compression_type: int = 0
    backing_name: str | None = None
    backing_format: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible & INCOMPAT_CORRUPT)

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)


def parse(head: bytes, file_size: int) -> Header:
    """The header in ``head`` (the image's first cluster, or as much as the file has)."""
    if len(head) < _V2.size or head[:4] != MAGIC:
        raise Qcow2Error("not a qcow2 image (no QFI\\xfb magic)")
    (_, version, backing_off, backing_len, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
     rt_clusters, nb_snap, _snap_off) = _V2.unpack_from(head)  # fmt: skip
    if version not in (2, 3):
        raise Qcow2Error(f"qcow2 version {version} is not supported (2 and 3 are)")
    if not 9 <= cluster_bits <= 21:
        raise Qcow2Error(f"cluster_bits {cluster_bits} outside 9..21 (512 B to 2 MiB)")
    cs = 1 << cluster_bits
    incompat = compat = autoclear = 0
    refcount_order, header_len, ctype = 4, 72, 0
    if version == 3:
        if len(head) < 104:
            raise Qcow2Error("qcow2 v3 header is shorter than 104 bytes")
        incompat, compat, autoclear, refcount_order, header_len = _V3.unpack_from(head, 72)
        if header_len < 104 or header_len > min(cs, len(head)):
            raise Qcow2Error(f"qcow2 header_length {header_len} is invalid")
        if header_len > 104:
            ctype = head[104]
    _check_features(incompat, ctype, crypt, refcount_order)
    if size >= 1 << 62:
        raise Qcow2Error(f"virtual size {size} is too large")
    _check_table("L1 table", l1_off, l1_size * 8, cs, file_size)
    l2_entries = cs // (16 if incompat & INCOMPAT_EXTL2 else 8)
    if l1_size > MAX_L1_ENTRIES or l1_size * l2_entries * cs < size:
        raise Qcow2Error(f"L1 table of {l1_size} entries does not fit the virtual size {size}")
    _check_table("refcount table", rt_off, rt_clusters * cs, cs, file_size)
    if rt_clusters == 0:
        raise Qcow2Error("refcount table has no clusters")
    backing = None
    if backing_off:
        if backing_len > MAX_BACKING_NAME or backing_off + backing_len > min(cs, len(head)):
            raise Qcow2Error("backing file name lies outside the header cluster")
        try:
            backing = head[backing_off : backing_off + backing_len].decode()
        except UnicodeDecodeError:
            raise Qcow2Error("backing file name is not UTF-8") from None
        if "\0" in backing or not backing:
            raise Qcow2Error("backing file name is empty or holds a NUL byte")
    exts = _extensions(head, header_len, backing_off or min(cs, len(head)))
    if EXT_DATA_FILE in exts or incompat & INCOMPAT_DATA_FILE:
        raise Qcow2Error("qcow2 images with an external data file are not supported")
    if EXT_CRYPTO in exts:
        raise Qcow2Error("encrypted qcow2 images are not supported")
    fmt = exts.get(EXT_BACKING_FORMAT)
    return Header(
        version, cluster_bits, size, l1_size, l1_off, rt_off, rt_clusters, nb_snap, incompat,
        compat, autoclear, refcount_order, ctype, backing,
        fmt.rstrip(b"\0").decode("ascii", "replace") if fmt is not None else None,
    )  # fmt: skip


def _check_features(incompat: int, ctype: int, crypt: int, refcount_order: int) -> None:
    if crypt:
        raise Qcow2Error("encrypted qcow2 images are not supported")
    unknown = incompat & ~_KNOWN_INCOMPAT
    if unknown:
        raise Qcow2Error(f"qcow2 image uses unknown incompatible features {unknown:#x}")
    if ctype not in (0, 1) or (ctype and not incompat & INCOMPAT_COMPRESSION):
        raise Qcow2Error(f"qcow2 compression type {ctype} is not supported (zlib 0, zstd 1)")
    if refcount_order > 6:
        raise Qcow2Error(f"refcount_order {refcount_order} is larger than 6")


def _check_table(what: str, offset: int, length: int, cs: int, file_size: int) -> None:
    if offset % cs:
        raise Qcow2Error(f"{what} offset {offset:#x} is not aligned to a cluster")
    if offset + length > file_size or (length and offset == 0):
        raise Qcow2Error(f"{what} at {offset:#x} (+{length}) lies past the end of the file")


def _extensions(head: bytes, start: int, end: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = start
    while pos + 8 <= end:
        kind, length = struct.unpack_from(">II", head, pos)
        if kind == EXT_END:
            return out
        if pos + 8 + length > end:
            raise Qcow2Error(f"header extension {kind:#x} runs past the header cluster")
        out[kind] = head[pos + 8 : pos + 8 + length]
        pos += 8 + (length + 7) // 8 * 8
    return out
