"""The one assembly step: layers in, one frozen ``ServerConfig`` out.

The one precedence rule: **flags over file over defaults**, field by field (a flag counts as
given only when it was given: every flag defaults to None). Export-wide flags (``--read-only``,
``--copy-on-write``, ``--cow-dir``, ``--qos-*``, ``--idle-timeout``) apply to every export,
whichever source it came from; an export's own setting wins over them, except that
``--read-only`` can only ever add read-only.

What it must not do: open images or sockets, or look at the file system (opening exports finds
a missing ``--cow-dir`` and says so in one line).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TypeVar

from nbdserver.backends.registry import NAMES as BACKENDS
from nbdserver.config import flags, nbdfile
from nbdserver.config.model import CowMode, ExportConfig, Layer, ServerConfig, TlsMode
from nbdserver.errors import ConfigError

T = TypeVar("T")
_DEFAULTS = ServerConfig(exports=())


def pick(*values: T | None, default: T) -> T:
    """The first value given (not None), else ``default``: the precedence rule itself."""
    return next((v for v in values if v is not None), default)


def _export(e: ExportConfig, flag: Layer) -> ExportConfig:
    return dataclasses.replace(
        e,
        read_only=e.read_only or bool(flag.read_only),
        cow=e.cow if e.cow is not CowMode.OFF else pick(flag.cow, default=CowMode.OFF),
        cow_dir=pick(e.cow_dir, flag.cow_dir, default=None),
        qos=pick(e.qos, flag.qos, default=None),
        idle_timeout=e.idle_timeout or pick(flag.idle_timeout, default=0.0),
    )


def assemble(flag: Layer, file: Layer | None, config_file: str | None = None) -> ServerConfig:
    """Merge the command line's layer over the config file's (if any) over the defaults."""
    f = file or Layer()
    d = _DEFAULTS
    exports = tuple(_export(e, flag) for e in (*flag.exports, *f.exports))
    for e in exports:
        e.validate(BACKENDS)
    if not exports and config_file is None:
        raise ConfigError("nothing to serve: give IMAGE or --export NAME=PATH")
    names = [e.name for e in exports]
    if len(set(names)) != len(names):
        raise ConfigError(f"duplicate export names in {names}")
    unix = pick(flag.unix, f.unix, default=None)
    # An explicit --port asks for TCP even when the file's unixsock alone would mean none.
    no_tcp = pick(flag.no_tcp, False if flag.port is not None else None, f.no_tcp, default=False)
    bind = pick(flag.bind, f.bind, default=d.bind)
    tls = pick(flag.tls, f.tls, default=d.tls)
    if flag.tls is not None and f.tls is not None:  # flags fill in over the file's files
        tls = dataclasses.replace(
            flag.tls,
            certfile=pick(flag.tls.certfile, f.tls.certfile, default=None),
            keyfile=pick(flag.tls.keyfile, f.tls.keyfile, default=None),
            cafile=pick(flag.tls.cafile, f.tls.cafile, default=None),
        )
    if tls.mode is TlsMode.OFF and (tls.certfile or tls.cafile):
        raise ConfigError("TLS files given but --tls off")
    if any(e.tls for e in exports) and tls.mode is TlsMode.OFF:
        raise ConfigError("an export is TLS-only but TLS is off (give --tls and certificates)")
    port = pick(flag.port, f.port, default=d.port)
    metrics_port = pick(flag.metrics_port, f.metrics_port, default=None)
    if metrics_port and not no_tcp and metrics_port == port:
        raise ConfigError(f"--metrics-port {metrics_port} is the NBD port; give another")
    return ServerConfig(
        exports=exports,
        bind=bind,
        port=None if no_tcp else port,
        unix=unix,
        max_connections=pick(flag.max_connections, f.max_connections, default=d.max_connections),
        max_handshakes=pick(flag.max_handshakes, f.max_handshakes, default=d.max_handshakes),
        handshake_timeout=pick(
            flag.handshake_timeout, f.handshake_timeout, default=d.handshake_timeout
        ),
        shutdown_timeout=pick(
            flag.shutdown_timeout, f.shutdown_timeout, default=d.shutdown_timeout
        ),
        workers=pick(flag.workers, f.workers, default=d.workers),
        tls=tls,
        allow=pick(flag.allow, f.allow, default=None),
        list_allowed=pick(flag.list_allowed, f.list_allowed, default=d.list_allowed),
        single_writer=pick(flag.single_writer, f.single_writer, default=d.single_writer),
        metrics_port=metrics_port,
        metrics_bind=pick(flag.metrics_bind, f.metrics_bind, default=bind),  # follows --bind
        user=pick(flag.user, f.user, default=None),
        group=pick(flag.group, f.group, default=None),
        config_file=config_file,
    )


def read_file(path: str | None) -> Layer | None:
    return None if path is None else nbdfile.read_layer(path)


def assemble_from_argv(argv: Sequence[str]) -> ServerConfig:
    """``nbdserver serve ARGV`` as a configuration (what the CLI runs, for tests and tools)."""
    args = flags.build_parser().parse_args(["serve", *argv])
    return assemble(flags.read_layer(args), read_file(args.config), args.config)
