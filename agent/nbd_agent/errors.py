"""The agent's one exception tree.

Why it exists: every failure the agent can meet (kernel, server, user input) must reach the user
as one clear sentence, and the CLI (and the CSI layer) map these classes to exit codes or gRPC
codes in exactly one place each. Modules raise these; they never print or exit themselves.

What it must not do: import anything from the agent (it sits at the bottom of the layering).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of everything the agent raises on purpose."""


class NetlinkError(AgentError):
    """The kernel answered a netlink request with an error."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class FamilyMissing(AgentError):
    """The ``nbd`` generic netlink family is not registered: the nbd module is not loaded."""


class DeviceBusy(AgentError):
    """The requested /dev/nbdN is already configured."""


class NoFreeDevice(AgentError):
    """Every existing /dev/nbdN is configured."""


class DeviceNotFound(AgentError):
    """The named device does not exist or is not an nbd device."""


class ServerUnreachable(AgentError):
    """No TCP/unix connection could be made to the server."""


class HandshakeError(AgentError):
    """The server answered, but the NBD handshake failed (protocol error, TLS, refused option)."""


class ExportUnknown(HandshakeError):
    """The server does not have the named export."""


class ExportChanged(HandshakeError):
    """After a reconnect the export's size or flags differ from what the kernel was given."""


class DataChanged(ExportChanged):
    """The server now serves different data under the same name (another export identity, or a
    smaller export): the consumer must never be reattached to it. Permanent, never retried."""


class UsageError(AgentError):
    """Bad input from the user (URI, options)."""
