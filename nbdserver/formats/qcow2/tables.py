"""Guest cluster -> L2 entry: the L1 table in memory, L2 tables read on demand into a bounded
cache, entries decoded into kinds; and the decompression of compressed clusters.

What it must not do: allocate (``refcounts``) or serve requests (``backend``). Callers hold the
backend's lock around every call here.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections import OrderedDict

from nbdserver.formats._image import ImageFile
from nbdserver.formats.qcow2.header import Header, Qcow2Error

try:  # optional extra "zstd": refused clearly at open without it
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None  # type: ignore[assignment]

OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
# extended L2 entries: a second word with 32 "allocated" bits, then 32 "reads as zeroes" bits
ALL_ALLOCATED = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF << 32
_SWAP = struct.pack("=H", 1) != struct.pack(">H", 1)
_CACHE_BYTES = 32 * 1024 * 1024

# entry kinds
UNALLOCATED, ZERO, NORMAL, COMPRESSED_KIND = 0, 1, 2, 3


def be_array(raw: bytes) -> array[int]:
    table = array("Q")
    table.frombytes(raw)
    if _SWAP:
        table.byteswap()
    return table


class Tables:
    def __init__(self, image: ImageFile, header: Header, file_end: int) -> None:
        if header.compression_type == 1 and zstandard is None:
            raise Qcow2Error(
                "this qcow2 image uses zstd compression: install nbdserver's 'zstd' extra "
                "(the zstandard package)"
            )
        self._img = image
        self.h = header
        self.cs = header.cluster_size
        self.ext = header.extended_l2
        self.l2_bits = header.cluster_bits - (4 if self.ext else 3)
        self.l1 = be_array(_whole(image, header.l1_size * 8, header.l1_offset, "L1 table"))
        self.file_end = file_end  # the backend moves it as the file grows
        self._l2: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_max = max(16, _CACHE_BYTES // self.cs)
        self._unzipped: OrderedDict[int, bytes] = OrderedDict()

    def l2_table(self, l1_index: int) -> tuple[int, array[int] | None]:
        """The L2 table's host offset and entries for ``l1_index`` (0, None: unallocated)."""
        offset = self.l1[l1_index] & OFFSET_MASK
        if not offset:
            return 0, None
        table = self._l2.get(offset)
        if table is None:
            if offset % self.cs or offset + self.cs > self.file_end:
                raise Qcow2Error(f"L2 table at {offset:#x} lies past the end of the file")
            table = be_array(_whole(self._img, self.cs, offset, "L2 table"))
            self._l2[offset] = table
            if len(self._l2) > self._l2_max:
                self._l2.popitem(last=False)
        else:
            self._l2.move_to_end(offset)
        return offset, table

    def entry(self, cluster: int) -> tuple[int, int]:
        """The L2 entry of ``cluster`` and its subcluster bitmap (0 without extended L2)."""
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1):
            raise Qcow2Error(f"guest cluster {cluster} is beyond the L1 table")
        _, table = self.l2_table(l1_index)
        if table is None:
            return 0, 0
        slot = cluster & ((1 << self.l2_bits) - 1)
        return (table[2 * slot], table[2 * slot + 1]) if self.ext else (table[slot], 0)

    def kind(self, entry: int) -> int:
        """The cluster's kind; with extended L2 entries the bitmap refines it per subcluster."""
        if entry & COMPRESSED:
            return COMPRESSED_KIND
        if entry & ZERO_FLAG and self.h.version >= 3 and not self.ext:
            return ZERO
        if entry & OFFSET_MASK:
            host = entry & OFFSET_MASK
            # The file may end inside the last cluster (subclusters written, or preallocation
            # off): the rest reads as zeroes. A cluster that starts at or past the end is bad.
            if host % self.cs or host >= self.file_end:
                raise Qcow2Error(f"data cluster at {host:#x} lies past the end of the file")
            return NORMAL
        return UNALLOCATED

    def compressed_span(self, entry: int) -> tuple[int, int]:
        """Host offset and byte length of a compressed cluster's data."""
        x = 62 - (self.h.cluster_bits - 8)
        host = entry & ((1 << x) - 1)
        sectors = ((entry & ~COMPRESSED & ~COPIED) >> x) + 1
        return host, sectors * 512 - (host & 511)

    def decompress(self, entry: int) -> bytes:
        cached = self._unzipped.get(entry)
        if cached is not None:
            return cached
        host, length = self.compressed_span(entry)
        if host >= self.file_end:
            raise Qcow2Error(f"compressed cluster at {host:#x} lies past the end of the file")
        data = self._img.read(min(length, self.file_end - host), host)
        try:
            if self.h.compression_type == 1:
                out = zstandard.ZstdDecompressor().decompressobj().decompress(data)[: self.cs]
            else:
                out = zlib.decompressobj(-15).decompress(data, self.cs)
        except (zlib.error, Exception) as e:
            raise Qcow2Error(f"compressed cluster at {host:#x} does not decompress: {e}") from None
        if len(out) != self.cs:
            raise Qcow2Error(f"compressed cluster at {host:#x} decompresses to {len(out)} bytes")
        self._unzipped[entry] = out
        if len(self._unzipped) > 8:
            self._unzipped.popitem(last=False)
        return out

    def forget_l2(self, offset: int) -> None:
        self._l2.pop(offset, None)

    def cache_l2(self, offset: int, table: array[int]) -> None:
        self._l2[offset] = table


def _whole(image: ImageFile, length: int, offset: int, what: str) -> bytes:
    data = image.read(length, offset)
    if len(data) < length:
        raise Qcow2Error(f"{what} at {offset:#x} runs past the end of the file")
    return data
