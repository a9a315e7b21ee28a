"""xz-compressed images, read-only and seekable through the block index (as nbdkit's xz filter).

Why: images ship compressed; ``xz --block-size=16MiB`` writes independent blocks and an index of
their sizes, so any byte of the disk is one block's decompression away. How it is read:

- from the end of the file, each stream's footer (12 bytes) gives the size of its index; the
  index lists every block's unpadded and uncompressed size; the stream header sits before the
  blocks. Streams may be concatenated, with stream padding (multiples of 4 zero bytes) between;
- a read maps its uncompressed offset to a block (bisect over the blocks' starting offsets) and
  decompresses just that block: the block's bytes are framed as a one-block xz stream (the
  original stream header, the block, an index of one record, a footer) and handed to Python's
  ``lzma``, which checks the block header CRC and the block's own check as it decodes;
- a few decompressed blocks are kept (a bounded LRU cache).

Refused: a block whose uncompressed size exceeds ``max_block`` (an xz made without
``--block-size`` is one huge block: every read would decompress the whole image), with advice to
recompress. A corrupt index refuses the open; a corrupt block fails the reads that touch it with
``ImageFormatError`` (EIO to the client). Must not write the image nor validate requests.
"""

from __future__ import annotations

import bisect
import lzma
import struct
import zlib
from dataclasses import dataclass

from nbdserver.backends.base import Backend
from nbdserver.backends.identity import digest
from nbdserver.formats._image import ImageFile, ImageFormatError, as_image, pread_exact
from nbdserver.lru import BoundedCache

HEADER_MAGIC = b"\xfd7zXZ\x00"
FOOTER_MAGIC = b"YZ"
_STREAM_HEADER = 12
_STREAM_FOOTER = 12
_MAX_INDEX = 64 << 20
DEFAULT_MAX_BLOCK = 64 << 20
DEFAULT_CACHE_BLOCKS = 4
ADVICE = "recompress it with independent blocks: xz --block-size=16MiB"


