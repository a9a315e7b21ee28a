"""The userspace half of an attach: reach the server, negotiate, hand back a socket positioned
at transmission plus what the kernel must be told (size, flags, block size).

Why it exists: the kernel's nbd driver only does transmission and parses simple replies only.
The handshake itself is ``nbdserver.client`` (fixed newstyle, NBD_OPT_GO with
NBD_INFO_BLOCK_SIZE, no structured replies, no extended headers by default) and the URI parser
is ``nbdserver.protocol.uri``: one definition of the protocol for server and client. This module
adapts them to the agent: its error classes, and a block size the kernel accepts.

What it must not do: touch netlink or devices, or keep sockets it failed to negotiate.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

from nbd_agent.errors import ExportUnknown, HandshakeError, ServerUnreachable, UsageError
from nbdserver import client
from nbdserver.protocol.constants import TransmissionFlag
from nbdserver.protocol.uri import NBDURI, NBDURIError
from nbdserver.protocol.uri import parse_uri as _parse_nbd_uri


@dataclass(frozen=True)
class Target:
    """Where an export lives: the URI as the user gave it, and parsed."""

    uri: str
    parsed: NBDURI

    @property
    def tls(self) -> bool:
        return self.parsed.tls

    def describe(self) -> str:
        p = self.parsed
        where = p.socket_path if p.socket_path else f"{p.host}:{p.port}"
        return f"{where} export {p.export_name!r}"


def parse_uri(uri: str) -> Target:
    """Parse an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://) or raise UsageError."""
    try:
        return Target(uri, _parse_nbd_uri(uri))
    except NBDURIError as exc:
        raise UsageError(f"not a usable NBD URI: {exc}") from exc


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int
    block_size: int | None  # the server's preferred block size, if the kernel accepts it
    from_sysfs: bool = False  # size as the kernel shows it (adopted device), not the server
    identity: str = ""  # which incarnation of the data (docs/protocol.md); "" = none told

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.NBD_FLAG_READ_ONLY)

    @property
    def multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.NBD_FLAG_CAN_MULTI_CONN)


def kernel_block_size(preferred: int) -> int | None:
    """The kernel takes 512..PAGE_SIZE, a power of two; otherwise leave it to its default."""
    if 512 <= preferred <= 4096 and preferred & (preferred - 1) == 0:
        return preferred
    return None


@contextlib.contextmanager
def _agent_errors(target: Target) -> Iterator[None]:
    """The client library's errors as the agent's (one mapping for every handshake)."""
    try:
        yield
    except client.NBDConnectError as exc:
        raise ServerUnreachable(f"cannot reach {target.describe()}: {exc}") from exc
    except client.NBDUnknownExport as exc:
        raise ExportUnknown(f"{target.describe()}: the server has no such export") from exc
    except client.NBDTLSRequired as exc:
        raise HandshakeError(f"{target.describe()}: the server requires TLS (nbds://)") from exc
    except client.NBDClientError as exc:
        raise HandshakeError(f"{target.describe()}: handshake failed: {exc}") from exc


def open_export(
    target: Target, *, timeout: float = 10.0, tls_context: ssl.SSLContext | None = None
) -> tuple[socket.socket, ExportInfo]:
    """Connect and negotiate one connection for the kernel: the returned socket is blocking
    and at the start of transmission. Nothing stays open on failure."""
    with _agent_errors(target):
        conn = client.connect(target.parsed, tls_context=tls_context, timeout=timeout)
    details = conn.details
    if details.structured_replies:  # never asked for; a server that forces it is unusable
        conn.close()
        raise HandshakeError(f"{target.describe()}: structured replies were negotiated")
    info = ExportInfo(
        size=details.size,
        flags=details.transmission_flags,
        block_size=kernel_block_size(details.preferred_block)
        if details.block_size_reported
        else None,
    )
    return conn.detach(), info


def export_identity(
    target: Target, *, timeout: float = 10.0, tls_context: ssl.SSLContext | None = None
) -> str:
    """The export's identity, asked on a connection of its own (it needs structured replies,
    which a kernel connection must not have); "" when the server tells none."""
    with _agent_errors(target):
        found = client.export_identity(target.parsed, tls_context=tls_context, timeout=timeout)
    return found or ""


def flush_export(target: Target, *, timeout: float = 10.0) -> None:
    """Connect, send NBD_CMD_FLUSH, disconnect: every write the server acknowledged before the
    flush is then on its stable storage (the quiesce before a snapshot of that storage)."""
    with _agent_errors(target), client.connect(target.parsed, timeout=timeout) as conn:
        conn.flush()
        conn.disconnect()
