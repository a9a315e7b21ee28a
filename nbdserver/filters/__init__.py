"""Filters: layers that wrap a ``Backend`` and present the same interface (nbdkit's model).

A filter changes one behaviour (copy-on-write, rate limits, access mode) and delegates the rest,
so each stays small and they compose: ``Qos(Cow(FileBackend(...)))``. The protocol core still
validates every request before it reaches the outermost layer; filters never re-validate.

Filters must not import the network edge or the protocol package: they sit below the edge and
above the backends, and know nothing of sockets.
"""

from nbdserver.filters.base import Filter

__all__ = ["Filter"]
