"""The backend interface: a small set of calls plus capability flags, in the manner of nbdkit.

Contract, which the protocol core guarantees before any call reaches a backend:
- every (offset, length) lies inside ``size``; lengths are > 0 and within the block-size limits;
- writes, trims and zeroes reach only backends whose capability says they can;
- flags are already reduced to plain booleans (``fua``, ``may_trim``, ``fast``).

Errors: raise ``OSError`` with an errno (the core maps it to the NBD wire errno in exactly one
place, ``nbdserver.errors``). A backend must never raise for a request the core validated except
for a genuine I/O failure or ``ENOTSUP`` where a ``fast`` zero cannot be fast.

Backends must be safe to call from several threads at once (one per connection): ``pread`` and
``pwrite`` at explicit offsets share no file position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of ``length`` bytes with base:allocation flags (NBD_STATE_HOLE | NBD_STATE_ZERO)."""

    length: int
    flags: int


def append_extent(out: list[Extent], length: int, flags: int) -> None:
    """Add a run to an extent list, merged into the last one when the flags are the same."""
    if out and out[-1].flags == flags:
        out[-1] = Extent(out[-1].length + length, flags)
    else:
        out.append(Extent(length, flags))


@dataclass(frozen=True, slots=True)
class BlockSize:
    """NBD_INFO_BLOCK_SIZE constraints advertised to clients."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = 32 * 1024 * 1024


class Backend:
    """Base class: read-only, no extras. Subclasses override what they support."""

    # Capability flags. The core advertises transmission flags from these.
    can_write: bool = False
    can_flush: bool = False
    can_fua: bool = False
    can_trim: bool = False
    can_zero: bool = False
    can_fast_zero: bool = False
    can_extents: bool = False
    can_cache: bool = False
    can_multi_conn: bool = False
    is_rotational: bool = False
    block_size: BlockSize = BlockSize()
    # Which incarnation of the data this is (nbdserver.backends.identity); "" = unknown.
    identity: str = ""

    def size(self) -> int:
        raise NotImplementedError

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` entirely with the bytes at ``offset``."""
        raise NotImplementedError

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        raise OSError(30, "read-only backend")  # EROFS; mapped to NBD_EPERM

    def flush(self) -> None:
        """Make every completed write durable."""

    def trim(self, offset: int, length: int, fua: bool) -> None:
        """Advisory: may do nothing; afterwards reads may return anything."""

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        """Make the range read as zeroes. With ``fast``, raise ENOTSUP unless it is cheap."""
        raise OSError(95, "zero not supported")

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Allocation of the range starting at ``offset``: at least one extent, none beyond
        ``offset + length`` is required but the first must start at ``offset``."""
        return [Extent(length, 0)]

    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint."""

    def fileno(self) -> int | None:
        """A file descriptor the edge may ``sendfile`` from for reads, or None."""
        return None

    def close(self) -> None:
        """Release resources; called once when the export is torn down."""


@dataclass(frozen=True)
class BackendKind:
    """How one backend is chosen and opened.

    ``claims(path)``: whether ``auto`` picks this backend for ``path`` (asked in table order).
    ``open(path, size, read_only)``: the opened backend; ``size`` is what the export asked for
    (None: the image's own); a size it cannot honour is a ``ConfigError``.
    ``needs_path``: False for backends whose data lives nowhere on disk.
    ``open_remote(url, options)``: set for backends whose path is a URL; the export opens them
    with this instead of ``open`` (always read-only, never created or grown, no file checks).
    ``takes_params``: ``open`` also takes the export's ``key=value`` parameters (a plugin's).
    """

    name: str
    open: Callable[..., Backend]  # (path, size, read_only[, params])
    claims: Callable[[str], bool]
    needs_path: bool = True
    open_remote: Callable[[str, RemoteOptions], Backend] | None = None
    takes_params: bool = False


@dataclass(frozen=True)
class RemoteOptions:
    """How a remote image is fetched: ``ca_bundle`` (None: the system's CA store) verifies
    HTTPS; ``timeout`` bounds one request, retries included, before it fails with EIO;
    ``s3_endpoint`` (None: the SDK's own, from ``AWS_ENDPOINT_URL`` or the region) for S3."""

    ca_bundle: str | None = None
    timeout: float = 30.0
    s3_endpoint: str | None = None
