"""The one place that decides the order of an export's filters.

Order, innermost first: the backend, copy-on-write (so everything above sees the merged image),
capability switches, then rate limits outermost (so a throttled request has not yet touched any
layer). Per-connection layers (single-writer read-only view, metrics) are added by
``nbdserver.security`` on top of this, per connection.

Must not: wrap anything when nothing is asked for; the plain backend is the fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbdserver.backends.base import Backend
from nbdserver.filters.access import CapsFilter
from nbdserver.filters.cow import CowFilter
from nbdserver.filters.qos import QosLimits, wrap_qos


@dataclass(frozen=True)
class Caps:
    trim: bool = True
    flush: bool = True
    fua: bool = True
    rotational: bool | None = None

    @property
    def default(self) -> bool:
        return self.trim and self.flush and self.fua and self.rotational is None


def wrap_export(
    backend: Backend,
    *,
    copy_on_write: bool = False,
    cow_dir: str | None = None,
    cow_path: str | None = None,
    caps: Caps | None = None,
    qos: QosLimits | None = None,
) -> Backend:
    if copy_on_write:
        backend = CowFilter(backend, cow_dir=cow_dir, persist_path=cow_path)
    if caps is not None and not caps.default:
        backend = CapsFilter(
            backend, trim=caps.trim, flush=caps.flush, fua=caps.fua, rotational=caps.rotational
        )
    return wrap_qos(backend, qos)
