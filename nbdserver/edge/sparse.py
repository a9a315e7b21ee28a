"""Read replies that skip holes, and the edge's buffers: what a read costs beyond the hot path.

Why: a large read of a sparse image would otherwise send every unallocated byte as zero data.
When structured replies are negotiated and the backend reports extents (SEEK_DATA/SEEK_HOLE on
files, absent pages in memory), a read of ``SPARSE_READ`` bytes or more asks for the extents
first and answers wholly unallocated runs with NBD_REPLY_TYPE_OFFSET_HOLE chunks and the rest
with OFFSET_DATA chunks. Small reads never ask (the 4 KiB hot path pays one comparison), and a
read with NBD_CMD_FLAG_DF (the client wants one chunk) never gets here.

Buffers: ``buffer`` maps anonymous memory whose pages become resident only when touched and go
back to the kernel on ``release`` (a bytearray is zero-filled at once, and a large freed one
raises glibc's mmap threshold so later ones stay in the heap), so a connection costs what its
requests use, and a request larger than the connection's buffers gets memory of its own that
is returned as soon as it is answered.

Must not: send anything (the edge does), map errors other than through ``nbdserver.errors``,
or report a range as a hole unless the backend says it is unallocated *and* reads as zeroes.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable

from nbdserver.backends.base import Backend
from nbdserver.errors import nbd_errno
from nbdserver.protocol.constants import NBD_STATE_HOLE, NBD_STATE_ZERO, Command
from nbdserver.protocol.transmission import ReplyEncoder

SPARSE_READ = 64 * 1024  # reads at least this large ask the backend for holes
SPARSE_CHUNKS = 64  # a read more fragmented than this goes out as plain data
_HOLE_ZERO = int(NBD_STATE_HOLE | NBD_STATE_ZERO)
_READ = int(Command.NBD_CMD_READ)

Plan = list[tuple[int, int, bool]]  # (offset, length, is_hole) runs covering one read


def buffer(size: int) -> mmap.mmap:
    """Anonymous private memory of ``size`` bytes, resident only where touched."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def release(buf: mmap.mmap) -> None:
    """Give the pages back now (unless a view is still alive, e.g. in a traceback: then the
    mapping goes with the last view)."""
    with contextlib.suppress(BufferError):
        buf.close()


def hole_plan(backend: Backend, offset: int, length: int) -> Plan | None:
    """The runs of data and holes covering the read, or None when the read has no hole (or
    too many pieces to be worth chunking): then the plain data reply goes out."""
    try:
        extents = backend.extents(offset, length)
    except Exception:
        return None  # the read itself reports a genuine I/O error
    plan: Plan = []
    pos, end, holes = offset, offset + length, False
    for ext in extents:
        n = min(ext.length, end - pos)
        if n <= 0:
            break
        hole = ext.flags & _HOLE_ZERO == _HOLE_ZERO
        holes = holes or hole
        if plan and plan[-1][2] == hole:
            plan[-1] = (plan[-1][0], plan[-1][1] + n, hole)
        else:
            plan.append((pos, n, hole))
        pos += n
    if not holes or len(plan) > SPARSE_CHUNKS:
        return None
    if pos < end:  # the backend may stop short of the end: the rest is sent as data
        if plan[-1][2]:
            plan.append((pos, end - pos, False))
        else:
            plan[-1] = (plan[-1][0], plan[-1][1] + end - pos, False)
    return plan


def sparse_reply(
    replies: ReplyEncoder,
    backend: Backend,
    cookie: int,
    offset: int,
    data: memoryview,
    plan: Plan,
    failed: Callable[[int, int, int, BaseException], int] | None = None,
) -> list[bytes | memoryview]:
    """OFFSET_HOLE chunks for the holes and OFFSET_DATA chunks, read into ``data`` (the whole
    request's room), between them; the last chunk carries DONE. Nothing is returned until
    every read succeeded, so a failure is one clean error reply (``failed(command, offset,
    length, exc)`` logs it and gives its errno)."""
    out: list[bytes | memoryview] = []
    last = len(plan) - 1
    try:
        for i, (pos, n, hole) in enumerate(plan):
            if hole:
                out.append(replies.hole_chunk(cookie, offset, pos, n, i == last))
                continue
            piece = data[pos - offset : pos - offset + n]
            backend.pread(piece, pos)
            out.append(replies.data_chunk(cookie, offset, pos, n, i == last))
            out.append(piece)
    except Exception as e:
        code = nbd_errno(e) if failed is None else failed(_READ, offset, len(data), e)
        return [replies.error(cookie, code, offset, str(e))]
    return out
