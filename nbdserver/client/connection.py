"""A negotiated connection: ownership of the socket, and one-request-at-a-time I/O helpers.

Why: the agent needs to ``detach()`` the socket for the kernel; tests and tools need a simple
way to read and write through a real handshake. This is not a performant client: one request
in flight, blocking, no retries.

What it must not do: negotiate (``negotiate`` does), or be used for the kernel's transmission.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from nbdserver.protocol import wire
from nbdserver.protocol.client_handshake import (
    ExportDetails,
    NBDProtocolError,
    NBDTLSError,
)
from nbdserver.protocol.constants import (
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Command,
    ReplyType,
)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except TimeoutError:
            raise NBDProtocolError("timed out waiting for the server") from None
        except ssl.SSLError as exc:
            raise NBDTLSError(f"TLS error: {exc}") from None
        except OSError as exc:
            raise NBDProtocolError(f"connection lost: {exc}") from None
        if k == 0:
            raise NBDProtocolError(f"server closed the connection ({got} of {n} bytes read)")
        got += k
    return bytes(buf)


def send_all(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise NBDProtocolError(f"connection lost while sending: {exc}") from None


@dataclass
class NBDConnection:
    """A negotiated connection. ``sock`` is what the agent hands to the kernel (``detach()``);
    the I/O helpers below are for tests and tools, one request at a time."""

    sock: socket.socket
    details: ExportDetails
    _cookie: int = 0

    def detach(self) -> socket.socket:
        """Give up ownership of the socket (e.g. to pass its fd to the kernel)."""
        sock, self.sock = self.sock, None  # type: ignore[assignment]
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None  # type: ignore[assignment]

    def __enter__(self) -> NBDConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b""
    ) -> int:
        self._cookie += 1
        send_all(self.sock, wire.pack_request(flags, cmd, self._cookie, offset, length) + data)
        return self._cookie

    def _simple(self, cookie: int) -> None:
        magic, error, got = wire.SIMPLE_REPLY.unpack(recv_exact(self.sock, 16))
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if got != cookie:
                raise NBDProtocolError(f"reply cookie {got} for request {cookie}")
            if error:
                raise OSError(error, f"NBD error {error}")
            return
        self._chunks(magic, error, got, cookie, None, 0)

    def _chunks(
        self, magic: int, word: int, got: int, cookie: int, out: bytearray | None, base: int
    ) -> None:
        """Consume structured chunks until DONE; data lands in ``out`` at offset - base."""
        failure: OSError | None = None
        while True:
            if magic != NBD_STRUCTURED_REPLY_MAGIC:
                raise NBDProtocolError(f"bad reply magic {magic:#x}")
            flags, rtype = word >> 16, word & 0xFFFF
            (length,) = wire.U32.unpack(recv_exact(self.sock, 4))
            if got != cookie:
                raise NBDProtocolError(f"reply cookie {got} for request {cookie}")
            payload = recv_exact(self.sock, length)
            if rtype == ReplyType.NBD_REPLY_TYPE_OFFSET_DATA and out is not None:
                (off,) = wire.U64.unpack_from(payload)
                out[off - base : off - base + length - 8] = payload[8:]
            elif rtype == ReplyType.NBD_REPLY_TYPE_OFFSET_HOLE and out is not None:
                (off,) = wire.U64.unpack_from(payload)
                (n,) = wire.U32.unpack_from(payload, 8)
                out[off - base : off - base + n] = bytes(n)
            elif rtype & 0x8000:
                error, _mlen = wire.ERROR_HEAD.unpack_from(payload)
                failure = OSError(error, payload[6 : 6 + _mlen].decode(errors="replace"))
            elif rtype not in (
                ReplyType.NBD_REPLY_TYPE_NONE,
                ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS,
            ):
                raise NBDProtocolError(f"unexpected chunk type {rtype}")
            if flags & 1:
                break
            magic, word, got = wire.SIMPLE_REPLY.unpack(recv_exact(self.sock, 16))
        if failure is not None:
            raise failure

    def pread(self, offset: int, length: int) -> bytes:
        cookie = self._request(Command.NBD_CMD_READ, offset, length)
        magic, word, got = wire.SIMPLE_REPLY.unpack(recv_exact(self.sock, 16))
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            if got != cookie:
                raise NBDProtocolError(f"reply cookie {got} for request {cookie}")
            if word:
                raise OSError(word, f"NBD error {word}")
            return recv_exact(self.sock, length)
        out = bytearray(length)
        self._chunks(magic, word, got, cookie, out, offset)
        return bytes(out)

    def pwrite(self, data: bytes, offset: int, flags: int = 0) -> None:
        self._simple(self._request(Command.NBD_CMD_WRITE, offset, len(data), flags, data))

    def flush(self) -> None:
        self._simple(self._request(Command.NBD_CMD_FLUSH, 0, 0))

    def trim(self, offset: int, length: int) -> None:
        self._simple(self._request(Command.NBD_CMD_TRIM, offset, length))

    def disconnect(self) -> None:
        """NBD_CMD_DISC (no reply), then close."""
        if self.sock is not None:
            try:
                self._request(Command.NBD_CMD_DISC, 0, 0)
            finally:
                self.close()
