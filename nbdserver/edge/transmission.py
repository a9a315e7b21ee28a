"""The transmission phase on one blocking socket: the server's hot path.

Why it looks like this: a Python server keeps up with C servers only by paying the interpreter
once per *batch* of requests rather than per byte or per syscall. Each pass receives as much as
the socket holds into one buffer, decodes every complete request in it, validates each one
(``protocol.transmission.RequestValidator``) before any backend call, runs it, and sends all
replies of the pass with one ``sendmsg`` (writev). Reads land in an arena and go out from there;
write payloads are written straight from the receive buffer. Both are lazily resident mappings
(``edge.sparse.buffer``); a request larger than them gets a buffer of its own, returned once it
is answered. Large reads of sparse ranges answer holes with OFFSET_HOLE chunks (``edge.sparse``).
The GIL is released in every syscall, so other connections run meanwhile.

Slow commands (FLUSH, TRIM, WRITE_ZEROES, CACHE) run on a small shared worker pool and reply
when done, so fast reads and writes pass them (out-of-order replies, as the spec allows).

Must not: parse handshake options, decide policy about exports, or map errors anywhere but
``nbdserver.errors``. Must not reply to a request twice or send anything after DISC.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Executor

from nbdserver.backends.base import Backend
from nbdserver.edge.failures import FAILURES
from nbdserver.edge.sparse import SPARSE_READ, Plan, buffer, hole_plan, release, sparse_reply
from nbdserver.errors import ConnectionClosed, ProtocolViolation
from nbdserver.exports import Export
from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    Command,
    CommandFlag,
)
from nbdserver.protocol.events import Negotiated
from nbdserver.protocol.transmission import ReplyEncoder, RequestValidator

log = logging.getLogger("nbdserver.transmission")

_READ = int(Command.NBD_CMD_READ)
_WRITE = int(Command.NBD_CMD_WRITE)
_DISC = int(Command.NBD_CMD_DISC)
_FLUSH = int(Command.NBD_CMD_FLUSH)
_TRIM = int(Command.NBD_CMD_TRIM)
_CACHE = int(Command.NBD_CMD_CACHE)
_ZERO = int(Command.NBD_CMD_WRITE_ZEROES)
_BLOCK_STATUS = int(Command.NBD_CMD_BLOCK_STATUS)
_FUA = int(CommandFlag.NBD_CMD_FLAG_FUA)
_NO_HOLE = int(CommandFlag.NBD_CMD_FLAG_NO_HOLE)
_FAST_ZERO = int(CommandFlag.NBD_CMD_FLAG_FAST_ZERO)
_REQ_ONE = int(CommandFlag.NBD_CMD_FLAG_REQ_ONE)
_DF = int(CommandFlag.NBD_CMD_FLAG_DF)
_EINVAL = 22

RECV_BUFFER = 4 * 1024 * 1024  # holds many small requests or a few large writes
RECV_CHUNK = 1024 * 1024 + 4096
SHUTDOWN_QUIET = 0.5  # seconds a stopping server waits for more requests (answered ESHUTDOWN)
READ_ARENA = 4 * 1024 * 1024  # read replies of one batch
IOV_LIMIT = 512  # stay well under IOV_MAX (1024) per sendmsg
EARLY_SEND = 256 * 1024  # reads at least this large are sent without waiting for the batch
COMPACT_AT = 1024 * 1024  # a small partial request past this point moves to the front


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Whether a recv would find data within ``timeout`` (TLS may hold decrypted bytes)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


class Transmission:
    """Serve requests on ``sock`` for ``export`` until DISC, EOF or a protocol violation."""

    def __init__(
        self,
        sock: socket.socket,
        export: Export,
        negotiated: Negotiated,
        *,
        pool: Executor,
        peer: str = "?",
        backend: Backend | None = None,
        wrap_replies: Callable[[ReplyEncoder], ReplyEncoder] | None = None,
    ) -> None:
        """``backend``: this connection's view of the export (its per-connection filters);
        ``wrap_replies``: a layer over the reply encoder (metrics count error replies)."""
        self.sock = sock
        self.export = export
        self.backend = export.backend if backend is None else backend
        self.extended = negotiated.extended_headers
        self.pool = pool
        self.peer = peer
        replies = ReplyEncoder.for_negotiated(negotiated)
        self.replies = replies if wrap_replies is None else wrap_replies(replies)
        self.validator = RequestValidator(negotiated)
        contexts = negotiated.meta_contexts
        self.meta_context_id: int | None = contexts[0][0] if contexts else None
        # SSL sockets have no sendmsg: join the buffers there (TLS copies them anyway).
        self._gather = not isinstance(sock, ssl.SSLSocket)
        self._send_lock = threading.Lock()
        self._inflight = 0  # requests handed to the pool and not yet answered
        self._answered = False  # a pool request was answered since the last idle check
        self._idle = threading.Condition(threading.Lock())
        self._broken: BaseException | None = None
        self._rbuf = buffer(RECV_BUFFER)
        self._arena = buffer(READ_ARENA)
        self.big_held = 0  # bytes of a large request's own buffer, while it runs
        structured = negotiated.structured_replies or negotiated.extended_headers
        self._sparse = structured and self.backend.can_extents
        self.requests = 0
        self.waiting = False  # blocked in recv with no request in progress
        # A plain attribute beside the validator's flag: the loop reads it on every pass, and
        # at queue depth 1 that is once per request (the validator's property cost 2-3%).
        self.stopping = False
        self._preload = b""

    def preload(self, data: bytes) -> None:
        """Requests the client pipelined behind its final handshake option."""
        if len(data) > len(self._rbuf):
            raise ProtocolViolation("too much data pipelined behind the handshake")
        self._preload = data

    def begin_shutdown(self) -> None:
        """Answer every request not yet started with ESHUTDOWN (the client then disconnects)."""
        self.validator.shutting_down = True
        self.stopping = True

    # --- sending --------------------------------------------------------------------------
    def _sendv(self, iov: list[bytes | memoryview]) -> None:
        """Send every buffer in ``iov`` (one writev when the socket takes it all)."""
        with self._send_lock:
            sock = self.sock
            if not self._gather:
                sock.sendall(b"".join(iov))
                return
            sent = sock.sendmsg(iov)
            total = sum(map(len, iov))
            while sent < total:
                # Partial write (full socket buffer, or a signal): drop what went out, retry.
                rest: list[bytes | memoryview] = []
                skip = sent
                for b in iov:
                    n = len(b)
                    if skip >= n:
                        skip -= n
                        continue
                    rest.append(memoryview(b)[skip:] if skip else b)
                    skip = 0
                iov = rest
                total -= sent
                sent = sock.sendmsg(iov)

    # --- the main loop ----------------------------------------------------------------------
    def run(self) -> str:
        """Serve until the client leaves; returns why (for the log)."""
        try:
            return self._loop()
        finally:
            self._wait_idle()
            # Unmap the buffers now rather than whenever the object goes (unless a traceback
            # still holds a view of them: then with it).
            release(self._rbuf)
            release(self._arena)

    def _loop(self) -> str:
        sock = self.sock
        buf = self._rbuf
        mv = memoryview(buf)
        cap = len(buf)
        ext = self.extended
        validator = self.validator
        # The validator's framing, unpacked inline (one call per request less than .unpack).
        unpack = validator.header.unpack_from
        hsize = validator.header_size
        magic_ok = validator.magic
        validate = validator.validate
        payload_length = validator.payload_length
        replies = self.replies
        ok_reply = replies.ok
        err_reply = replies.error
        read_reply = replies.read
        backend = self.backend
        pread = backend.pread
        pwrite = backend.pwrite
        arena = memoryview(self._arena)
        arena_cap = len(arena)
        sparse_min = SPARSE_READ if self._sparse else 1 << 62
        start = 0
        end = len(self._preload)
        buf[:end] = self._preload
        need_recv = not end
        while True:
            if self._broken is not None:
                raise ConnectionClosed(f"send failed: {self._broken}")
            if start == end:
                start = end = 0
            elif start and (cap - end < 65536 or (end > COMPACT_AT and end - start < 65536)):
                # Keep the partial request, move it to the front to make room (a small one
                # early, so connections of small requests touch only the buffer's first pages).
                mv[: end - start] = mv[start:end]
                end -= start
                start = 0
            if need_recv:
                # ``waiting`` is set before the shutdown flag is read: a concurrent
                # begin_shutdown either sees it (and wakes this recv) or is seen here.
                self.waiting = True
                # Stopping: later requests get ESHUTDOWN (the client should then disconnect);
                # a client with nothing more to send is let go after a short pause.
                if self.stopping and not _readable(sock, SHUTDOWN_QUIET):
                    n = 0
                else:
                    # At most RECV_CHUNK per call: payloads are written out while cache-hot.
                    try:
                        n = sock.recv_into(mv[end : end + RECV_CHUNK])
                    except (TimeoutError, BlockingIOError):
                        # The idle timeout fired. A command running on the pool (a slow FLUSH),
                        # or answered during this wait, is activity: wait again.
                        if end > start or not (self._inflight or self._answered):
                            raise
                        self._answered = False
                        continue
                self.waiting = False
                if not n:
                    if self.stopping:
                        return "server shutting down (requests received were answered)"
                    if end > start:
                        return f"client closed the connection mid-request ({end - start} bytes)"
                    return "client closed the connection without NBD_CMD_DISC"
                end += n
            need_recv = True
            iov: list[bytes | memoryview] = []
            apos = 0
            while end - start >= hsize:
                magic, flags, typ, cookie, offset, length = unpack(buf, start)
                if magic != magic_ok:
                    raise ProtocolViolation(f"bad request magic 0x{magic:08x}")
                # Payload framing first: an invalid request's payload is skipped, not parsed.
                if typ == _WRITE or ext:
                    try:
                        plen = payload_length(flags, typ, length)
                    except wire.ProtocolError as e:
                        raise ProtocolViolation(str(e)) from None
                    if end - start < hsize + plen:
                        if hsize + plen > cap:
                            self._big_payload(
                                mv[start + hsize : end], flags, typ, cookie, offset, length, plen
                            )
                            start = end = 0
                            continue
                        break  # wait for the rest of the payload
                else:
                    plen = 0
                self.requests += 1
                err = validate(flags, typ, offset, length)
                if typ == _READ:
                    start += hsize + plen
                    if err:
                        iov.append(err_reply(cookie, err, offset, "invalid read request"))
                        continue
                    # Holes are worth asking about only for large reads (one comparison else).
                    plan = None
                    if length >= sparse_min and not flags & _DF:
                        plan = hole_plan(backend, offset, length)
                    if length > arena_cap - apos:
                        if iov:
                            self._sendv(iov)
                            iov = []
                        apos = 0
                        if length > arena_cap:
                            self._read_big(cookie, offset, length, plan)
                            continue
                    data = arena[apos : apos + length]
                    apos += length
                    if plan is not None:
                        iov.extend(
                            sparse_reply(replies, backend, cookie, offset, data, plan, self._failed)
                        )
                    else:
                        try:
                            pread(data, offset)
                        except Exception as e:
                            code = self._failed(_READ, offset, length, e)
                            iov.append(err_reply(cookie, code, offset, str(e)))
                            continue
                        iov.append(read_reply(cookie, offset, length))
                        iov.append(data)
                    if length >= EARLY_SEND:
                        # A big read goes out at once and its arena space is reused for the
                        # next: the data is still in the CPU cache when the kernel copies it,
                        # and the client consumes it while the next one is read.
                        self._sendv(iov)
                        iov = []
                        apos = 0
                elif typ == _WRITE and not err:
                    data = mv[start + hsize : start + hsize + plen]
                    start += hsize + plen
                    try:
                        pwrite(data, offset, flags & _FUA != 0)
                    except Exception as e:
                        code = self._failed(_WRITE, offset, length, e)
                        iov.append(err_reply(cookie, code, offset, str(e)))
                        continue
                    iov.append(ok_reply(cookie, offset))
                elif typ == _DISC:
                    if iov:
                        self._sendv(iov)
                    return "client sent NBD_CMD_DISC"
                else:
                    start += hsize + plen
                    if err:
                        iov.append(err_reply(cookie, err, offset, "invalid request"))
                    elif typ == _BLOCK_STATUS:
                        # Cheap, and clients usually wait for it: answer inline.
                        iov.extend(self._slow(typ, flags, cookie, offset, length))
                    else:
                        self._submit(typ, flags, cookie, offset, length)
                if len(iov) >= IOV_LIMIT:
                    self._sendv(iov)
                    iov = []
                    apos = 0
            if iov:
                self._sendv(iov)

    # --- large requests ----------------------------------------------------------------------
    def _read_big(self, cookie: int, offset: int, length: int, plan: Plan | None) -> None:
        """A read larger than the arena, from a buffer that lives only for this request."""
        big = buffer(length)
        self.big_held = length
        data = memoryview(big)
        try:
            if plan is not None:
                self._sendv(
                    sparse_reply(self.replies, self.backend, cookie, offset, data, plan,
                                 self._failed)
                )  # fmt: skip
                return
            try:
                self.backend.pread(data, offset)
            except Exception as e:
                code = self._failed(_READ, offset, length, e)
                self._sendv([self.replies.error(cookie, code, offset, str(e))])
                return
            self._sendv([self.replies.read(cookie, offset, length), data])
        finally:
            data.release()
            release(big)
            self.big_held = 0

    def _big_payload(
        self, have: memoryview, flags: int, typ: int, cookie: int, offset: int, length: int,
        plen: int,
    ) -> None:  # fmt: skip
        """A request whose payload does not fit the receive buffer: collect it, then run it,
        in a buffer that lives only for this request."""
        big = buffer(plen)
        self.big_held = plen
        data = memoryview(big)
        try:
            got = len(have)
            data[:got] = have
            while got < plen:
                n = self.sock.recv_into(data[got:])
                if not n:
                    raise ConnectionClosed("client closed the connection mid-request")
                got += n
            self.requests += 1
            err = self.validator.validate(flags, typ, offset, length)
            if not err and typ == _WRITE:
                try:
                    self.backend.pwrite(data, offset, flags & _FUA != 0)
                except Exception as e:
                    err = self._failed(_WRITE, offset, length, e)
            elif not err:
                err = _EINVAL  # no other command carries a payload we understand
        finally:
            data.release()
            release(big)
            self.big_held = 0
        if err:
            self._sendv([self.replies.error(cookie, err, offset, "request failed")])
        else:
            self._sendv([self.replies.ok(cookie, offset)])

    # --- slow commands on the pool -----------------------------------------------------------
    def _submit(self, typ: int, flags: int, cookie: int, offset: int, length: int) -> None:
        with self._idle:
            self._inflight += 1
        self.pool.submit(self._run_slow, typ, flags, cookie, offset, length)

    def _slow(
        self, typ: int, flags: int, cookie: int, offset: int, length: int
    ) -> list[bytes | memoryview]:
        """Run a validated non-data command; return its reply."""
        replies = self.replies
        backend = self.backend
        try:
            fua = flags & _FUA != 0
            if typ == _FLUSH:
                backend.flush()
            elif typ == _TRIM:
                backend.trim(offset, length, fua)
            elif typ == _ZERO:
                backend.zero(offset, length, not flags & _NO_HOLE, bool(flags & _FAST_ZERO), fua)
            elif typ == _CACHE:
                backend.cache(offset, length)
            else:  # _BLOCK_STATUS: the validator let nothing else through
                assert self.meta_context_id is not None
                extents = backend.extents(offset, length)
                chunk = replies.block_status(
                    cookie, offset, length, self.meta_context_id, extents, bool(flags & _REQ_ONE)
                )
                return [chunk]
            return [replies.ok(cookie, offset)]
        except Exception as e:
            code = self._failed(typ, offset, length, e)
            return [replies.error(cookie, code, offset, str(e))]

    def _failed(self, typ: int, offset: int, length: int, exc: BaseException) -> int:
        """Log a request the backend failed (once, rate-limited); its NBD errno."""
        return FAILURES.report(self.export.name, self.peer, typ, offset, length, exc)

    def _run_slow(self, typ: int, flags: int, cookie: int, offset: int, length: int) -> None:
        try:
            self._sendv(self._slow(typ, flags, cookie, offset, length))
        except OSError as e:
            # The main loop notices on its next pass and ends the connection.
            self._broken = e
        finally:
            self._answered = True  # before the count drops: the idle check reads them in turn
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _wait_idle(self) -> None:
        """Every request handed to the pool has been answered (or failed to send)."""
        with self._idle:
            while self._inflight:
                self._idle.wait()
