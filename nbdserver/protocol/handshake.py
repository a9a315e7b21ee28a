"""The server side of the NBD handshake as a sans-I/O state machine.

Why: option haggling has many small rules (doc/proto.md, "Fixed newstyle negotiation", "TLS
support", "Option types"); one machine that owns them all can be tested byte for byte and keeps
the network edge to "feed bytes, send bytes, react to events".

Rules it enforces:
- fixed newstyle only, NBD_FLAG_NO_ZEROES offered; a client without C_FIXED_NEWSTYLE or with an
  unknown client flag is disconnected (the spec says MUST drop);
- every option except NBD_OPT_EXPORT_NAME is answered with option replies; unknown options get
  NBD_REP_ERR_UNSUP and their payload is skipped; options longer than ``max_option_length`` end
  the connection (a denial-of-service guard the spec allows);
- NBD_OPT_INFO and NBD_OPT_GO send no NBD_REP_INFO before an error reply, and answer the same
  request with the same information (a resolver's ``Refused`` becomes that error reply, e.g.
  NBD_REP_ERR_POLICY or NBD_REP_ERR_TLS_REQD, for INFO, GO and meta-context options alike);
  NBD_INFO_EXPORT is always sent on success, NBD_INFO_BLOCK_SIZE too, NAME and DESCRIPTION when
  asked; no zero padding after GO;
- NBD_OPT_SET_META_CONTEXT replaces the selection even when it fails; the selection counts only
  if GO names the same export; only ``base:allocation`` exists; ``base:`` lists it; LIST
  also reports the export's identity as ``x-kube-nbd:identity=<id>`` (never selectable);
- STARTTLS under a policy of off/on/require; after TLS every negotiated option resets; a second
  STARTTLS gets NBD_REP_ERR_INVALID; under "require" every option but STARTTLS and ABORT gets
  NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which cannot be refused) disconnects;
- after NBD_OPT_EXTENDED_HEADERS, NBD_OPT_STRUCTURED_REPLY gets NBD_REP_ERR_EXT_HEADER_REQD and
  NBD_OPT_EXPORT_NAME disconnects (the client broke a MUST).

What it must not do: touch sockets, threads, clocks or backends. It learns about exports only
through the ``resolve``/``list_exports`` callables given by the edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Literal

from nbdserver.protocol import options, wire
from nbdserver.protocol.constants import (
    BASE_ALLOCATION,
    IDENTITY_PREFIX,
    IHAVEOPT,
    NBD_MAX_OPTION_LENGTH,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
)
from nbdserver.protocol.constants import TransmissionFlag as TF
from nbdserver.protocol.events import (
    NEED_DATA,
    Aborted,
    Closed,
    ExportInfo,
    HandshakeEvent,
    Negotiated,
    Refused,
    StartTLS,
)

TlsPolicy = Literal["off", "on", "require"]
Resolver = Callable[[str], ExportInfo | Refused | None]  # None: no such export
Lister = Callable[[], Iterable[ExportInfo]]

BASE_ALLOCATION_ID: Final = 1  # the context id we hand out for base:allocation
SERVER_HANDSHAKE_FLAGS: Final = (
    HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE | HandshakeFlag.NBD_FLAG_NO_ZEROES
)
# Plain ints: "~" on an IntFlag only complements the defined bits, hiding unknown ones.
_KNOWN_CLIENT_FLAGS: Final = int(
    ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES
)
# Flags the export may never advertise through us, and flags that only make sense for writers.
_NEVER: Final = int(
    TF.NBD_FLAG_SEND_DF | TF.NBD_FLAG_BLOCK_STATUS_PAYLOAD | TF.NBD_FLAG_SEND_RESIZE
)
_WRITE_FLAGS: Final = int(
    TF.NBD_FLAG_SEND_FUA
    | TF.NBD_FLAG_SEND_TRIM
    | TF.NBD_FLAG_SEND_WRITE_ZEROES
    | TF.NBD_FLAG_SEND_FAST_ZERO
)

_AWAIT_FLAGS, _AWAIT_OPTION, _AWAIT_PAYLOAD, _AWAIT_TLS, _FINISHED = range(5)

O = Option  # noqa: E741 - short alias keeps the dispatch readable
R = OptionReply


class ServerHandshake:
    """Feed it bytes with ``receive_data``, send what ``data_to_send`` returns, and act on
    ``next_event()`` until it returns ``Negotiated``, ``Aborted`` or ``Closed``.

    The greeting is queued at construction. ``receive_data(b"")`` signals EOF.
    """

    def __init__(
        self,
        resolve: Resolver,
        list_exports: Lister | None = None,
        *,
        tls: TlsPolicy = "off",
        max_option_length: int = NBD_MAX_OPTION_LENGTH,
    ) -> None:
        if tls not in ("off", "on", "require"):
            raise ValueError(f"tls policy must be off, on or require, not {tls!r}")
        self._resolve = resolve
        self._list = list_exports
        self._policy: TlsPolicy = tls
        self._max_option = max_option_length
        self._in = bytearray()
        self._out = bytearray(wire.pack_greeting(SERVER_HANDSHAKE_FLAGS))
        self._state = _AWAIT_FLAGS
        self._eof = False
        self._final: HandshakeEvent | None = None
        self._option = 0
        self._length = 0
        self._shutting_down = False
        self.no_zeroes = False
        self.tls_active = False
        self.options_seen = 0
        self._reset_negotiation()

    # --- the edge's interface ----------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        else:
            self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The edge finished the TLS handshake after a StartTLS event: forget all option state."""
        if self._state != _AWAIT_TLS:
            raise RuntimeError("tls_started() without a pending StartTLS")
        self.tls_active = True
        self._reset_negotiation()
        self._state = _AWAIT_OPTION

    def begin_shutdown(self) -> None:
        """The server is stopping: further options (except ABORT) get NBD_REP_ERR_SHUTDOWN."""
        self._shutting_down = True

    def next_event(self) -> HandshakeEvent:
        while self._final is None:
            if self._state == _AWAIT_TLS:
                return NEED_DATA
            if self._state == _AWAIT_FLAGS:
                if len(self._in) < 4:
                    return self._starved()
                (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in)
                del self._in[:4]
                if flags & ~_KNOWN_CLIENT_FLAGS:
                    return self._close(f"unknown client flags {flags:#x}", violation=True)
                if not flags & ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE:
                    return self._close("client does not speak fixed newstyle", violation=True)
                self.no_zeroes = bool(flags & ClientFlag.NBD_FLAG_C_NO_ZEROES)
                self._state = _AWAIT_OPTION
            elif self._state == _AWAIT_OPTION:
                if len(self._in) < 16:
                    return self._starved()
                magic, self._option, self._length = wire.OPTION_HEADER.unpack_from(self._in)
                del self._in[:16]
                if magic != IHAVEOPT:
                    return self._close(f"bad option magic {magic:#x}", violation=True)
                if self._length > self._max_option:
                    return self._close(
                        f"option {self._option} of {self._length} bytes exceeds the limit",
                        violation=True,
                    )
                self._state = _AWAIT_PAYLOAD
            else:  # _AWAIT_PAYLOAD
                if len(self._in) < self._length:
                    return self._starved()
                payload = bytes(self._in[: self._length])
                del self._in[: self._length]
                self._state = _AWAIT_OPTION
                self.options_seen += 1
                event = self._dispatch(self._option, payload)
                if event is not None:
                    return event
        return self._final

    # --- internals ---------------------------------------------------------------------------
    def _reset_negotiation(self) -> None:
        self.structured = False
        self.extended = False
        self._meta: tuple[tuple[int, str], ...] = ()
        self._meta_export: str | None = None

    def _starved(self) -> HandshakeEvent:
        if self._eof:
            what = "before sending client flags" if self._state == _AWAIT_FLAGS else ""
            if self._in or self._state == _AWAIT_PAYLOAD:
                return self._close("client closed the connection mid-option", violation=True)
            return self._close(f"client closed the connection {what}".rstrip())
        return NEED_DATA

    def _close(self, reason: str, violation: bool = False) -> Closed:
        event = Closed(reason, violation)
        self._final = event
        self._state = _FINISHED
        return event

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += wire.pack_option_reply(option, reply, payload)

    def _error(self, option: int, reply: int, message: str) -> None:
        self._reply(option, reply, message.encode())

    def _refuse(self, opt: int, name: str, refusal: Refused | None) -> None:
        """The error reply for an export the resolver did not hand out (no INFO before it)."""
        if refusal is None:
            self._error(opt, R.NBD_REP_ERR_UNKNOWN, f"export {name!r} not found")
        else:
            self._error(opt, refusal.reply, refusal.message)

    def _dispatch(self, opt: int, data: bytes) -> HandshakeEvent | None:
        if opt == O.NBD_OPT_ABORT:
            self._reply(opt, R.NBD_REP_ACK)  # the spec says the payload is ignored
            self._final = Aborted()
            self._state = _FINISHED
            return self._final
        if self._shutting_down:
            if opt == O.NBD_OPT_EXPORT_NAME:
                return self._close("server shutting down")
            self._error(opt, R.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            return None
        if opt == O.NBD_OPT_STARTTLS:
            return self._starttls(data)
        if self._policy == "require" and not self.tls_active:
            if opt == O.NBD_OPT_EXPORT_NAME:
                return self._close("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            self._error(opt, R.NBD_REP_ERR_TLS_REQD, "TLS is required")
            return None
        if opt == O.NBD_OPT_EXPORT_NAME:
            return self._export_name(data)
        if opt in (O.NBD_OPT_INFO, O.NBD_OPT_GO):
            return self._info_go(opt, data)
        if opt == O.NBD_OPT_LIST:
            self._list_exports(data)
        elif opt == O.NBD_OPT_STRUCTURED_REPLY:
            if data:
                self._error(opt, R.NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            elif self.extended:
                self._error(opt, R.NBD_REP_ERR_EXT_HEADER_REQD, "extended headers in use")
            else:
                self.structured = True
                self._reply(opt, R.NBD_REP_ACK)
        elif opt == O.NBD_OPT_EXTENDED_HEADERS:
            if data:
                self._error(opt, R.NBD_REP_ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data")
            else:
                self.extended = True
                self._reply(opt, R.NBD_REP_ACK)
        elif opt in (O.NBD_OPT_LIST_META_CONTEXT, O.NBD_OPT_SET_META_CONTEXT):
            self._meta_context(opt, data)
        else:
            self._error(opt, R.NBD_REP_ERR_UNSUP, f"option {opt} is not supported")
        return None

    def _starttls(self, data: bytes) -> HandshakeEvent | None:
        opt = O.NBD_OPT_STARTTLS
        if self._policy == "off":
            self._error(opt, R.NBD_REP_ERR_POLICY, "TLS is not configured on this server")
        elif data:
            self._error(opt, R.NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        elif self.tls_active:
            self._error(opt, R.NBD_REP_ERR_INVALID, "TLS is already active")
        else:
            self._reply(opt, R.NBD_REP_ACK)
            if self._in:
                # The client may not send before it has seen our ACK; bytes already here would
                # be lost in the socket upgrade, so this is a violation.
                return self._close("client sent data before the TLS handshake", violation=True)
            self._state = _AWAIT_TLS
            return StartTLS()
        return None

    def wire_flags(self, export: ExportInfo) -> int:
        """The transmission flags sent for ``export`` under the current negotiation state."""
        flags = (int(export.flags) | int(TF.NBD_FLAG_HAS_FLAGS)) & ~_NEVER
        if flags & TF.NBD_FLAG_READ_ONLY:
            flags &= ~_WRITE_FLAGS
        if not flags & TF.NBD_FLAG_SEND_WRITE_ZEROES:
            flags &= ~int(TF.NBD_FLAG_SEND_FAST_ZERO)
        if self.structured or self.extended:
            flags |= TF.NBD_FLAG_SEND_DF
        return int(flags) & 0xFFFF

    def _negotiated(
        self, name: str, export: ExportInfo, flags: int, go: bool, bs: bool
    ) -> Negotiated:
        meta = self._meta if self._meta_export == name else ()
        event = Negotiated(
            export_name=name,
            export=export,
            transmission_flags=flags,
            structured_replies=self.structured or self.extended,
            extended_headers=self.extended,
            meta_contexts=meta,
            block_size_requested=bs,
            tls=self.tls_active,
            via_go=go,
            leftover=bytes(self._in),
        )
        self._in.clear()
        self._final = event
        self._state = _FINISHED
        return event

    def _export_name(self, data: bytes) -> HandshakeEvent:
        if self.extended:
            return self._close("NBD_OPT_EXPORT_NAME after extended headers", violation=True)
        try:
            name = wire.check_string(data)
        except ValueError as exc:
            return self._close(f"invalid export name: {exc}", violation=True)
        export = self._resolve(name)
        if export is None:
            return self._close(f"unknown export {name!r} (NBD_OPT_EXPORT_NAME)")
        if isinstance(export, Refused):  # no error reply exists for EXPORT_NAME
            return self._close(f"export {name!r} refused: {export.message} (NBD_OPT_EXPORT_NAME)")
        flags = self.wire_flags(export)
        self._out += wire.EXPORT_NAME_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += wire.EXPORT_NAME_ZEROES
        return self._negotiated(name, export, flags, go=False, bs=False)

    def _info_go(self, opt: int, data: bytes) -> HandshakeEvent | None:
        parsed = options.parse_info_request(data)
        if isinstance(parsed, str):
            self._error(opt, R.NBD_REP_ERR_INVALID, parsed)
            return None
        name, requests = parsed
        export = self._resolve(name)
        if export is None or isinstance(export, Refused):
            self._refuse(opt, name, export)
            return None
        flags = self.wire_flags(export)
        info = wire.pack_info_export(export.size, flags)
        self._reply(opt, R.NBD_REP_INFO, info)
        if Info.NBD_INFO_NAME in requests:
            self._reply(opt, R.NBD_REP_INFO, wire.pack_info_string(Info.NBD_INFO_NAME, export.name))
        if Info.NBD_INFO_DESCRIPTION in requests and export.description:
            desc = wire.pack_info_string(Info.NBD_INFO_DESCRIPTION, export.description)
            self._reply(opt, R.NBD_REP_INFO, desc)
        sizes = (export.minimum_block, export.preferred_block, export.maximum_payload)
        self._reply(opt, R.NBD_REP_INFO, wire.pack_info_block_size(*sizes))
        self._reply(opt, R.NBD_REP_ACK)
        if opt == O.NBD_OPT_INFO:
            return None
        bs = Info.NBD_INFO_BLOCK_SIZE in requests
        return self._negotiated(name, export, flags, go=True, bs=bs)

    def _list_exports(self, data: bytes) -> None:
        opt = O.NBD_OPT_LIST
        if data:
            self._error(opt, R.NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
        elif self._list is None:
            self._error(opt, R.NBD_REP_ERR_POLICY, "listing exports is disabled")
        else:
            for export in self._list():
                self._reply(
                    opt, R.NBD_REP_SERVER, wire.pack_rep_server(export.name, export.description)
                )
            self._reply(opt, R.NBD_REP_ACK)

    def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == O.NBD_OPT_SET_META_CONTEXT
        if setting:
            # Replaces the previous selection even when this request fails (spec).
            self._meta, self._meta_export = (), None
            if not (self.structured or self.extended):
                self._error(opt, R.NBD_REP_ERR_INVALID, "negotiate structured replies first")
                return
        parsed = options.parse_meta_request(data)
        if isinstance(parsed, str):
            self._error(opt, R.NBD_REP_ERR_INVALID, parsed)
            return
        name, queries = parsed
        export = self._resolve(name)
        if export is None or isinstance(export, Refused):
            self._refuse(opt, name, export)
            return
        found = options.match_base_allocation(queries, setting)
        if isinstance(found, str):
            self._error(opt, R.NBD_REP_ERR_INVALID, found)
            return
        if found:
            cid = BASE_ALLOCATION_ID if setting else 0
            self._reply(
                opt, R.NBD_REP_META_CONTEXT, wire.pack_rep_meta_context(cid, BASE_ALLOCATION)
            )
        if not setting and export.identity and options.match_identity(queries):
            record = IDENTITY_PREFIX + export.identity
            self._reply(opt, R.NBD_REP_META_CONTEXT, wire.pack_rep_meta_context(0, record))
        if setting:
            self._meta = ((BASE_ALLOCATION_ID, BASE_ALLOCATION),) if found else ()
            self._meta_export = name
        self._reply(opt, R.NBD_REP_ACK)
