"""Typed values that cross the boundary between the sans-I/O protocol core and the network edge.

Why: in h11's manner the protocol core returns events, and the edge (``nbdserver.server``)
reacts to them (send bytes, upgrade to TLS, start serving, close). Keeping the event types in one
small module gives the edge a stable, documented contract.

What this module must not do: no logic beyond trivial derived properties; no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from nbdserver.protocol.constants import TransmissionFlag

DEFAULT_MINIMUM_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
DEFAULT_MAXIMUM_PAYLOAD: Final = 32 * 1024 * 1024
IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9._-]{0,128}")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake needs to know about one export (from the edge's export resolver).

    ``flags`` are the transmission flags the *backend* supports (READ_ONLY, SEND_FLUSH,
    SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN,
    ROTATIONAL). The handshake adds NBD_FLAG_HAS_FLAGS, adds NBD_FLAG_SEND_DF exactly when
    structured replies or extended headers were negotiated, and drops flags that must not be
    advertised (write-type flags on a read-only export, FAST_ZERO without WRITE_ZEROES, and the
    unsupported BLOCK_STATUS_PAYLOAD / SEND_RESIZE). The edge thus never computes wire flags.
    """

    name: str
    size: int
    flags: int = 0
    description: str = ""
    minimum_block: int = DEFAULT_MINIMUM_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    maximum_payload: int = DEFAULT_MAXIMUM_PAYLOAD
    # Which incarnation of the data this is: changes exactly when the data may differ from what
    # earlier clients saw (a restarted memory export, a lost overlay). "" = not known.
    identity: str = ""

    def __post_init__(self) -> None:
        # Refuse values the wire cannot carry now, at configuration time, rather than with a
        # struct.error in the middle of some client's handshake.
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size {self.size} does not fit 64 bits")
        if not 0 <= self.flags <= 0xFFFF:
            raise ValueError(f"transmission flags {self.flags:#x} do not fit 16 bits")
        minimum, preferred, maximum = self.minimum_block, self.preferred_block, self.maximum_payload
        if minimum < 1 or minimum & (minimum - 1) or minimum > 65536:
            raise ValueError(f"minimum block size {minimum} is not a power of two <= 65536")
        if preferred < minimum or preferred & (preferred - 1):
            raise ValueError(f"preferred block size {preferred} is not a power of two >= minimum")
        if not preferred <= maximum <= 0xFFFFFFFF:
            raise ValueError(f"maximum payload {maximum} is not in [preferred, 2^32-1]")
        if len(self.name.encode()) > 4096 or len(self.description.encode()) > 4096:
            raise ValueError("export names and descriptions are limited to 4096 bytes")
        if not IDENTITY_RE.fullmatch(self.identity):
            raise ValueError(f"export identity {self.identity!r} is not 0-128 of [A-Za-z0-9._-]")

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.NBD_FLAG_READ_ONLY)


@dataclass(frozen=True, slots=True)
class Refused:
    """A resolver's answer for an export that exists but may not be opened by this client.

    ``reply`` is the option error reply to send (e.g. NBD_REP_ERR_POLICY for an access list or
    a connection limit, NBD_REP_ERR_TLS_REQD for a TLS-only export before STARTTLS); ``message``
    is the human-readable text the spec allows in an error reply. NBD_OPT_EXPORT_NAME cannot
    carry an error, so there the handshake disconnects and ``message`` goes to the log only.
    """

    reply: int
    message: str

    def __post_init__(self) -> None:
        if not self.reply & 0x80000000 or self.reply > 0xFFFFFFFF:
            raise ValueError(f"refusal reply {self.reply:#x} is not an NBD_REP_ERR_* code")
        if len(self.message.encode()) > 4096 or "\0" in self.message:
            raise ValueError("a refusal message must be a spec string (no NUL, <= 4096 bytes)")


class _NeedData(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""Returned by ``next_event`` when more bytes must be received before anything can happen."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The server queued NBD_REP_ACK to NBD_OPT_STARTTLS.

    The edge must send ``data_to_send()``, run the TLS handshake on the socket, then call
    ``tls_started()`` on the handshake machine and continue feeding it the decrypted stream.
    If the TLS handshake fails the edge closes the connection (the spec allows nothing else).
    """


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake ended successfully: transmission starts with the next byte.

    ``leftover`` holds bytes the client already sent beyond the final option (pipelined
    transmission requests); the edge must process them before reading from the socket again.
    """

    export_name: str  # as the client sent it
    export: ExportInfo  # what the resolver returned (canonical name, size, limits, ...)
    transmission_flags: int  # exactly what was sent on the wire
    structured_replies: bool
    extended_headers: bool
    meta_contexts: tuple[tuple[int, str], ...]  # (context id, name) valid for this export
    block_size_requested: bool  # the client promised to obey NBD_INFO_BLOCK_SIZE
    tls: bool
    via_go: bool  # False: NBD_OPT_EXPORT_NAME ended the handshake
    leftover: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT (a soft disconnect): flush the ACK, then close."""

    reason: str = "client sent NBD_OPT_ABORT"


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection must end: peer EOF, protocol violation, or a refusal that cannot be
    answered with an error reply (NBD_OPT_EXPORT_NAME). Flush ``data_to_send()`` first."""

    reason: str
    violation: bool = False  # True when the peer broke a MUST (worth a warning in logs)


HandshakeEvent = StartTLS | Negotiated | Aborted | Closed | _NeedData
