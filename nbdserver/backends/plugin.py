"""Python plugins: a backend written by a user as a module or class, as nbdkit's Python plugin.

Why: storage that no built-in backend reaches (an object store, a database, a test pattern)
should need a few functions, not a fork of the server. The plugin is loaded from a FILE.py or
from ``MODULE:ATTR``, or from an installed package's entry point (group ``nbdserver.plugins``,
or the older ``kube_nbd.plugins``); its functions (module level, or methods of an instance
when the loaded object is a class) are:

- configuration, as nbdkit's: ``config(key, value)`` for each ``key=value`` given after
  ``--plugin``, then ``config_complete()``; both optional (without ``config``, parameters are
  refused);
- required: ``open(readonly: bool, size: int | None) -> handle``; ``size(h) -> int``;
  ``pread(h, buf: memoryview, offset: int)`` fills ``buf`` (or returns ``len(buf)`` bytes);
- optional: ``pwrite(h, data, offset)``, ``flush(h)``, ``trim(h, offset, length)``,
  ``zero(h, offset, length)``, ``extents(h, offset, length) -> [(length, flags), ...]``
  (flags: 1 hole, 2 zero), ``close(h)``, ``identity(h) -> str``;
- optional attributes: ``thread_model = "parallel"`` (default: calls are serialised, so a
  plugin needs no locks), ``can_multi_conn = True``.

Capabilities follow which functions exist (writes also need a writable export; FUA is a flush
after the write). The core validates every request before the plugin sees it. A plugin's
``OSError`` keeps its errno; any other exception becomes EIO and is logged, never a crash.
Identity: the plugin's ``identity(h)`` when it has one, else new per process, because the
server cannot know whether a plugin's data outlives it (a fresh identity makes a reconnecting
client check rather than assume the same data).
Must not validate requests, wrap filters (``nbdserver.exports.stack`` composes copy-on-write and
read-only over a plugin as over any backend) nor know the configuration model.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import ModuleType
from typing import Any

from nbdserver.backends.base import Backend, BackendKind, Extent
from nbdserver.backends.identity import digest, new_identity
from nbdserver.errors import ConfigError

log = logging.getLogger("nbdserver.plugin")

# The name first; the older project-named group is still read.
ENTRY_POINT_GROUPS = ("nbdserver.plugins", "kube_nbd.plugins")
ENTRY_POINT_GROUP = ENTRY_POINT_GROUPS[0]
REQUIRED = ("open", "size", "pread")


def load_plugin(spec: str) -> object:
    """The plugin named by ``spec``: a path ending in ``.py``; ``module:attr`` (an importable
    module's attribute); else the name of an installed entry point (group
    ``nbdserver.plugins``, or the older ``kube_nbd.plugins``). A class is instantiated once."""
    if spec.endswith(".py"):
        return _load_file(spec)
    loaded = _load_attr(spec) if ":" in spec else _load_entry_point(spec)
    return loaded() if isinstance(loaded, type) else loaded


def _load_attr(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"plugin {spec!r}: module {module_name!r} failed to import: "
                          f"{_one_line(exc)}") from exc  # fmt: skip
    try:
        found: object = module
        for part in attr.split("."):
            found = getattr(found, part)
    except AttributeError:
        raise ConfigError(f"plugin {spec!r}: {module_name} has no {attr!r}") from None
    return found


def _load_entry_point(spec: str) -> object:
    for group in ENTRY_POINT_GROUPS:
        found = importlib.metadata.entry_points(group=group, name=spec)
        if found:
            try:
                return next(iter(found)).load()
            except Exception as exc:
                raise ConfigError(f"plugin {spec!r} failed to load: {_one_line(exc)}") from exc
    names = sorted(
        {ep.name for g in ENTRY_POINT_GROUPS for ep in importlib.metadata.entry_points(group=g)}
    )
    raise ConfigError(
        f"no plugin {spec!r}: give a FILE.py, MODULE:ATTR or one of the installed "
        f"{ENTRY_POINT_GROUP} entry points: {', '.join(names) or '(none installed)'}"
    )


def _one_line(exc: BaseException) -> str:
    """An exception raised while loading, in one line (a syntax error with its place)."""
    if isinstance(exc, SyntaxError):
        return f"syntax error at {exc.filename}:{exc.lineno}: {exc.msg}"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _load_file(path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ConfigError(f"plugin file {path!r} does not exist")
    name = "kube_nbd_plugin_" + digest("p", os.path.abspath(path)).replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"plugin file {path!r} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"plugin file {path!r} failed to load: {_one_line(exc)}") from exc
    return module


def configure(plugin: object, name: str, params: tuple[tuple[str, str], ...]) -> None:
    """nbdkit's order: ``config(key, value)`` for each ``key=value`` in turn, then
    ``config_complete()``; a plugin without ``config`` takes no parameters."""
    config = getattr(plugin, "config", None)
    if params and not callable(config):
        raise ConfigError(
            f"plugin {name!r} takes no parameters (it has no config function): "
            + " ".join(f"{k}={v}" for k, v in params)
        )
    try:
        for key, value in params:
            assert callable(config)
            config(key, value)
        complete = getattr(plugin, "config_complete", None)
        if callable(complete):
            complete()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"plugin {name!r} refused its configuration: {_one_line(exc)}") from exc


class PluginBackend(Backend):
    """A Backend whose calls go to a plugin's functions, with its errors made NBD errors."""

    def __init__(self, plugin: object, name: str, read_only: bool, size: int | None) -> None:
        missing = [f for f in REQUIRED if not callable(getattr(plugin, f, None))]
        if missing:
            raise ConfigError(f"plugin {name!r} lacks the required {', '.join(missing)}")
        self._plugin = plugin
        self._name = name
        parallel = getattr(plugin, "thread_model", "serialize") == "parallel"
        self._lock: threading.Lock | None = None if parallel else threading.Lock()
        has = self._has
        self.can_write = not read_only and has("pwrite")
        self.can_flush = has("flush")
        self.can_fua = self.can_write and self.can_flush
        self.can_trim = self.can_write and has("trim")
        self.can_zero = self.can_write and has("zero")
        self.can_extents = has("extents")
        self.can_multi_conn = bool(getattr(plugin, "can_multi_conn", False))
        try:
            self._handle = self._plugin_open(read_only, size)
            self._size = int(self._call("size"))
            self.identity = self._identity()
        except (OSError, TypeError, ValueError) as exc:
            raise ConfigError(f"plugin {name!r} failed to open: {exc}") from exc
        if self._size < 0:
            raise ConfigError(f"plugin {name!r} reports a negative size")

    def _has(self, function: str) -> bool:
        return callable(getattr(self._plugin, function, None))

    def _plugin_open(self, read_only: bool, size: int | None) -> Any:
        with self._calling("open"):
            return self._function("open")(read_only, size)

    def _identity(self) -> str:
        if not self._has("identity"):
            return new_identity("plugin")
        return digest("plugin", self._name, self._call("identity"))

    def _function(self, function: str) -> Callable[..., Any]:
        found: Callable[..., Any] = getattr(self._plugin, function)
        return found

    @contextmanager
    def _calling(self, function: str) -> Iterator[None]:
        """Serialise (unless the plugin is parallel) and turn its failures into OSErrors."""
        with self._lock if self._lock is not None else nullcontext():
            try:
                yield
            except OSError as exc:
                if exc.errno is None:
                    raise OSError(errno.EIO, f"plugin {self._name} {function}: {exc}") from exc
                raise
            except Exception as exc:  # logged once, by the edge, with the request it failed
                raise OSError(errno.EIO, f"plugin {self._name} {function}: {exc!r}") from exc

    def _call(self, function: str, *args: object) -> Any:
        with self._calling(function):
            return self._function(function)(self._handle, *args)

    # -- the Backend interface -------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def pread(self, buf: memoryview, offset: int) -> None:
        got = self._call("pread", buf, offset)
        if got is None:
            return
        if not isinstance(got, bytes | bytearray | memoryview) or len(got) != len(buf):
            message = (
                f"plugin {self._name} pread returned {type(got).__name__}, not {len(buf)} bytes"
            )
            raise OSError(errno.EIO, message)
        buf[:] = got

    def pwrite(self, data: memoryview | bytes, offset: int, fua: bool) -> None:
        self._call("pwrite", data, offset)
        if fua:
            self.flush()

    def flush(self) -> None:
        if self.can_flush:
            self._call("flush")

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._call("trim", offset, length)
        if fua:
            self.flush()

    def zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast:
            raise OSError(errno.ENOTSUP, "a plugin's zero is not known to be fast")
        self._call("zero", offset, length)
        if fua:
            self.flush()

    def extents(self, offset: int, length: int) -> list[Extent]:
        if not self.can_extents:
            return [Extent(length, 0)]  # all data, as the core answers for any such backend
        try:
            raw = list(self._call("extents", offset, length))
            out = [Extent(int(n), int(flags) & 3) for n, flags in raw]
        except OSError:
            raise
        except (TypeError, ValueError) as exc:
            raise OSError(errno.EIO, f"plugin {self._name} extents: {exc!r}") from exc
        if not out or any(e.length <= 0 for e in out):
            raise OSError(errno.EIO, f"plugin {self._name} extents: empty or zero-length")
        return _clip(out, length)

    def close(self) -> None:
        if self._has("close"):
            try:
                self._call("close")
            except OSError as exc:
                log.warning("plugin %s: close failed: %s", self._name, exc)


def _clip(extents: list[Extent], length: int) -> list[Extent]:
    """The extents that start inside ``length`` (the last one cut to end there)."""
    out, pos = [], 0
    for e in extents:
        if pos >= length:
            break
        out.append(Extent(min(e.length, length - pos), e.flags))
        pos += e.length
    return out


def open_plugin(path: str | None, size: int | None, read_only: bool,
                params: tuple[tuple[str, str], ...] = ()) -> Backend:  # fmt: skip
    """The plugin ``path`` names (see ``load_plugin``), configured with ``params``, opened."""
    assert path is not None
    plugin = load_plugin(path)
    configure(plugin, path, params)
    return PluginBackend(plugin, path, read_only, size)


KIND = BackendKind("plugin", open_plugin, claims=lambda path: False, takes_params=True)
