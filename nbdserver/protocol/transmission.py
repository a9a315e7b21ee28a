"""Transmission phase, sans I/O: validate each request once, and encode every kind of reply.

Why: nbdkit's lesson (server/protocol.c, validate_request) is that backends stay small and safe
when one place checks range, read-only, flags, negotiated features and block-size limits before
any backend call. This module is that place, written for the hot path: validation is a handful
of integer comparisons against tables precomputed once per connection, and encoders return only
headers so the edge can ``sendmsg([header, data])`` without copying payloads.

Fatal vs. answered (what the edge must do):
- bad request magic -> ``wire.ProtocolError`` from ``RequestValidator.unpack``: hard disconnect
  (the stream can no longer be framed). ``header`` and ``magic`` are the one definition of
  request framing; the edge's batch loop unpacks with exactly these two;
- a payload longer than ``skip_limit`` -> ``ProtocolError`` from ``payload_length``: hard
  disconnect (cannot be skipped at a bounded cost);
- everything else -> ``validate`` returns an NBD errno: read (and discard) ``payload_length``
  bytes, then send the error reply; the connection carries on.

Order of checks in ``validate`` (the first failing one decides the errno):
1. unknown command -> EINVAL; DISC -> 0 always (it has no reply; the edge closes);
2. soft shutdown requested -> ESHUTDOWN;
3. write-type command on a read-only export -> EPERM; command not advertised or not negotiated
   (FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS without a meta context) -> EINVAL;
4. a flag unknown, not valid for the command, or not negotiated (FUA without SEND_FUA, DF without
   structured replies, FAST_ZERO without SEND_FAST_ZERO, REQ_ONE off BLOCK_STATUS, PAYLOAD_LEN
   in compact mode or off WRITE, WRITE without PAYLOAD_LEN in extended mode) -> EINVAL;
5. FLUSH with nonzero offset/length -> EINVAL; zero length on a ranged command -> EINVAL;
6. offset/length not multiples of the minimum block size -> EINVAL;
7. READ/WRITE longer than the maximum payload -> EINVAL (EOVERFLOW for a READ answered with
   structured replies, which the spec explicitly allows);
8. offset + length beyond the export -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise.

What this module must not do: no I/O, no backend calls, no per-request allocations beyond the
reply header bytes themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Protocol

from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Errno,
    ReplyType,
)
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.events import Negotiated

# Plain ints: IntEnum attribute lookups cost more than module globals on the hot path.
READ: Final = int(Command.NBD_CMD_READ)
WRITE: Final = int(Command.NBD_CMD_WRITE)
DISC: Final = int(Command.NBD_CMD_DISC)
FLUSH: Final = int(Command.NBD_CMD_FLUSH)
TRIM: Final = int(Command.NBD_CMD_TRIM)
CACHE: Final = int(Command.NBD_CMD_CACHE)
WRITE_ZEROES: Final = int(Command.NBD_CMD_WRITE_ZEROES)
BLOCK_STATUS: Final = int(Command.NBD_CMD_BLOCK_STATUS)
FUA: Final = int(CommandFlag.NBD_CMD_FLAG_FUA)
NO_HOLE: Final = int(CommandFlag.NBD_CMD_FLAG_NO_HOLE)
DF: Final = int(CommandFlag.NBD_CMD_FLAG_DF)
REQ_ONE: Final = int(CommandFlag.NBD_CMD_FLAG_REQ_ONE)
FAST_ZERO: Final = int(CommandFlag.NBD_CMD_FLAG_FAST_ZERO)
PAYLOAD_LEN: Final = int(CommandFlag.NBD_CMD_FLAG_PAYLOAD_LEN)
EPERM: Final = int(Errno.NBD_EPERM)
EINVAL: Final = int(Errno.NBD_EINVAL)
ENOSPC: Final = int(Errno.NBD_ENOSPC)
EOVERFLOW: Final = int(Errno.NBD_EOVERFLOW)
ESHUTDOWN: Final = int(Errno.NBD_ESHUTDOWN)
_NCOMMANDS: Final = BLOCK_STATUS + 1  # RESIZE (8) and above are unknown to this server
_DONE: Final = NBD_REPLY_FLAG_DONE
_MAX_EXTENTS: Final = 1 << 20  # the spec's SHOULD NOT exceed per chunk
DEFAULT_SKIP_LIMIT: Final = 1 << 25  # payloads up to 32 MiB are never treated as an attack


class RequestValidator:
    """Validates requests for one connection; build it from the ``Negotiated`` event.

    ``header_size`` and ``unpack`` tell the edge how to frame requests (compact or extended).
    Set ``shutting_down = True`` once a soft shutdown is requested: every later request except
    DISC is answered with ESHUTDOWN.
    """

    __slots__ = (
        "_big_read",
        "_extended",
        "_mask",
        "_max_payload",
        "_normal_table",
        "_shutdown_table",
        "_table",
        "header",
        "header_size",
        "magic",
        "size",
        "skip_limit",
    )

    def __init__(self, negotiated: Negotiated, *, skip_limit: int | None = None) -> None:
        export = negotiated.export
        tflags = negotiated.transmission_flags
        structured = negotiated.structured_replies
        extended = negotiated.extended_headers
        if export.minimum_block & (export.minimum_block - 1) or export.minimum_block < 1:
            raise ValueError("minimum block size must be a power of two")
        self.size = export.size
        self._mask = export.minimum_block - 1
        self._max_payload = export.maximum_payload
        self.skip_limit = max(skip_limit or DEFAULT_SKIP_LIMIT, export.maximum_payload)
        self._extended = extended
        # The request framing negotiated for this connection (the only one in the server).
        self.header = wire.EXTENDED_REQUEST if extended else wire.REQUEST
        self.magic = NBD_EXTENDED_REQUEST_MAGIC if extended else NBD_REQUEST_MAGIC
        self.header_size = self.header.size
        self._big_read = EOVERFLOW if structured else EINVAL

        fua = FUA if tflags & TF.NBD_FLAG_SEND_FUA else 0
        allowed = [fua] * _NCOMMANDS
        if structured and tflags & TF.NBD_FLAG_SEND_DF:
            allowed[READ] |= DF
        allowed[WRITE_ZEROES] |= NO_HOLE
        if tflags & TF.NBD_FLAG_SEND_FAST_ZERO:
            allowed[WRITE_ZEROES] |= FAST_ZERO
        allowed[BLOCK_STATUS] |= REQ_ONE
        required = [0] * _NCOMMANDS
        if extended:
            required[WRITE] = PAYLOAD_LEN

        ro = tflags & TF.NBD_FLAG_READ_ONLY
        avail = [0] * _NCOMMANDS
        for cmd in (WRITE, TRIM, WRITE_ZEROES):
            if ro:
                avail[cmd] = EPERM
        if not tflags & TF.NBD_FLAG_SEND_FLUSH:
            avail[FLUSH] = EINVAL
        if not tflags & TF.NBD_FLAG_SEND_TRIM and not ro:
            avail[TRIM] = EINVAL
        if not tflags & TF.NBD_FLAG_SEND_WRITE_ZEROES and not ro:
            avail[WRITE_ZEROES] = EINVAL
        if not tflags & TF.NBD_FLAG_SEND_CACHE:
            avail[CACHE] = EINVAL
        if not (structured and negotiated.meta_contexts):
            avail[BLOCK_STATUS] = EINVAL
        avail[DISC] = -1
        # bits of (flags XOR required) must all lie in (allowed minus required)
        self._normal_table = tuple(
            (avail[c], required[c], 0xFFFF & ~(allowed[c] & ~required[c]))
            for c in range(_NCOMMANDS)
        )
        self._shutdown_table = tuple(
            (-1 if c == DISC else ESHUTDOWN, 0, 0) for c in range(_NCOMMANDS)
        )
        self._table = self._normal_table

    def unpack(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, ...]:
        """Decode the request header at ``buf[pos:]`` without copying: (flags, command, cookie,
        offset, length). A bad magic raises ``wire.ProtocolError``: the stream is lost."""
        magic, flags, cmd, cookie, offset, length = self.header.unpack_from(buf, pos)
        if magic != self.magic:
            raise wire.ProtocolError(f"bad request magic 0x{magic:08x}")
        return flags, cmd, cookie, offset, length

    def payload_length(self, flags: int, cmd: int, length: int) -> int:
        """Bytes of payload that follow this header (to read, or to discard on error).

        Raises ``wire.ProtocolError`` when the payload is too large to skip: disconnect.
        """
        if self._extended:
            n = length if flags & PAYLOAD_LEN else 0
        else:
            n = length if cmd == WRITE else 0
        if n > self.skip_limit:
            raise wire.ProtocolError(f"payload of {n} bytes exceeds {self.skip_limit}")
        return n

    def validate(self, flags: int, cmd: int, offset: int, length: int) -> int:
        """Return 0 when the request may go to the backend, else the NBD errno to reply with."""
        if cmd >= _NCOMMANDS:
            return EINVAL
        # One row per command: (errno or DISC's -1, required flags, forbidden flag bits).
        err, req, bad = self._table[cmd]
        if err:
            return 0 if err < 0 else err  # DISC is never answered: the edge closes
        # One test covers both "unknown/unnegotiated flag" and "required flag missing".
        if (flags ^ req) & bad:
            return EINVAL
        if cmd == FLUSH:
            return EINVAL if offset or length else 0
        if not length or (offset | length) & self._mask:
            return EINVAL
        if length > self._max_payload and cmd <= WRITE:
            return self._big_read if cmd == READ else EINVAL
        if offset + length > self.size:
            return ENOSPC if cmd in (WRITE, WRITE_ZEROES) else EINVAL
        return 0

    @property
    def shutting_down(self) -> bool:
        return self._table is self._shutdown_table

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        """Once set, every request but DISC gets ESHUTDOWN (a table swap: free per request)."""
        self._table = self._shutdown_table if value else self._normal_table


class ExtentLike(Protocol):
    """Anything with ``length`` and ``flags`` (``nbdserver.backends.base.Extent`` fits)."""

    @property
    def length(self) -> int: ...

    @property
    def flags(self) -> int: ...


class ReplyEncoder:
    """Builds reply headers for one connection's negotiated reply style.

    Simple replies unless structured replies were negotiated; extended reply chunks when
    extended headers were. ``request_offset`` is needed only by extended replies (the spec
    says their header echoes the request offset); pass it always and the style stays hidden.
    """

    __slots__ = ("_ext", "_structured", "min_block")

    def __init__(self, structured: bool, extended: bool, min_block: int = 1) -> None:
        self._structured = structured or extended
        self._ext = extended
        self.min_block = min_block

    @classmethod
    def for_negotiated(cls, negotiated: Negotiated) -> ReplyEncoder:
        return cls(
            negotiated.structured_replies,
            negotiated.extended_headers,
            negotiated.export.minimum_block,
        )

    def ok(self, cookie: int, request_offset: int = 0) -> bytes:
        """Success without payload (everything but READ and BLOCK_STATUS)."""
        if self._ext:
            return wire.EXTENDED_REPLY.pack(
                NBD_EXTENDED_REPLY_MAGIC, _DONE, ReplyType.NBD_REPLY_TYPE_NONE, cookie,
                request_offset, 0,
            )  # fmt: skip
        return wire.SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie)

    def read(self, cookie: int, request_offset: int, length: int) -> bytes:
        """Header preceding exactly ``length`` bytes of data covering the whole request."""
        if self._ext:
            return wire.EXTENDED_OFFSET_DATA.pack(
                NBD_EXTENDED_REPLY_MAGIC, _DONE, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, cookie,
                request_offset, length + 8, request_offset,
            )  # fmt: skip
        if self._structured:
            return wire.STRUCTURED_OFFSET_DATA.pack(
                NBD_STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, cookie,
                length + 8, request_offset,
            )  # fmt: skip
        return wire.SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie)

    def error(self, cookie: int, errno: int, request_offset: int = 0, message: str = "") -> bytes:
        """A complete error reply (structured ERROR chunk when negotiated, as the spec prefers)."""
        if not self._structured:
            return wire.SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, errno, cookie)
        payload = wire.error_payload(errno, message)
        return self._chunk(cookie, request_offset, ReplyType.NBD_REPLY_TYPE_ERROR, True, payload)

    # --- chunked replies (structured or extended only) ----------------------------------------
    def data_chunk(
        self, cookie: int, request_offset: int, offset: int, length: int, done: bool
    ) -> bytes:
        """OFFSET_DATA header for ``length`` bytes at ``offset``; data follows separately."""
        self._need_structured()
        flags = _DONE if done else 0
        rtype = ReplyType.NBD_REPLY_TYPE_OFFSET_DATA
        if self._ext:
            return wire.EXTENDED_OFFSET_DATA.pack(
                NBD_EXTENDED_REPLY_MAGIC, flags, rtype, cookie, request_offset, length + 8, offset
            )
        return wire.STRUCTURED_OFFSET_DATA.pack(
            NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length + 8, offset
        )

    def hole_chunk(
        self, cookie: int, request_offset: int, offset: int, length: int, done: bool
    ) -> bytes:
        """A complete OFFSET_HOLE chunk: ``length`` zero bytes at ``offset`` (1..2^32-1)."""
        self._need_structured()
        flags = _DONE if done else 0
        rtype = ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE
        if self._ext:
            return wire.EXTENDED_OFFSET_HOLE.pack(
                NBD_EXTENDED_REPLY_MAGIC, flags, rtype, cookie, request_offset, 12, offset, length
            )
        return wire.STRUCTURED_OFFSET_HOLE.pack(
            NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, 12, offset, length
        )

    def done(self, cookie: int, request_offset: int = 0) -> bytes:
        """NBD_REPLY_TYPE_NONE with DONE: ends a chunked reply whose last chunk was not final."""
        self._need_structured()
        return self._chunk(cookie, request_offset, ReplyType.NBD_REPLY_TYPE_NONE, True, b"")

    def error_offset(
        self,
        cookie: int,
        request_offset: int,
        errno: int,
        offset: int,
        message: str = "",
        done: bool = True,
    ) -> bytes:
        self._need_structured()
        payload = wire.error_payload(errno, message) + wire.U64.pack(offset)
        rtype = ReplyType.NBD_REPLY_TYPE_ERROR_OFFSET
        return self._chunk(cookie, request_offset, rtype, done, payload)

    def block_status(
        self,
        cookie: int,
        request_offset: int,
        request_length: int,
        context_id: int,
        extents: Iterable[ExtentLike],
        req_one: bool,
        done: bool = True,
    ) -> bytes:
        """A complete status chunk for one context, trimmed to what the spec allows."""
        self._need_structured()
        fitted = self.fit_extents(extents, request_length, req_one)
        if self._ext:
            payload = wire.block_status_ext_payload(context_id, fitted)
            rtype = ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS_EXT
        else:
            payload = wire.block_status_payload(context_id, fitted)
            rtype = ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS
        return self._chunk(cookie, request_offset, rtype, done, payload)

    def fit_extents(
        self, extents: Iterable[ExtentLike], request_length: int, req_one: bool
    ) -> list[tuple[int, int]]:
        """Apply the descriptor rules: nonzero lengths, multiples of the minimum block (except a
        final tail), at most 32-bit lengths without extended headers, stop once the request is
        covered, exactly one descriptor not longer than the request with REQ_ONE, at most 2^20
        descriptors, at least one."""
        cap = (1 << 64) - 1 if self._ext else 0xFFFFFFFF
        cap -= cap % self.min_block
        out: list[tuple[int, int]] = []
        total = 0
        for ext in extents:
            n = min(ext.length, cap)
            if n <= 0:
                continue
            if req_one:
                out.append((min(n, request_length), ext.flags & 0xFFFFFFFF))
                break
            out.append((n, ext.flags & 0xFFFFFFFF))
            total += n
            if total >= request_length or len(out) >= _MAX_EXTENTS:
                break
        if not out:
            out.append((min(request_length, cap), 0))  # status 0 is always a safe answer
        return out

    def _need_structured(self) -> None:
        if not self._structured:
            raise RuntimeError("chunked replies need structured replies or extended headers")

    def _chunk(
        self, cookie: int, request_offset: int, rtype: int, done: bool, payload: bytes
    ) -> bytes:
        flags = _DONE if done else 0
        if self._ext:
            head = wire.EXTENDED_REPLY.pack(
                NBD_EXTENDED_REPLY_MAGIC, flags, rtype, cookie, request_offset, len(payload)
            )
        else:
            head = wire.STRUCTURED_REPLY.pack(
                NBD_STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, len(payload)
            )
        return head + payload
