"""The client side of the handshake, sans I/O: what to send, and how to read each reply.

Why: the node agent negotiates in userspace and then hands the socket to the kernel, so a
mistake here (say, negotiating structured replies the kernel cannot parse) breaks a whole node.
Keeping the decisions pure lets unit tests check them byte for byte; ``nbdserver.client`` only
adds the blocking socket calls around them.

What this module must not do: no sockets, no ssl, no clocks. It never negotiates structured
replies or extended headers unless asked (the Linux kernel understands only simple replies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    NBD_REP_FLAG_ERROR,
    ClientFlag,
    HandshakeFlag,
    Info,
    Option,
    OptionReply,
    TransmissionFlag,
)

MAX_OPTION_REPLY = 1 << 20  # any single reply beyond 1 MiB is treated as hostile


class NBDClientError(Exception):
    """Base of every error the userspace client raises."""


class NBDConnectError(NBDClientError):
    """The server could not be reached (refused, unreachable, timed out, no such socket)."""


class NBDProtocolError(NBDClientError):
    """The server broke the protocol (bad magic, malformed reply, early close)."""


class NBDTLSError(NBDClientError):
    """TLS was required but could not be negotiated, or the TLS handshake failed."""


class NBDOptionError(NBDClientError):
    """The server answered an option with an error reply."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        self.message = message
        try:
            rname = OptionReply(reply).name
        except ValueError:
            rname = f"error {reply:#x}"
        try:
            oname = Option(option).name
        except ValueError:
            oname = f"option {option}"
        text = f"{oname}: {rname}" + (f": {message}" if message else "")
        super().__init__(text)


class NBDUnknownExport(NBDOptionError):
    """NBD_REP_ERR_UNKNOWN: the server has no export of that name."""


class NBDTLSRequired(NBDOptionError):
    """NBD_REP_ERR_TLS_REQD: the server insists on TLS for this option or export."""


class NBDServerRefused(NBDOptionError):
    """Any other error reply (policy, shutdown, invalid, unsupported, ...)."""


def option_error(option: int, reply: int, payload: bytes) -> NBDOptionError:
    """The exception matching an error reply (its payload is a human-readable message)."""
    message = payload[:4096].decode(errors="replace")
    if reply == OptionReply.NBD_REP_ERR_UNKNOWN:
        return NBDUnknownExport(option, reply, message)
    if reply == OptionReply.NBD_REP_ERR_TLS_REQD:
        return NBDTLSRequired(option, reply, message)
    return NBDServerRefused(option, reply, message)


def is_error(reply: int) -> bool:
    return bool(reply & NBD_REP_FLAG_ERROR)


def client_flags(server_flags: int) -> int:
    """Our answer to the server's handshake flags: fixed newstyle, plus NO_ZEROES if offered."""
    if not server_flags & HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE:
        raise NBDProtocolError("server does not offer fixed newstyle negotiation")
    flags = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE
    if server_flags & HandshakeFlag.NBD_FLAG_NO_ZEROES:
        flags |= ClientFlag.NBD_FLAG_C_NO_ZEROES
    return int(flags)


# What NBD_OPT_GO asks for: the canonical name, a description and the block sizes. Asking for
# NBD_INFO_BLOCK_SIZE is a promise to obey the constraints (the kernel is told them).
GO_INFO_REQUESTS: tuple[int, ...] = (
    Info.NBD_INFO_NAME,
    Info.NBD_INFO_DESCRIPTION,
    Info.NBD_INFO_BLOCK_SIZE,
)


@dataclass(slots=True)
class ExportDetails:
    """What a successful handshake learned; the socket is positioned at transmission."""

    export_name: str
    size: int = 0
    transmission_flags: int = 0
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_payload: int = 32 * 1024 * 1024
    description: str = ""
    canonical_name: str | None = None
    block_size_reported: bool = False
    structured_replies: bool = False
    meta_contexts: dict[str, int] = field(default_factory=dict)
    tls: bool = False
    via_go: bool = True

    def has(self, flag: TransmissionFlag) -> bool:
        return bool(self.transmission_flags & flag)

    @property
    def read_only(self) -> bool:
        return self.has(TransmissionFlag.NBD_FLAG_READ_ONLY)


class InfoCollector:
    """Accumulates NBD_REP_INFO replies to NBD_OPT_INFO/GO into an ``ExportDetails``."""

    def __init__(self, details: ExportDetails) -> None:
        self.details = details
        self.got_export = False

    def feed(self, payload: bytes) -> None:
        if len(payload) < 2:
            raise NBDProtocolError("NBD_REP_INFO shorter than 2 bytes")
        (kind,) = wire.U16.unpack_from(payload)
        d = self.details
        if kind == Info.NBD_INFO_EXPORT:
            if len(payload) != wire.INFO_EXPORT.size:
                raise NBDProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes, not 12")
            _, d.size, d.transmission_flags = wire.INFO_EXPORT.unpack(payload)
            self.got_export = True
        elif kind == Info.NBD_INFO_NAME:
            d.canonical_name = payload[2:].decode(errors="replace")
        elif kind == Info.NBD_INFO_DESCRIPTION:
            d.description = payload[2:].decode(errors="replace")
        elif kind == Info.NBD_INFO_BLOCK_SIZE:
            if len(payload) != wire.INFO_BLOCK_SIZE.size:
                raise NBDProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, not 14")
            _, minimum, preferred, maximum = wire.INFO_BLOCK_SIZE.unpack(payload)
            if minimum < 1 or minimum & (minimum - 1) or minimum > 65536:
                raise NBDProtocolError(f"minimum block size {minimum} is not a power of 2 <= 64K")
            if preferred < minimum or maximum < minimum:
                raise NBDProtocolError(f"inconsistent block sizes {minimum}/{preferred}/{maximum}")
            d.minimum_block, d.preferred_block, d.maximum_payload = minimum, preferred, maximum
            d.block_size_reported = True
        # Unknown information types must be ignored (spec).

    def finish(self) -> ExportDetails:
        if not self.got_export:
            raise NBDProtocolError("server acknowledged NBD_OPT_GO without NBD_INFO_EXPORT")
        return self.details


def parse_export_name_reply(data: bytes, details: ExportDetails) -> ExportDetails:
    """The 10-byte answer to NBD_OPT_EXPORT_NAME (size, flags); zero padding is read apart."""
    details.size, details.transmission_flags = wire.EXPORT_NAME_REPLY.unpack(data)
    details.via_go = False
    return details
