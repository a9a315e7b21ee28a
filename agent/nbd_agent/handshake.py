"""The userspace half of an attach: reach the server, negotiate, hand back a socket in
transmission phase plus what the kernel must be told (size, flags, block size).

Why it exists: the kernel's nbd driver only does transmission, and it parses simple replies
only. So the handshake here is fixed newstyle with NBD_OPT_GO (asking for NBD_INFO_BLOCK_SIZE),
never NBD_OPT_STRUCTURED_REPLY nor NBD_OPT_EXTENDED_HEADERS. Wire layouts come from
``nbdserver.protocol`` (one definition of the protocol for server and client).

What it must not do: touch netlink or devices, or keep sockets it failed to negotiate: every
failure closes what it opened and raises one of the agent's errors.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from nbd_agent.errors import ExportUnknown, HandshakeError, ServerUnreachable, UsageError
from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    NBD_DEFAULT_PORT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)

MAX_REPLY_PAYLOAD = 64 * 1024


@dataclass(frozen=True)
class Target:
    """Where an export lives, parsed from an NBD URI (nbd://, nbds://, nbd+unix://)."""

    uri: str
    export: str
    host: str | None = None
    port: int = NBD_DEFAULT_PORT
    socket_path: str | None = None
    tls: bool = False

    def describe(self) -> str:
        where = self.socket_path if self.socket_path else f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}"


def parse_uri(uri: str) -> Target:
    """Parse an NBD URI per the NBD URI specification (the subset a block device needs)."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    query = parse_qs(parts.query)
    if scheme in ("nbd", "nbds"):
        if not parts.hostname:
            raise UsageError(f"{uri!r}: no server host")
        try:
            port = parts.port or NBD_DEFAULT_PORT
        except ValueError as exc:
            raise UsageError(f"{uri!r}: bad port") from exc
        return Target(uri, export, host=parts.hostname, port=port, tls=scheme == "nbds")
    if scheme in ("nbd+unix", "nbds+unix"):
        path = query.get("socket", [""])[0]
        if not path:
            raise UsageError(f"{uri!r}: nbd+unix:// needs ?socket=/path")
        return Target(uri, export, socket_path=path, tls=scheme == "nbds+unix")
    raise UsageError(f"{uri!r}: scheme must be nbd://, nbds:// or nbd+unix://")


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int
    block_size: int | None  # preferred block size, if the server told one the kernel accepts

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.NBD_FLAG_READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.NBD_FLAG_CAN_MULTI_CONN)


def open_socket(target: Target, timeout: float) -> socket.socket:
    """A connected stream socket to the server, or ServerUnreachable."""
    try:
        if target.socket_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        assert target.host is not None
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except OSError as exc:
        raise ServerUnreachable(f"cannot reach {target.describe()}: {exc.strerror or exc}") from exc


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise HandshakeError("the server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _kernel_block_size(preferred: int) -> int | None:
    # The kernel accepts 512..PAGE_SIZE, a power of two; anything else: let it use its default.
    if 512 <= preferred <= 4096 and preferred & (preferred - 1) == 0:
        return preferred
    return None


def negotiate(
    sock: socket.socket,
    target: Target,
    tls_context: ssl.SSLContext | None = None,
) -> tuple[socket.socket, ExportInfo]:
    """Run the handshake on ``sock``; return the socket to use (TLS-wrapped if asked) and the
    export's info. On error the caller closes the socket."""
    try:
        flags = wire.unpack_greeting(_recv_exact(sock, wire.GREETING.size))
        if not flags & HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE:
            raise HandshakeError("the server does not speak fixed newstyle")
        no_zeroes = bool(flags & HandshakeFlag.NBD_FLAG_NO_ZEROES)
        cflags = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE
        if no_zeroes:
            cflags |= ClientFlag.NBD_FLAG_C_NO_ZEROES
        sock.sendall(wire.CLIENT_FLAGS.pack(cflags))
        if target.tls:
            sock = _starttls(sock, target, tls_context)
        sock.sendall(
            wire.pack_option(
                Option.NBD_OPT_GO,
                wire.pack_info_go(target.export, (Info.NBD_INFO_BLOCK_SIZE,)),
            )
        )
        return sock, _read_go_replies(sock, target)
    except wire.ProtocolError as exc:
        raise HandshakeError(f"{target.describe()}: protocol error: {exc}") from exc
    except ssl.SSLError as exc:
        raise HandshakeError(f"{target.describe()}: TLS failed: {exc}") from exc
    except OSError as exc:
        raise HandshakeError(f"{target.describe()}: {exc.strerror or exc}") from exc


