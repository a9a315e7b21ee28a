"""Live exports: an ``ExportConfig`` opened into a backend wrapped by its filters, plus the
per-export connection accounting; and the one function that decides every filter stack.

``open_export`` opens what the configuration says (the backend from the registry in
``nbdserver.backends.registry``); ``stack`` orders the filters, for the export as a whole and for
one connection. This module must not do network I/O.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
from urllib.parse import quote

from nbdserver.backends.base import Backend, BackendKind, RemoteOptions
from nbdserver.backends.registry import NAMES as BACKENDS
from nbdserver.backends.registry import kind_for, open_remote
from nbdserver.config.model import CowMode, ExportConfig
from nbdserver.errors import ConfigError
from nbdserver.filters.access import CapsFilter, ReadOnlyFilter
from nbdserver.filters.cache import CacheFilter
from nbdserver.filters.cow import CowFilter
from nbdserver.filters.qos import wrap_qos
from nbdserver.filters.stats import StatsFilter
from nbdserver.formats import probe
from nbdserver.formats._image import BackendImage, ImageFile
from nbdserver.formats.registry import FORMATS, RAW
from nbdserver.metrics import ConnStats


def stack(
    inner: Backend,
    cfg: ExportConfig,
    *,
    connection: bool = False,
    read_only_view: bool = False,
    stats: ConnStats | None = None,
    owned: list[Backend] | None = None,
) -> Backend:
    """The filters over ``inner``, innermost first; the one place their order is decided.

    Export scope (``connection=False``, once when the export opens): the read cache directly
    over the backend (so it holds the image's own bytes, shared by every overlay; for a
    formatted image from a URL or plugin it sits under the format, see ``_open_format``),
    copy-on-write shared or persistent (so everything above sees the merged image), capability
    switches, then rate limits (so a throttled request has not touched any layer yet).
    Connection scope (``connection=True``, over the export's stack, per connection): with
    copy-on-write per connection, that overlay and then the capability switches and rate
    limits (which therefore count per connection in that mode); the single-writer read-only
    view; metrics outermost.
    Nothing asked for: ``inner`` itself, the fast path. ``owned`` collects the layers that
    belong to the connection alone; whoever ends the connection closes them.
    """
    if connection:
        if cfg.cow is CowMode.CONNECTION:
            overlay = CowFilter(inner, cow_dir=cfg.cow_dir, shared=False, owns_inner=False)
            if owned is not None:
                owned.append(overlay)
            inner = _limits(overlay, cfg)
        if read_only_view:
            inner = ReadOnlyFilter(inner)
        return inner if stats is None else StatsFilter(inner, stats)
    if cfg.cache_size and not _cache_under_format(cfg):
        inner = CacheFilter(inner, cfg.cache_size, cache_dir=cfg.cache_dir)
    if cfg.cow is CowMode.CONNECTION:
        return inner  # every layer above the base is per connection
    if cfg.cow in (CowMode.SHARED, CowMode.PERSISTENT):
        persist = cow_overlay_path(cfg) if cfg.cow is CowMode.PERSISTENT else None
        inner = CowFilter(inner, cow_dir=cfg.cow_dir, persist_path=persist)
    return _limits(inner, cfg)


def _limits(inner: Backend, cfg: ExportConfig) -> Backend:
    """Capability switches, then rate limits (part of ``stack``'s order)."""
    caps = cfg.caps
    if caps is not None and not caps.default:
        inner = CapsFilter(
            inner, trim=caps.trim, flush=caps.flush, fua=caps.fua, rotational=caps.rotational
        )
    return wrap_qos(inner, cfg.qos)


def _open_base(cfg: ExportConfig) -> Backend:
    """The backend itself. Copy-on-write never writes the base: it is opened read-only."""
    read_only = cfg.read_only or cfg.cow is not CowMode.OFF
    if cfg.format not in (None, RAW):
        return _open_format(cfg, read_only)
    kind = kind_for(cfg.backend, cfg.path)
    if kind.open_remote is not None:  # a URL: no file checks; read-only, any overlay above
        assert cfg.path is not None
        return open_remote(
            kind, cfg.path, RemoteOptions(cfg.ca_bundle, cfg.remote_timeout, cfg.s3_endpoint)
        )
    if cfg.format is None and kind.needs_path and cfg.path and not cfg.temporary:
        found = probe.detect_path(cfg.path)
        if found is not None:
            raise ConfigError(
                f"{cfg.path} is a {found} image: give --format {found} (-e ...,format={found}) "
                "to serve its disk, or --format raw to serve the file's bytes"
            )
    if cfg.temporary:
        # nbd-server's ``temporary``: a fresh file next to ``path``, unlinked at once.
        assert cfg.path is not None and cfg.size is not None
        fd, path = tempfile.mkstemp(prefix=os.path.basename(cfg.path) + "-",
                                    dir=os.path.dirname(cfg.path) or None)  # fmt: skip
        try:
            os.ftruncate(fd, cfg.size)
            return _open_kind(kind, cfg, path, None, cfg.read_only)
        finally:
            os.unlink(path)
            os.close(fd)
    if cfg.cow is not CowMode.OFF and kind.needs_path:
        return _open_kind(kind, cfg, cfg.path, None, True)  # never created or grown
    return _open_kind(kind, cfg, cfg.path, cfg.size, read_only)


def _open_kind(kind: BackendKind, cfg: ExportConfig, path: str | None, size: int | None,
               read_only: bool) -> Backend:  # fmt: skip
    """``kind.open``, with the export's plugin parameters for a backend that takes them."""
    if kind.takes_params:
        return kind.open(path, size, read_only, cfg.plugin_params)
    return kind.open(path, size, read_only)


def _open_format(cfg: ExportConfig, read_only: bool) -> Backend:
    """An image in a format other than raw, by the format registry; never created or grown.

    A local file or block device is read through its own descriptor; any other backend (a
    URL, S3, a plugin) is opened read-only as the byte source under the format, with the read
    cache (``--cache-size``) directly over it, so the format's metadata and clusters are
    fetched about once."""
    assert cfg.path is not None and cfg.format is not None
    fmt = FORMATS[cfg.format]
    if not fmt.can_write and not read_only:
        raise ConfigError(
            f"export {cfg.name!r}: {fmt.name} images are served read-only: give --read-only "
            "or --copy-on-write"
        )
    source: str | ImageFile
    if _local(cfg):
        if not os.path.exists(cfg.path):
            raise ConfigError(
                f"{cfg.path} does not exist (qemu-img create makes a {fmt.name} image)"
            )
        source = cfg.path
    else:
        kind = kind_for(cfg.backend, cfg.path)
        if kind.open_remote is not None:
            base = open_remote(
                kind, cfg.path, RemoteOptions(cfg.ca_bundle, cfg.remote_timeout, cfg.s3_endpoint)
            )
        else:
            base = _open_kind(kind, cfg, cfg.path, None, True)
        if cfg.cache_size:
            base = CacheFilter(base, cfg.cache_size, cache_dir=cfg.cache_dir)
        source = BackendImage(base, cfg.path)
    try:
        if fmt.confined:
            return fmt.open(source, read_only, allow_outside=cfg.backing_anywhere)
        return fmt.open(source, read_only)
    except BaseException:
        if not isinstance(source, str):
            source.close()
        raise


def _local(cfg: ExportConfig) -> bool:
    """The image is a file or block device on this host (not a URL, a plugin, RAM)."""
    return kind_for(cfg.backend, cfg.path).name in ("file", "block")


def _cache_under_format(cfg: ExportConfig) -> bool:
    """``_open_format`` put the read cache under the format (over a non-local byte source)."""
    return cfg.format not in (None, RAW) and not _local(cfg)


def cow_overlay_path(cfg: ExportConfig) -> str:
    """Where a persistent overlay of this export lives: one file per export name."""
    assert cfg.cow_dir is not None
    return os.path.join(cfg.cow_dir, quote(cfg.name, safe="") + ".cow")


class Export:
    """A live export: its configuration, its backend, and who is connected to it.

    A reload that drops the export ``retire``s it: no new connection attaches, and the backend
    closes when the last one detaches.
    """

    def __init__(self, config: ExportConfig, backend: Backend) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        # What a connection sees, for the handshake to advertise: the backend itself unless
        # connections get layers of their own (a per-connection overlay, created lazily, so
        # this view costs nothing and is never written).
        self.advertised = (
            stack(backend, config, connection=True) if config.cow is CowMode.CONNECTION else backend
        )
        self._lock = threading.Lock()
        self.active = 0
        self._retired = False

    @property
    def read_only(self) -> bool:
        return self.config.read_only or not self.advertised.can_write

    def try_attach(self) -> bool:
        """Count one more connection, unless the export's limit is reached or it is retired."""
        with self._lock:
            if self._retired:
                return False
            if self.config.connections and self.active >= self.config.connections:
                return False
            self.active += 1
            return True

    def detach(self) -> None:
        with self._lock:
            self.active -= 1
            last = self._retired and self.active == 0
        if last:
            self.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            idle = self.active == 0
        if idle:
            self.close()

    def close(self) -> None:
        """Flush and close the backend (once)."""
        backend, self.backend = self.backend, _CLOSED
        if backend is _CLOSED:
            return
        try:
            if backend.can_flush and not self.config.read_only and backend.can_write:
                backend.flush()
        finally:
            backend.close()


_CLOSED = Backend()


def client_config(cfg: ExportConfig, client: str) -> ExportConfig:
    """nbd-server's ``%s`` in a path (virtstyle ipliteral): the client's address, or "unix"."""
    assert cfg.path is not None
    return dataclasses.replace(cfg, path=cfg.path.replace("%s", client))


def open_export(cfg: ExportConfig) -> Export:
    cfg.validate(BACKENDS)
    cow_dir = cfg.cow_dir if cfg.cow is not CowMode.OFF else None
    if cow_dir is not None and not (os.path.isdir(cow_dir) and os.access(cow_dir, os.W_OK)):
        raise ConfigError(f"--cow-dir {cfg.cow_dir}: not a writable directory")
    try:
        backend = _open_base(cfg)
    except OSError as e:
        raise ConfigError(f"cannot open {cfg.path}: {e.strerror}") from None
    try:
        return Export(cfg, stack(backend, cfg))
    except (OSError, ValueError) as e:  # ValueError: a persistent overlay made for another size
        backend.close()
        where = f"--cow-dir {cfg.cow_dir}" if cfg.cow is not CowMode.OFF else cfg.path
        raise ConfigError(f"cannot open export {cfg.name!r} ({where}): {_reason(e)}") from None


def _reason(exc: OSError | ValueError) -> str:
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
