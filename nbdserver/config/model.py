"""The server's configuration as one frozen, typed value: what every reader produces and what
the server, the edge and the policy parts read.

Why: settings used to arrive four ways and be merged in two places, as dicts and mutable objects
patched after the fact. Here there is one shape; ``nbdserver.config.assemble`` builds it once,
and a reload (SIGHUP) builds a new one instead of editing the old.

What it must not do: read files, parse text or decide precedence (the readers and the assembly
step do), or hold anything mutable.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from nbdserver.acl import Acl
from nbdserver.backends.registry import is_remote
from nbdserver.errors import ConfigError
from nbdserver.filters.qos import QosLimits
from nbdserver.formats.registry import NAMES as FORMAT_NAMES
from nbdserver.protocol.constants import NBD_DEFAULT_PORT, NBD_MAX_STRING


class CowMode(enum.Enum):
    """Where a copy-on-write export's writes go, and how long they live.

    ``connection``: an overlay per connection, dropped when it disconnects (nbd-server's
    ``copyonwrite``). ``shared``: one overlay for every connection, gone when the process exits.
    ``persistent``: one overlay in ``cow_dir`` that survives restarts (a writable clone).
    """

    OFF = "off"
    CONNECTION = "connection"
    SHARED = "shared"
    PERSISTENT = "persistent"


class TlsMode(enum.Enum):
    """``off``: STARTTLS is refused. ``on``: offered. ``require``: nothing but STARTTLS and
    ABORT is allowed before TLS is up."""

    OFF = "off"
    ON = "on"
    REQUIRE = "require"


@dataclass(frozen=True)
class TlsSettings:
    mode: TlsMode = TlsMode.OFF
    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None  # given: client certificates are required and verified
    pskfile: str | None = None

    @property
    def mutual(self) -> bool:
        return self.cafile is not None


@dataclass(frozen=True)
class Caps:
    """Advertised capabilities an export switches off (nbd-server's trim/flush/fua keys), or
    rotational switched on; a switch can only take away what the backend has."""

    trim: bool = True
    flush: bool = True
    fua: bool = True
    rotational: bool | None = None

    @property
    def default(self) -> bool:
        return self.trim and self.flush and self.fua and self.rotational is None


@dataclass(frozen=True)
class ExportConfig:
    """One export. ``path`` may hold ``%s`` (replaced by the client's address when it connects,
    nbd-server's ``virtstyle = ipliteral``); ``temporary`` serves an unlinked scratch file made
    next to ``path``."""

    name: str
    path: str | None = None  # None only for the memory backend
    size: int | None = None  # create (sparse) or grow to this size; a read-only view otherwise
    read_only: bool = False
    description: str = ""
    backend: str = "auto"
    connections: int = 0  # per-export connection limit, 0 = unlimited
    idle_timeout: float = 0.0  # seconds without a request before transmission ends, 0 = never
    tls: bool = False  # served only over TLS
    acl: Acl | None = None  # the export's own allow list; None: everyone
    cow: CowMode = CowMode.OFF
    cow_dir: str | None = None
    qos: QosLimits | None = None
    caps: Caps | None = None  # capabilities switched off (nbd-server's trim/flush/fua keys)
    temporary: bool = False
    # None: raw, and an image whose header names a format is refused (never probed into one)
    format: str | None = None
    backing_anywhere: bool = False  # a qcow2 backing file may lie outside the image's directory
    cache_size: int = 0  # bytes of read cache (nbdserver.filters.cache); 0 = none
    cache_dir: str | None = None  # the read cache's blocks in a file here; None: in memory
    ca_bundle: str | None = None  # verifies an https:// image; None: the system's CA store
    remote_timeout: float = 30.0  # seconds one read of a URL may take, retries included
    s3_endpoint: str | None = None  # an S3-compatible store; None: AWS_ENDPOINT_URL or AWS
    # a plugin's key=value parameters, in order (its config(key, value) calls)
    plugin_params: tuple[tuple[str, str], ...] = ()

    @property
    def remote(self) -> bool:
        """The image is a URL (http://, https://, s3://), read by a remote backend."""
        return self.path is not None and is_remote(self.path)

    @property
    def per_client(self) -> bool:
        return (
            self.path is not None and "%s" in self.path and not self.temporary and not self.remote
        )

    def validate(self, known_backends: tuple[str, ...]) -> None:
        if len(self.name.encode()) > NBD_MAX_STRING:
            raise ConfigError(f"export name longer than {NBD_MAX_STRING} bytes")
        if len(self.description.encode()) > NBD_MAX_STRING:
            raise ConfigError(f"description of {self.name!r} longer than {NBD_MAX_STRING} bytes")
        if self.backend not in known_backends:
            raise ConfigError(f"unknown backend {self.backend!r}; one of {known_backends}")
        if self.backend == "memory":
            if not self.size:
                raise ConfigError(f"memory export {self.name!r} needs a size")
        elif not self.path:
            raise ConfigError(f"export {self.name!r} needs an image path")
        if self.size is not None and self.size < 0:
            raise ConfigError("size must not be negative")
        if self.temporary and not self.size:
            raise ConfigError(f"temporary export {self.name!r} needs a size (filesize)")
        if self.connections < 0:
            raise ConfigError("connection limit must not be negative")
        if not 0 <= self.idle_timeout < 1e9:  # also refuses NaN and infinity
            raise ConfigError(f"idle timeout of {self.name!r} must be 0 (none) or seconds > 0")
        self._validate_format()
        self._validate_remote()
        if self.plugin_params and self.backend != "plugin":
            raise ConfigError(
                f"export {self.name!r}: key=value parameters are for a plugin (--plugin)"
            )
        if self.cow is CowMode.PERSISTENT and not self.cow_dir:
            raise ConfigError(f"persistent copy-on-write of {self.name!r} needs --cow-dir")

    def _validate_remote(self) -> None:
        if self.cache_size < 0:
            raise ConfigError(f"cache size of {self.name!r} must not be negative")
        if self.cache_dir is not None and not self.cache_size:
            raise ConfigError(f"--cache-dir of {self.name!r} needs --cache-size (its bound)")
        if self.cache_dir is not None and not os.path.isdir(self.cache_dir):
            raise ConfigError(f"--cache-dir {self.cache_dir}: not a directory")
        if not (0 < self.remote_timeout < 1e9):
            raise ConfigError(f"remote timeout of {self.name!r} must be seconds > 0")
        if not self.remote:
            return
        if self.size is not None or self.temporary:
            raise ConfigError(f"export {self.name!r}: a URL is never created or grown (no --size)")

    def _validate_format(self) -> None:
        if self.format is None or self.format == "raw":
            return
        if self.format not in FORMAT_NAMES:
            raise ConfigError(f"unknown format {self.format!r}; one of {FORMAT_NAMES}")
        if self.backend == "memory" or self.temporary:
            raise ConfigError(f"export {self.name!r}: --format {self.format} needs an image file")
        if self.size is not None:
            raise ConfigError(
                f"export {self.name!r}: --size does not apply to a {self.format} image "
                f"(qemu-img create or resize makes one)"
            )


@dataclass(frozen=True)
class ServerConfig:
    exports: tuple[ExportConfig, ...]
    bind: str | None = None  # None: every address, IPv6 and IPv4 (dual-stack)
    port: int | None = NBD_DEFAULT_PORT  # None: no TCP listener (unix socket only)
    unix: str | None = None
    max_connections: int = 256  # connections past the handshake; 0 = unlimited
    max_handshakes: int = 64  # handshakes in progress; the longest silent one is evicted
    handshake_timeout: float = 10.0  # the longest a client may take to complete one option
    shutdown_timeout: float = 30.0  # then connections still busy are cut
    workers: int = 4  # pool for FLUSH, TRIM, WRITE_ZEROES, CACHE
    tls: TlsSettings = TlsSettings()
    allow: Acl | None = None  # server-wide allow list; None: everyone
    list_allowed: bool = True  # may clients NBD_OPT_LIST?
    single_writer: bool = False
    metrics_port: int | None = None
    metrics_bind: str | None = None  # None: every address, as ``bind``
    user: str | None = None  # drop to this user once every file and socket is open
    group: str | None = None
    config_file: str | None = None  # re-read on SIGHUP

    def export(self, name: str) -> ExportConfig | None:
        return next((e for e in self.exports if e.name == name), None)


@dataclass(frozen=True)
class Layer:
    """What one source (the command line, or an nbd-server file) says; None: it says nothing.

    ``nbdserver.config.assemble`` merges layers into a ``ServerConfig`` by one rule. The
    export-wide fields (``read_only`` to ``idle_timeout``) apply to every export.
    """

    exports: tuple[ExportConfig, ...] = ()
    bind: str | None = None
    port: int | None = None
    no_tcp: bool | None = None
    unix: str | None = None
    max_connections: int | None = None
    max_handshakes: int | None = None
    handshake_timeout: float | None = None
    shutdown_timeout: float | None = None
    workers: int | None = None
    tls: TlsSettings | None = None
    allow: Acl | None = None
    list_allowed: bool | None = None
    single_writer: bool | None = None
    metrics_port: int | None = None
    metrics_bind: str | None = None
    user: str | None = None
    group: str | None = None
    read_only: bool | None = None
    cow: CowMode | None = None
    cow_dir: str | None = None
    qos: QosLimits | None = None
    idle_timeout: float | None = None
