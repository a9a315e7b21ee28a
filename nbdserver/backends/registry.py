"""The backends by name: adding one is a module that defines ``KIND`` and one line below.

Why: ``--backend``, ``-e NAME=PATH,backend=...`` and ``auto`` all need the list of backends and
how each opens its image; before this table that knowledge was spread over the export code and
the command line.

What it must not do: wrap backends in filters (``nbdserver.exports.stack`` does) or know the
configuration model (the caller passes plain values).
"""

from __future__ import annotations

from nbdserver.backends import block, file, http, memory, plugin, s3
from nbdserver.backends._retry import Transient, within
from nbdserver.backends.base import Backend, BackendKind, RemoteOptions
from nbdserver.errors import RemoteUnavailable

# One line per backend; ``auto`` asks them in this order.
KINDS: dict[str, BackendKind] = {
    k.name: k for k in (http.KIND, s3.KIND, block.KIND, file.KIND, memory.KIND, plugin.KIND)
}
NAMES: tuple[str, ...] = ("auto", *KINDS)


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL a remote backend claims (a string test: no file system)."""
    return any(k.open_remote is not None and k.claims(path) for k in KINDS.values())


def kind_for(name: str, path: str | None) -> BackendKind:
    """The backend ``name`` names; for ``auto`` the first that claims ``path``."""
    if name != "auto":
        return KINDS[name]
    assert path is not None
    return next(k for k in KINDS.values() if k.needs_path and k.claims(path))


def open_remote(kind: BackendKind, url: str, options: RemoteOptions) -> Backend:
    """``url`` opened by ``kind``; a transient failure at open (a 5xx, a reset, a timeout) is
    retried with backoff within ``options.timeout``, then raised as ``RemoteUnavailable``, as
    a read would be: an object store that throttles at start is no reason to refuse."""
    assert kind.open_remote is not None
    opener = kind.open_remote

    def attempt(remaining: float) -> Backend:
        try:
            return opener(url, options)
        except RemoteUnavailable as exc:
            raise Transient(str(exc).removeprefix(f"{url}: ")) from None

    try:
        return within(options.timeout, url, attempt)
    except OSError as exc:
        raise RemoteUnavailable(exc.strerror or str(exc)) from None