@dataclass(frozen=True)
class Block:
    """One xz block: where its data starts on disk and in the disk it describes."""

    data_offset: int  # uncompressed offset of its first byte
    data_size: int
    file_offset: int
    unpadded_size: int
    stream_flags: bytes


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def check_size(flags: bytes) -> int:
    check = flags[1] & 0x0F
    return 0 if check == 0 else 4 << ((check - 1) // 3)


def read_vli(data: bytes, pos: int) -> tuple[int, int]:
    """A variable-length integer at ``pos``: its value and the position after it."""
    value = 0
    for i in range(9):
        if pos + i >= len(data):
            break
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ImageFormatError("xz index has a non-minimal integer")
            return value, pos + i + 1
    raise ImageFormatError("xz index has a malformed integer")


def _crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def _encode_vli(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def parse_index(raw: bytes) -> list[tuple[int, int]]:
    """The (unpadded size, uncompressed size) records of an index (its CRC checked)."""
    if len(raw) < 8 or raw[0] != 0 or _crc(raw[:-4]) != raw[-4:]:
        raise ImageFormatError("xz index is corrupt (indicator or CRC32)")
    count, pos = read_vli(raw, 1)
    if count > len(raw):
        raise ImageFormatError("xz index claims more records than it holds")
    records = []
    for _ in range(count):
        unpadded, pos = read_vli(raw, pos)
        uncompressed, pos = read_vli(raw, pos)
        if unpadded < 5:
            raise ImageFormatError("xz index has a block smaller than its header")
        records.append((unpadded, uncompressed))
    if _pad4(pos) != len(raw) - 4 or any(raw[pos:-4]):
        raise ImageFormatError("xz index has bad padding")
    return records


class XzBackend(Backend):
    """An xz file (one or more streams of independent blocks), read-only."""

    can_multi_conn = True

    def __init__(
        self,
        source: str | ImageFile,
        max_block: int = DEFAULT_MAX_BLOCK,
        cache_blocks: int = DEFAULT_CACHE_BLOCKS,
    ) -> None:
        """``source``: a path, or an ``ImageFile`` over any backend (closed with this)."""
        self._img = as_image(source)
        path = self._img.name
        try:
            self._blocks = self._read_streams(self._img.size())
            biggest = max((b.data_size for b in self._blocks), default=0)
            if biggest > max_block:
                raise ImageFormatError(
                    f"{path}: an xz block of {biggest} bytes exceeds the limit of {max_block} "
                    f"(an xz made without --block-size is one block); {ADVICE}"
                )
            self._starts = [b.data_offset for b in self._blocks]
            last = self._blocks[-1] if self._blocks else None
            self._size = last.data_offset + last.data_size if last else 0
            self._cache: BoundedCache[int, bytes] = BoundedCache(cache_blocks)
            self.identity = digest("xz", self._img.identity)
        except BaseException:
            self._img.close()
            raise

    # -- the index -------------------------------------------------------------------------

    def _read_streams(self, end: int) -> list[Block]:
        streams: list[list[tuple[int, int, int, bytes]]] = []
        while end > 0:
            end = self._skip_padding(end)
            if end == 0:
                break
            start, blocks = self._read_stream(end)
            streams.append(blocks)
            end = start
        out: list[Block] = []
        offset = 0
        for blocks in reversed(streams):
            for file_offset, unpadded, size, flags in blocks:
                if size:
                    out.append(Block(offset, size, file_offset, unpadded, flags))
                offset += size
        return out

    def _skip_padding(self, end: int) -> int:
        while end >= 4 and pread_exact(self._img, 4, end - 4, "stream padding") == bytes(4):
            end -= 4
        if end % 4:
            raise ImageFormatError("xz file size is not a multiple of four")
        return end

    def _read_stream(self, end: int) -> tuple[int, list[tuple[int, int, int, bytes]]]:
        """The stream ending at ``end``: its start and its blocks (file offset, unpadded size,
        uncompressed size, stream flags)."""
        footer = pread_exact(self._img, _STREAM_FOOTER, end - _STREAM_FOOTER, "stream footer")
        if footer[10:] != FOOTER_MAGIC or _crc(footer[4:10]) != footer[:4]:
            raise ImageFormatError("not an xz file (stream footer is missing or corrupt)")
        flags = footer[8:10]
        index_size = (struct.unpack_from("<I", footer, 4)[0] + 1) * 4
        index_at = end - _STREAM_FOOTER - index_size
        if index_size > _MAX_INDEX or index_at < _STREAM_HEADER:
            raise ImageFormatError("xz index is larger than the file")
        records = parse_index(pread_exact(self._img, index_size, index_at, "index"))
        blocks_size = sum(_pad4(unpadded) for unpadded, _ in records)
        start = index_at - blocks_size - _STREAM_HEADER
        if start < 0:
            raise ImageFormatError("xz blocks listed in the index do not fit in the file")
        header = pread_exact(self._img, _STREAM_HEADER, start, "stream header")
        if header[:6] != HEADER_MAGIC or header[6:8] != flags or _crc(flags) != header[8:]:
            raise ImageFormatError("xz stream header is missing or disagrees with its footer")
        blocks, pos = [], start + _STREAM_HEADER
        for unpadded, size in records:
            blocks.append((pos, unpadded, size, flags))
            pos += _pad4(unpadded)
        return start, blocks

    # -- blocks ----------------------------------------------------------------------------

    def _decompress(self, block: Block) -> bytes:
        """The block framed as a one-block stream, decoded (header CRC and check verified)."""
        raw = pread_exact(self._img, _pad4(block.unpadded_size), block.file_offset, "xz block")
        index = b"\0" + _encode_vli(1)
        index += _encode_vli(block.unpadded_size) + _encode_vli(block.data_size)
        index += bytes(_pad4(len(index)) - len(index))
        index += _crc(index)
        backward = struct.pack("<I", len(index) // 4 - 1) + block.stream_flags
        stream = (
            HEADER_MAGIC
            + block.stream_flags
            + _crc(block.stream_flags)
            + raw
            + index
            + _crc(backward)
            + backward
            + FOOTER_MAGIC
        )
        try:
            decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            data = decoder.decompress(stream, max_length=block.data_size + 1)
        except lzma.LZMAError as exc:
            raise ImageFormatError(f"xz block at byte {block.file_offset}: {exc}") from None
        if len(data) != block.data_size or not decoder.eof:
            raise ImageFormatError(
                f"xz block at byte {block.file_offset} holds {len(data)} bytes, "
                f"its index says {block.data_size}"
            )
        return data

    def _block_data(self, number: int) -> bytes:
        return self._cache.get(number, lambda: self._decompress(self._blocks[number]))

    # -- the Backend interface -------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            number = bisect.bisect_right(self._starts, offset + done) - 1
            block = self._blocks[number]
            within = offset + done - block.data_offset
            n = min(len(buf) - done, block.data_size - within)
            buf[done : done + n] = self._block_data(number)[within : within + n]
            done += n

    def close(self) -> None:
        self._img.close()
