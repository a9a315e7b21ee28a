"""The pass-through filter every other filter derives from.

Why: a filter that overrides one call must still forward the others and the capability flags;
doing that once here keeps each real filter to the behaviour it changes.

It must not add work on the path it forwards: capability flags are copied once at construction
(plain attributes, no properties), and every call is a direct delegation.
"""

from __future__ import annotations

from nbdserver.backends.base import Backend, BlockSize, Extent

_CAPABILITIES = (
    "can_write",
    "can_flush",
    "can_fua",
    "can_trim",
    "can_zero",
    "can_fast_zero",
    "can_extents",
    "can_cache",
    "can_multi_conn",
    "is_rotational",
)


class Filter(Backend):
    """Forwards everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        for name in _CAPABILITIES:
            setattr(self, name, getattr(inner, name))
        self.block_size: BlockSize = inner.block_size
        self.identity = inner.identity  # a filter that changes the data sets its own

    def size(self) -> int:
        return self.inner.size()

    def pread(self, buf: memoryview, offset: int) -> None:
        self.inner.pread(buf, offset)

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self.inner.pwrite(data, offset, fua)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.inner.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        self.inner.zero(offset, length, may_trim, fast, fua)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def fileno(self) -> int | None:
        return self.inner.fileno()

    def close(self) -> None:
        self.inner.close()
