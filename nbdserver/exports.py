"""Export configuration: what an export is (name, image, size, options) and how it is opened.

``ExportConfig`` is plain data, built by the CLI (or a config-file parser) and validated here.
``open_export`` turns it into a live ``Export``: the backend, wrapped by filters, plus the
per-export connection accounting. This module must not do network I/O.

Hook points for later features: new per-export options go into ``ExportConfig`` and
``_OPTIONS``; filters (copy-on-write, rate limits) wrap the backend in ``wrap_backend``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nbdserver.backends.base import Backend
from nbdserver.backends.block import BlockDeviceBackend, is_block_device
from nbdserver.backends.file import FileBackend
from nbdserver.backends.memory import MemoryBackend
from nbdserver.errors import ConfigError
from nbdserver.filters.chain import Caps, wrap_export
from nbdserver.filters.qos import QosLimits
from nbdserver.protocol.constants import NBD_MAX_STRING

BACKEND_KINDS = ("auto", "file", "block", "memory")
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


@dataclass
class ExportConfig:
    name: str
    path: str | None = None  # None only for the memory backend
    size: int | None = None  # create (sparse) or grow to this size; never shrink
    read_only: bool = False
    description: str = ""
    backend: str = "auto"
    connections: int = 0  # per-export connection limit, 0 = unlimited
    idle_timeout: float = 0.0  # seconds without a request before transmission ends, 0 = never
    # Room for security and quality-of-service features (wired by their own modules).
    tls: bool = False
    allowed_clients: list[str] = field(default_factory=list)
    copy_on_write: bool = False
    qos: dict[str, Any] = field(default_factory=dict)
    cow_dir: str | None = None  # where the copy-on-write overlay lives (default: temp dir)
    cow_persistent: bool = False  # the overlay outlives the process (in cow_dir, see cow_map)
    # Advertised capabilities that may be switched off (nbd-server's trim/flush/fua keys).
    caps: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if len(self.name.encode()) > NBD_MAX_STRING:
            raise ConfigError(f"export name longer than {NBD_MAX_STRING} bytes")
        if len(self.description.encode()) > NBD_MAX_STRING:
            raise ConfigError(f"description of {self.name!r} longer than {NBD_MAX_STRING} bytes")
        if self.backend not in BACKEND_KINDS:
            raise ConfigError(f"unknown backend {self.backend!r}; one of {BACKEND_KINDS}")
        if self.backend == "memory":
            if not self.size:
                raise ConfigError(f"memory export {self.name!r} needs a size")
        elif not self.path:
            raise ConfigError(f"export {self.name!r} needs an image path")
        if self.size is not None and self.size < 0:
            raise ConfigError("size must not be negative")
        if self.connections < 0:
            raise ConfigError("connection limit must not be negative")
        if self.cow_persistent and not (self.copy_on_write and self.cow_dir):
            raise ConfigError(
                f"a persistent overlay for {self.name!r} needs copy-on-write and a cow dir"
            )
        if not 0 <= self.idle_timeout < 1e9:  # also refuses NaN and infinity
            raise ConfigError(f"idle timeout of {self.name!r} must be 0 (none) or seconds > 0")


def parse_size(text: str) -> int:
    """'1G', '512M', '4096', '1.5G', '2GiB' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([BKMGTP]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise ConfigError(f"bad size {text!r}: use bytes or a number with K, M, G or T")
    value = float(m.group(1)) * _UNITS[m.group(2)]
    if value != int(value):
        raise ConfigError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def _bool(text: str) -> bool:
    if text.lower() in ("", "1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"bad boolean {text!r}")


# option key in "--export NAME=PATH,key=value" -> (ExportConfig field, converter)
_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "size": ("size", parse_size),
    "ro": ("read_only", _bool),
    "read-only": ("read_only", _bool),
    "readonly": ("read_only", _bool),
    "description": ("description", str),
    "backend": ("backend", str),
    "connections": ("connections", int),
    "idle-timeout": ("idle_timeout", float),
    "tls": ("tls", _bool),
    "cow": ("copy_on_write", _bool),
    "copy-on-write": ("copy_on_write", _bool),
}


_QOS_OPTIONS = ("qos-read-bps", "qos-write-bps", "qos-read-iops", "qos-write-iops")


def parse_export_spec(spec: str) -> ExportConfig:
    """Parse ``NAME=PATH[,key=value...]``; PATH may be ``memory`` (with ``size=``)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ConfigError(f"bad --export {spec!r}: expected NAME=PATH[,key=value...]")
    path, *opts = rest.split(",")
    cfg = ExportConfig(name=name, path=path or None)
    if path == "memory":
        cfg.path, cfg.backend = None, "memory"
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "allow":
            cfg.allowed_clients.append(value)
            continue
        if key in _QOS_OPTIONS:  # qos-read-bps=N etc.: this export's own rate limits
            if not value.isdigit():
                raise ConfigError(f"bad value for {key!r} in {spec!r}: expected an integer")
            cfg.qos[key[4:].replace("-", "_")] = int(value)
            continue
        if key == "cow-dir":
            cfg.cow_dir = value
            continue
        if key not in _OPTIONS:
            raise ConfigError(f"unknown export option {key!r} in {spec!r}")
        attr, conv = _OPTIONS[key]
        try:
            setattr(cfg, attr, conv(value))
        except ValueError as e:
            raise ConfigError(f"bad value for {key!r} in {spec!r}: {e}") from None
    cfg.validate()
    return cfg


def prepare_image(path: str, size: int | None) -> None:
    """Create a sparse image of ``size`` when absent; grow a smaller one; never shrink."""
    if size is None or is_block_device(path):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        current = os.fstat(fd).st_size
        if size < current:
            raise ConfigError(
                f"{path} is {current} bytes; refusing to shrink it to {size} (data would be lost)"
            )
        if size > current:
            os.ftruncate(fd, size)  # sparse: no blocks are allocated
    finally:
        os.close(fd)


def open_backend(cfg: ExportConfig) -> Backend:
    kind = cfg.backend
    if kind == "memory":
        assert cfg.size is not None
        return MemoryBackend(cfg.size, read_only=cfg.read_only)
    # Copy-on-write never writes the base: open it read-only so it cannot.
    base_ro = cfg.read_only or cfg.copy_on_write
    assert cfg.path is not None
    if kind == "auto":
        kind = "block" if is_block_device(cfg.path) else "file"
    if kind == "block":
        backend: Backend = BlockDeviceBackend(cfg.path, read_only=base_ro)
        if cfg.size is not None and cfg.size != backend.size():
            backend.close()
            raise ConfigError(f"{cfg.path} is {backend.size()} bytes, not the {cfg.size} asked")
        return backend
    if not (cfg.copy_on_write and os.path.exists(cfg.path)):  # never grow a cow base
        prepare_image(cfg.path, cfg.size)
    if not os.path.exists(cfg.path):
        raise ConfigError(f"{cfg.path} does not exist (give --size to create it)")
    return FileBackend(cfg.path, read_only=base_ro)


def wrap_backend(backend: Backend, cfg: ExportConfig) -> Backend:
    """Filters (copy-on-write, rate limits, ...) wrap the backend here, outermost last."""
    if not (cfg.copy_on_write or cfg.qos or cfg.caps):
        return backend
    return wrap_export(
        backend,
        copy_on_write=cfg.copy_on_write,
        cow_dir=cfg.cow_dir,
        cow_path=cow_overlay_path(cfg) if cfg.cow_persistent else None,
        caps=Caps(**cfg.caps) if cfg.caps else None,
        qos=QosLimits(**cfg.qos) if cfg.qos else None,
    )


def cow_overlay_path(cfg: ExportConfig) -> str:
    """Where a persistent overlay of this export lives: one file per export name."""
    assert cfg.cow_dir is not None
    return os.path.join(cfg.cow_dir, urllib.parse.quote(cfg.name, safe="") + ".cow")


class Export:
    """A live export: its configuration, its backend, and who is connected to it."""

    def __init__(self, config: ExportConfig, backend: Backend) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self._lock = threading.Lock()
        self.active = 0

    @property
    def read_only(self) -> bool:
        return self.config.read_only or not self.backend.can_write

    def try_attach(self) -> bool:
        """Count one more connection, unless the export's limit is reached."""
        with self._lock:
            if self.config.connections and self.active >= self.config.connections:
                return False
            self.active += 1
            return True

    def detach(self) -> None:
        with self._lock:
            self.active -= 1


def open_export(cfg: ExportConfig) -> Export:
    cfg.validate()
    try:
        backend = open_backend(cfg)
    except OSError as e:
        raise ConfigError(f"cannot open {cfg.path}: {e.strerror}") from None
    try:
        return Export(cfg, wrap_backend(backend, cfg))
    except (OSError, ValueError) as e:
        backend.close()
        raise ConfigError(f"cannot open the overlay of {cfg.name!r}: {e}") from None


def replace(cfg: ExportConfig, **changes: Any) -> ExportConfig:
    return dataclasses.replace(cfg, **changes)