def _read_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    option, reply, length = wire.unpack_option_reply_header(
        _recv_exact(sock, wire.OPTION_REPLY_HEADER.size)
    )
    if length > MAX_REPLY_PAYLOAD:
        raise HandshakeError(f"option reply of {length} bytes is too large")
    return option, reply, _recv_exact(sock, length)


def _starttls(
    sock: socket.socket, target: Target, tls_context: ssl.SSLContext | None
) -> socket.socket:
    sock.sendall(wire.pack_option(Option.NBD_OPT_STARTTLS))
    _, reply, _payload = _read_reply(sock)
    if reply != OptionReply.NBD_REP_ACK:
        raise HandshakeError(f"{target.describe()}: the server refused TLS ({_reply_name(reply)})")
    ctx = tls_context or ssl.create_default_context()
    return ctx.wrap_socket(sock, server_hostname=target.host or None)


def _reply_name(reply: int) -> str:
    try:
        return OptionReply(reply).name
    except ValueError:
        return f"reply {reply:#x}"


def _read_go_replies(sock: socket.socket, target: Target) -> ExportInfo:
    size: int | None = None
    tflags = 0
    block_size: int | None = None
    while True:
        option, reply, payload = _read_reply(sock)
        if option != Option.NBD_OPT_GO:
            raise HandshakeError(f"reply to option {option} while waiting for NBD_OPT_GO")
        if reply == OptionReply.NBD_REP_INFO:
            if len(payload) < 2:
                raise HandshakeError("NBD_REP_INFO shorter than 2 bytes")
            (info,) = wire.U16.unpack_from(payload)
            if info == Info.NBD_INFO_EXPORT and len(payload) >= wire.INFO_EXPORT.size:
                _, size, tflags = wire.INFO_EXPORT.unpack_from(payload)
            elif info == Info.NBD_INFO_BLOCK_SIZE and len(payload) >= wire.INFO_BLOCK_SIZE.size:
                _, _minimum, preferred, _maximum = wire.INFO_BLOCK_SIZE.unpack_from(payload)
                block_size = _kernel_block_size(preferred)
            continue
        if reply == OptionReply.NBD_REP_ACK:
            if size is None:
                raise HandshakeError("the server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
            return ExportInfo(size=size, flags=tflags, block_size=block_size)
        message = payload.decode(errors="replace")
        if reply == OptionReply.NBD_REP_ERR_UNKNOWN:
            raise ExportUnknown(f"{target.describe()}: no such export {message}".rstrip())
        if reply == OptionReply.NBD_REP_ERR_UNSUP:
            raise HandshakeError(f"{target.describe()}: the server does not support NBD_OPT_GO")
        if reply == OptionReply.NBD_REP_ERR_TLS_REQD:
            raise HandshakeError(f"{target.describe()}: the server requires TLS (use nbds://)")
        raise HandshakeError(f"{target.describe()}: {_reply_name(reply)} {message}".rstrip())


def open_export(
    target: Target, *, timeout: float = 10.0, tls_context: ssl.SSLContext | None = None
) -> tuple[socket.socket, ExportInfo]:
    """Connect and negotiate one connection; the returned socket is blocking and in
    transmission phase. Closes everything on failure."""
    sock = open_socket(target, timeout)
    try:
        sock, info = negotiate(sock, target, tls_context)
        sock.settimeout(None)
        return sock, info
    except BaseException:
        sock.close()
        raise
