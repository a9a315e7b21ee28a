"""The client handshake over a blocking socket: connect, STARTTLS, options, GO, LIST.

Why: the node agent negotiates in userspace and then hands the socket to the kernel, positioned
exactly at the start of transmission; this module is that negotiation, built on the pure pieces
in ``nbdserver.protocol`` (codecs, ``client_handshake``, ``uri``).

What it must not do: negotiate structured replies or extended headers unless asked (the kernel
parses only simple replies), retry, or sleep. After an error reply it performs the soft
disconnect the spec requires (NBD_OPT_ABORT) before raising.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from nbdserver.client.connection import NBDConnection, recv_exact, send_all
from nbdserver.protocol import wire
from nbdserver.protocol.client_handshake import (
    GO_INFO_REQUESTS,
    MAX_OPTION_REPLY,
    ExportDetails,
    InfoCollector,
    NBDClientError,
    NBDConnectError,
    NBDOptionError,
    NBDProtocolError,
    NBDTLSError,
    NBDUnknownExport,
    client_flags,
    is_error,
    option_error,
    parse_export_name_reply,
)
from nbdserver.protocol.constants import (
    BASE_ALLOCATION,
    IDENTITY_NAMESPACE,
    IDENTITY_PREFIX,
    HandshakeFlag,
    Option,
    OptionReply,
)
from nbdserver.protocol.uri import NBDURI, parse_uri

DEFAULT_TIMEOUT = 30.0


def open_socket(target: NBDURI | str, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """Connect to the server named by an NBD URI (or URI text); no NBD bytes are exchanged."""
    uri = parse_uri(target) if isinstance(target, str) else target
    try:
        if uri.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(uri.socket_path)
            except BaseException:
                sock.close()
                raise
        else:
            assert uri.host is not None
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        target_text = uri.socket_path or f"{uri.host}:{uri.port}"
        raise NBDConnectError(f"cannot reach NBD server at {target_text}: {exc}") from None
    return sock


def tls_context_for(uri: NBDURI) -> ssl.SSLContext:
    """A client SSLContext from the URI's tls-* parameters (tls-certificates as libnbd reads it:
    ca-cert.pem, and client-cert.pem + client-key.pem when present)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec's floor
    if uri.tls_certificates:
        d = Path(uri.tls_certificates)
        if (d / "ca-cert.pem").exists():
            ctx.load_verify_locations(cafile=str(d / "ca-cert.pem"))
        if (d / "client-cert.pem").exists():
            ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
    if not uri.tls_verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Options:
    """Sends one option and reads its replies; enforces that replies answer that option."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, option: int, payload: bytes = b"") -> None:
        send_all(self.sock, wire.pack_option(option, payload))

    def reply(self, option: int) -> tuple[int, bytes]:
        got, rtype, length = wire.unpack_option_reply_header(recv_exact(self.sock, 20))
        if got != option:
            raise NBDProtocolError(f"reply for option {got} while waiting for option {option}")
        if length > MAX_OPTION_REPLY:
            raise NBDProtocolError(f"option reply of {length} bytes")
        return rtype, recv_exact(self.sock, length) if length else b""

    def simple(self, option: int, payload: bytes = b"") -> tuple[int, bytes]:
        """Send an option whose only reply is ACK or an error."""
        self.send(option, payload)
        rtype, data = self.reply(option)
        if rtype != OptionReply.NBD_REP_ACK and not is_error(rtype):
            raise NBDProtocolError(f"unexpected reply {rtype:#x} to option {option}")
        return rtype, data


def _start(sock: socket.socket) -> tuple[_Options, int]:
    try:
        server_flags = wire.unpack_greeting(recv_exact(sock, wire.GREETING.size))
    except wire.ProtocolError as exc:
        raise NBDProtocolError(str(exc)) from None
    except NBDProtocolError as exc:
        raise NBDProtocolError(f"no NBD greeting: {exc}") from None
    send_all(sock, wire.CLIENT_FLAGS.pack(client_flags(server_flags)))
    return _Options(sock), server_flags


def _starttls(
    opts: _Options, ctx: ssl.SSLContext, server_hostname: str | None, required: bool
) -> socket.socket | None:
    rtype, data = opts.simple(Option.NBD_OPT_STARTTLS)
    if is_error(rtype):
        if required:
            raise NBDTLSError(f"server refused STARTTLS: {option_error(5, rtype, data)}")
        return None
    try:
        return ctx.wrap_socket(opts.sock, server_hostname=server_hostname)
    except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
        raise NBDTLSError(f"TLS handshake failed: {exc}") from None


def handshake(
    sock: socket.socket,
    export_name: str = "",
    *,
    tls_context: ssl.SSLContext | None = None,
    tls_required: bool = False,
    server_hostname: str | None = None,
    structured_replies: bool = False,
    meta_contexts: tuple[str, ...] = (),
) -> tuple[socket.socket, ExportDetails]:
    """Negotiate ``export_name`` on a connected socket and stop at the transmission phase.

    Returns the socket to use from now on (an ``ssl.SSLSocket`` after STARTTLS) and the export's
    details. With ``tls_context`` STARTTLS is tried first; a refusal is fatal when
    ``tls_required`` (nbds:// URIs), otherwise the session continues in clear text.
    NBD_OPT_GO is used, falling back to NBD_OPT_EXPORT_NAME when the server lacks it.
    """
    if tls_required and tls_context is None:
        raise NBDTLSError("TLS is required but no TLS context was given")
    opts, server_flags = _start(sock)
    try:
        return _negotiate(
            opts, server_flags, export_name, tls_context, tls_required, server_hostname,
            structured_replies, meta_contexts,
        )  # fmt: skip
    except (NBDOptionError, NBDTLSError) as exc:
        if not isinstance(exc, NBDTLSError) or "refused STARTTLS" in str(exc):
            _soft_disconnect(opts)
        raise


def _soft_disconnect(opts: _Options) -> None:
    """After an error reply the spec allows the client only a soft disconnect: NBD_OPT_ABORT,
    then wait briefly for the ACK (which the server may omit) before closing."""
    with contextlib.suppress(NBDClientError, OSError):
        opts.sock.settimeout(2.0)
        opts.send(Option.NBD_OPT_ABORT)
        opts.reply(Option.NBD_OPT_ABORT)


def _negotiate(
    opts: _Options,
    server_flags: int,
    export_name: str,
    tls_context: ssl.SSLContext | None,
    tls_required: bool,
    server_hostname: str | None,
    structured_replies: bool,
    meta_contexts: tuple[str, ...],
) -> tuple[socket.socket, ExportDetails]:
    sock = opts.sock
    details = ExportDetails(export_name=export_name)
    if tls_context is not None:
        upgraded = _starttls(opts, tls_context, server_hostname, tls_required)
        if upgraded is not None:
            sock = upgraded
            opts = _Options(sock)
            details.tls = True
    if structured_replies:
        rtype, data = opts.simple(Option.NBD_OPT_STRUCTURED_REPLY)
        if rtype == OptionReply.NBD_REP_ERR_TLS_REQD:
            raise option_error(Option.NBD_OPT_STRUCTURED_REPLY, rtype, data)
        details.structured_replies = rtype == OptionReply.NBD_REP_ACK
        if details.structured_replies and meta_contexts:
            _set_meta_contexts(opts, export_name, meta_contexts, details)
    opts.send(Option.NBD_OPT_GO, wire.pack_info_go(export_name, GO_INFO_REQUESTS))
    collector = InfoCollector(details)
    while True:
        rtype, data = opts.reply(Option.NBD_OPT_GO)
        if rtype == OptionReply.NBD_REP_INFO:
            collector.feed(data)
        elif rtype == OptionReply.NBD_REP_ACK:
            details = collector.finish()
            break
        elif rtype == OptionReply.NBD_REP_ERR_UNSUP:
            details = _export_name(opts, export_name, server_flags, details)
            break
        elif is_error(rtype):
            raise option_error(Option.NBD_OPT_GO, rtype, data)
        else:
            raise NBDProtocolError(f"unexpected reply {rtype:#x} to NBD_OPT_GO")
    sock.settimeout(None)  # the kernel (or the caller) owns the socket's pacing from here
    return sock, details


def _set_meta_contexts(
    opts: _Options, export_name: str, queries: tuple[str, ...], details: ExportDetails
) -> None:
    opt = Option.NBD_OPT_SET_META_CONTEXT
    opts.send(opt, wire.pack_meta_context_request(export_name, queries))
    while True:
        rtype, data = opts.reply(opt)
        if rtype == OptionReply.NBD_REP_META_CONTEXT:
            cid, name = wire.unpack_rep_meta_context(data)
            details.meta_contexts[name] = cid
        elif rtype == OptionReply.NBD_REP_ACK:
            return
        elif is_error(rtype):
            details.meta_contexts.clear()  # the spec: disregard contexts before an error
            return
        else:
            raise NBDProtocolError(f"unexpected reply {rtype:#x} to NBD_OPT_SET_META_CONTEXT")


def _export_name(
    opts: _Options, name: str, server_flags: int, details: ExportDetails
) -> ExportDetails:
    opts.send(Option.NBD_OPT_EXPORT_NAME, name.encode())
    try:
        head = recv_exact(opts.sock, wire.EXPORT_NAME_REPLY.size)
    except NBDProtocolError:
        raise NBDUnknownExport(
            Option.NBD_OPT_EXPORT_NAME,
            OptionReply.NBD_REP_ERR_UNKNOWN,
            f"server closed the connection on export {name!r}",
        ) from None
    if not server_flags & HandshakeFlag.NBD_FLAG_NO_ZEROES:
        recv_exact(opts.sock, 124)
    details.meta_contexts.clear()
    return parse_export_name_reply(head, details)


def list_exports(
    target: NBDURI | str,
    *,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[tuple[str, str]]:
    """NBD_OPT_LIST: (name, description) of each export, then a clean NBD_OPT_ABORT."""
    with _session(target, tls_context, timeout) as (opts, _uri):
        opts.send(Option.NBD_OPT_LIST)
        found: list[tuple[str, str]] = []
        while True:
            rtype, data = opts.reply(Option.NBD_OPT_LIST)
            if rtype == OptionReply.NBD_REP_SERVER:
                try:
                    found.append(wire.unpack_rep_server(data))
                except wire.ProtocolError as exc:
                    raise NBDProtocolError(str(exc)) from None
            elif rtype == OptionReply.NBD_REP_ACK:
                break
            elif is_error(rtype):
                _soft_disconnect(opts)
                raise option_error(Option.NBD_OPT_LIST, rtype, data)
            else:
                raise NBDProtocolError(f"unexpected reply {rtype:#x} to NBD_OPT_LIST")
        _abort(opts)
        return found


@contextlib.contextmanager
def _session(
    target: NBDURI | str, tls_context: ssl.SSLContext | None, timeout: float
) -> Iterator[tuple[_Options, NBDURI]]:
    """A connection in option haggling (after STARTTLS where the URI asks for it), closed after."""
    uri = parse_uri(target) if isinstance(target, str) else target
    if uri.tls and tls_context is None:
        tls_context = tls_context_for(uri)
    sock = open_socket(uri, timeout)
    try:
        opts, _ = _start(sock)
        if tls_context is not None:
            upgraded = _starttls(opts, tls_context, uri.server_hostname, uri.tls)
            if upgraded is not None:
                sock = upgraded
                opts = _Options(sock)
        yield opts, uri
    finally:
        sock.close()


def _abort(opts: _Options) -> None:
    opts.send(Option.NBD_OPT_ABORT)
    with contextlib.suppress(NBDProtocolError):  # the server may close without an ACK
        opts.reply(Option.NBD_OPT_ABORT)


def export_identity(
    target: NBDURI | str,
    *,
    tls_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str | None:
    """The export's identity (``x-kube-nbd:identity=<id>``, docs/protocol.md), or None when the
    server does not tell one. Its own connection: the spec wants structured replies before
    NBD_OPT_LIST_META_CONTEXT, and a connection meant for the kernel must not have them."""
    with _session(target, tls_context, timeout) as (opts, uri):
        rtype, _ = opts.simple(Option.NBD_OPT_STRUCTURED_REPLY)
        if is_error(rtype):
            _soft_disconnect(opts)
            return None
        opt = Option.NBD_OPT_LIST_META_CONTEXT
        opts.send(opt, wire.pack_meta_context_request(uri.export_name, (IDENTITY_NAMESPACE + ":",)))
        found: str | None = None
        while True:
            rtype, data = opts.reply(opt)
            if rtype == OptionReply.NBD_REP_META_CONTEXT:
                _, name = wire.unpack_rep_meta_context(data)
                if name.startswith(IDENTITY_PREFIX):
                    found = name[len(IDENTITY_PREFIX) :]
            elif rtype == OptionReply.NBD_REP_ACK:
                break
            elif is_error(rtype):
                _soft_disconnect(opts)
                if rtype == OptionReply.NBD_REP_ERR_UNKNOWN:
                    raise option_error(opt, rtype, data)
                return None  # the spec: disregard contexts sent before an error
            else:
                raise NBDProtocolError(f"unexpected reply {rtype:#x} to {opt.name}")
        _abort(opts)
        return found


def connect(
    target: NBDURI | str,
    *,
    export_name: str | None = None,
    tls_context: ssl.SSLContext | None = None,
    structured_replies: bool = False,
    meta_contexts: tuple[str, ...] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> NBDConnection:
    """Open a connection to the export named by ``target`` (an NBD URI) and negotiate it.

    ``export_name`` overrides the URI's export. nbds:// URIs make TLS mandatory (a context is
    built from the URI's tls-* parameters unless one is given); with nbd:// and a context, TLS is
    opportunistic.
    """
    uri = parse_uri(target) if isinstance(target, str) else target
    if uri.tls and tls_context is None:
        tls_context = tls_context_for(uri)
    sock = open_socket(uri, timeout)
    try:
        sock, details = handshake(
            sock,
            uri.export_name if export_name is None else export_name,
            tls_context=tls_context,
            tls_required=uri.tls,
            server_hostname=uri.server_hostname,
            structured_replies=structured_replies,
            meta_contexts=meta_contexts or ((BASE_ALLOCATION,) if structured_replies else ()),
        )
    except BaseException:
        sock.close()
        raise
    return NBDConnection(sock, details)
