"""The CSI node plugin's exception tree, one class per gRPC status code the CSI spec asks for.

Why it exists: the node logic decides *which* CSI error applies (the spec's tables per RPC), but
must not import grpc. Each class names its status code by the gRPC enum member's name; the server
module maps them to ``grpc.StatusCode`` in exactly one place. Anything else that escapes a handler
is an INTERNAL error there.

What it must not do: import grpc, or carry secrets in messages (messages reach kubelet's events).
"""

from __future__ import annotations


class CsiError(Exception):
    """A failure with a CSI/gRPC status code; ``str(err)`` is the status message."""

    code = "INTERNAL"


class InvalidArgument(CsiError):
    """A required field is missing or malformed; the caller must fix the request."""

    code = "INVALID_ARGUMENT"


class NotFound(CsiError):
    """The volume (export) does not exist, or is not known at the given path."""

    code = "NOT_FOUND"


class AlreadyExists(CsiError):
    """The volume is already staged/published at that path, but incompatibly."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(CsiError):
    """The request is valid but the world is not ready for it (writer lock held, not staged,
    device not blank, capability the export cannot give)."""

    code = "FAILED_PRECONDITION"


class Aborted(CsiError):
    """Another operation for the same volume is in flight; the CO retries with backoff."""

    code = "ABORTED"


class Unavailable(CsiError):
    """A dependency is down for now (Kubernetes API, NBD server, nbd kernel family)."""

    code = "UNAVAILABLE"


class Internal(CsiError):
    """A step on the node failed (mount, mkfs, attach) for a reason the caller cannot fix."""

    code = "INTERNAL"


class ResourceExhausted(CsiError):
    """No free NBD device is left on this node."""

    code = "RESOURCE_EXHAUSTED"


class OutOfRange(CsiError):
    """The capacity asked for cannot be provided (no size inside the range)."""

    code = "OUT_OF_RANGE"


class Unimplemented(CsiError):
    """An RPC of a capability this plugin does not advertise (as configured)."""

    code = "UNIMPLEMENTED"
