"""The narrow interface between the CSI node logic and the NBD attach layer.

Why it exists: the node logic (stage, publish, idempotency, locks, state) must be testable over
gRPC on a machine without an nbd kernel driver, while in production and in the UML tier it must
use the real kernel attach of ``nbd_agent.attach`` (netlink CONNECT after a userspace handshake,
with reconnection on LINK_DEAD). Both sides meet at ``Attacher``; ``KernelAttacher`` is the real
one and the only place where the agent's own errors become CSI errors.

What it must not do: format, mount or know about CSI requests; keep its own idea of which volume
owns which device (that is ``state.py``'s job). The kernel implementation is ``kernel.py``.
"""

from __future__ import annotations

from typing import Protocol

from nbd_agent import errors
from nbd_agent.csi.errors import (
    CsiError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


class Attacher(Protocol):
    """Attach NBD URIs as block devices; the node logic's whole view of the kernel."""

    def ready(self) -> tuple[bool, str]:
        """(True, "") when attaching can work now; (False, why) otherwise (CSI Probe)."""
        ...

    def max_devices(self) -> int:
        """How many devices this node can attach (NodeGetInfo max_volumes_per_node)."""
        ...

    def attach(self, uri: str, read_only: bool, connections: int, identity: str = "") -> str:
        """Attach and return the device path; raise CsiError on failure, leaving nothing.
        With ``identity`` (re-attaching a consumer), a server telling another one is refused."""
        ...

    def identity(self, device: str) -> str:
        """The export identity recorded when ``device`` was attached ("" when none was told)."""
        ...

    def refusal(self, device: str) -> str:
        """Why ``device`` was not reattached after its server came back with different data
        ("" when it was not refused)."""
        ...

    def detach(self, device: str) -> None:
        """Disconnect; a device that is not attached is fine."""
        ...

    def attached_devices(self, uri: str) -> dict[str, bool]:
        """Devices this agent attached to ``uri``, mapped to whether they are read-only."""
        ...

    def is_attached(self, device: str, uri: str) -> bool:
        """True when ``device`` is connected to ``uri`` (alive or reconnecting)."""
        ...

    def is_alive(self, device: str) -> bool:
        """True when the device's link to its server is up (not dead, not reconnecting)."""
        ...

    def adopt(self, device: str, uri: str) -> None:
        """After an agent restart: resume keeping ``device`` attached (reconnect on LINK_DEAD)."""
        ...


def as_csi(exc: Exception, what: str) -> CsiError:
    """Map the attach layer's exception tree onto CSI codes (the one place this happens)."""
    if isinstance(exc, CsiError):
        return exc
    if isinstance(exc, errors.ExportUnknown):
        return NotFound(f"{what}: {exc}")
    if isinstance(exc, errors.ExportChanged):
        return FailedPrecondition(f"{what}: {exc}")
    if isinstance(exc, errors.ServerUnreachable | errors.HandshakeError | errors.FamilyMissing):
        return Unavailable(f"{what}: {exc}")
    if isinstance(exc, errors.NoFreeDevice):
        return ResourceExhausted(f"{what}: {exc}")
    if isinstance(exc, errors.UsageError):
        return InvalidArgument(f"{what}: {exc}")
    return Internal(f"{what}: {exc}")
