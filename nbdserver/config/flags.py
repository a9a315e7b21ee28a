"""Reader for the ``nbdserver serve`` command line: the parser, and the ``Layer`` it gives.

Why: flags are the first of the three sources; every flag defaults to None so that "given" means
given (an explicit ``--port 10809`` wins over a config file's port, which a default could not
tell apart). Defaults live in ``nbdserver.config.model``, applied by the assembly step.

What it must not do: merge with other sources, or open anything.
"""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from nbdserver import __version__
from nbdserver.acl import Acl, AclError
from nbdserver.backends.registry import NAMES as BACKENDS
from nbdserver.config.model import CowMode, ExportConfig, Layer, TlsMode, TlsSettings
from nbdserver.config.specs import parse_export_spec, parse_size
from nbdserver.errors import ConfigError
from nbdserver.filters.qos import QosLimits
from nbdserver.formats.registry import NAMES as FORMATS

_QOS = ("read_bps", "write_bps", "read_iops", "write_iops")


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "image",
        nargs="*",
        metavar="IMAGE | KEY=VALUE",
        help="image file, block device, http(s):// or s3:// URL to serve; with --plugin (or "
        "--backend plugin IMAGE), KEY=VALUE parameters for the plugin's config()",
    )
    s.add_argument("--name", default="", help='export name of IMAGE (default "")')
    s.add_argument(
        "--size",
        help="create IMAGE sparse with this size (1G, 512M, bytes) if "
        "absent; grow, never shrink (read-only: serve only the first SIZE bytes)",
    )
    s.add_argument(
        "--read-only", "-r", action="store_true", default=None, help="refuse writes to every export"
    )
    s.add_argument("--description", default="", help="export description shown to clients")
    s.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="auto picks block for devices, else file; memory needs --size",
    )
    s.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        help="IMAGE's format (default raw; an image whose header names another format is "
        "refused unless this names it)",
    )
    # -- plugins (nbdserver.backends.plugin) ----------------------------------------------
    s.add_argument(
        "--plugin",
        metavar="FILE.py|MODULE:ATTR|NAME",
        help="serve a Python plugin (a file, a module's attribute, or an installed "
        "nbdserver.plugins entry point); KEY=VALUE arguments go to its config()",
    )
    s.add_argument(
        "--backing-anywhere",
        action="store_true",
        help="a qcow2 IMAGE's backing files may lie outside its directory",
    )
    s.add_argument(
        "--cache-size",
        metavar="SIZE",
        help="keep up to SIZE (256M) of IMAGE's reads in memory, in 1M blocks (for URLs)",
    )
    s.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="keep the --cache-size blocks in a file in DIR instead of memory",
    )
    s.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="CA certificates (PEM) verifying an https:// IMAGE (default: the system's)",
    )
    s.add_argument(
        "--remote-timeout",
        type=float,
        metavar="S",
        help="seconds one read of a URL may take, retries included, before EIO (default 30)",
    )
    s.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="an S3-compatible store for an s3:// IMAGE (default: $AWS_ENDPOINT_URL, else AWS)",
    )
    s.add_argument(
        "--connections",
        type=int,
        default=0,
        help="per-export connection limit for IMAGE (0 = none)",
    )
    s.add_argument(
        "--export",
        "-e",
        action="append",
        default=[],
        metavar="NAME=PATH[,opt=val...]",
        help="another export (PATH memory: RAM); opts: size, ro, description, backend, format, "
        "backing-anywhere, cache-size, cache-dir, ca-bundle, remote-timeout, s3-endpoint, "
        "connections, idle-timeout, tls, cow, cow-dir, allow, qos-*, plugin.KEY (a plugin's "
        "parameter)",
    )
    s.add_argument(
        "--bind", "-b", help="address to listen on (default: every address, IPv6 and IPv4)"
    )
    s.add_argument("--port", "-p", type=int, help="TCP port (default 10809; 0 = any free port)")
    s.add_argument("--unix", "-u", metavar="PATH", help="also listen on a unix socket")
    s.add_argument(
        "--no-tcp", action="store_true", default=None, help="no TCP listener (with --unix)"
    )
    s.add_argument(
        "--max-connections", type=int, help="connections past the handshake (default 256; 0 = none)"
    )
    s.add_argument(
        "--max-handshakes",
        type=int,
        metavar="N",
        help="handshakes in progress (default 64); past it the longest silent one is dropped",
    )
    s.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        help="seconds a client may take over one handshake option (default 10)",
    )
    s.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="end a connection after S seconds without a request (0 = never; per "
        "export: idle-timeout=S)",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="S",
        help="seconds to let connections finish on SIGTERM (default 30)",
    )
    s.add_argument("--workers", type=int, help="threads for FLUSH/TRIM/WRITE_ZEROES (default 4)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = s.add_argument_group("security and operations (docs/security.md)")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="read exports and settings from an "
        "nbd-server(5) config file (flags win; SIGHUP re-reads it)",
    )
    g.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        help="STARTTLS: off (default), on (offered) or require",
    )
    g.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    g.add_argument(
        "--tls-ca", metavar="FILE", help="CA for client certificates: turns on mutual TLS"
    )
    g.add_argument(
        "--tls-psk", metavar="FILE", help="TLS-PSK keys (identity:hexkey); needs Python >= 3.13"
    )
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="CIDR",
        help="admit only these client networks (repeatable; IPv4 or IPv6); "
        "per export: --export NAME=PATH,allow=CIDR",
    )
    g.add_argument(
        "--copy-on-write",
        nargs="?",
        const="shared",
        metavar="MODE",
        choices=[m.value for m in CowMode if m is not CowMode.OFF],
        help="writes go to an overlay, the image is never written: connection (one "
        "per connection, dropped at disconnect), shared (the default: one for all, "
        "for the process) or persistent (in --cow-dir, survives restarts)",
    )
    g.add_argument("--cow-dir", metavar="DIR", help="where overlays live (default: $TMPDIR)")
    g.add_argument(
        "--single-writer",
        action="store_true",
        default=None,
        help="one client host may write; the others get the export read-only",
    )
    g.add_argument("--no-list", action="store_true", default=None, help="refuse NBD_OPT_LIST")
    for key in _QOS:
        unit = "bytes/s" if key.endswith("bps") else "operations/s"
        g.add_argument(
            f"--qos-{key.replace('_', '-')}",
            type=int,
            default=0,
            metavar="N",
            help=f"per-export limit in {unit} (0 = none)",
        )
    g.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on http://ADDR:PORT/metrics",
    )
    g.add_argument("--metrics-bind", metavar="ADDR",
                   help="address of the metrics endpoint (default: as --bind)")  # fmt: skip


# -- nbdserver import (the operator's import Job runs exactly this command line)


def add_import_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", metavar="SOURCE", help="http(s):// or s3://BUCKET/KEY URL, or a file")
    s.add_argument("dest", metavar="DEST", help="file to create, or an existing block device")
    s.add_argument(
        "--format",
        "-f",
        choices=FORMATS,
        default="raw",
        help="SOURCE's format (default raw; a header naming another format is refused)",
    )
    s.add_argument(
        "--output-format",
        choices=("raw", "same"),
        default="same",
        help="same (default): SOURCE's bytes verbatim; raw: its disk, converted locally",
    )
    s.add_argument("--sha256", metavar="HEX", help="SHA-256 of SOURCE's bytes, checked at the end")
    s.add_argument(
        "--progress",
        nargs="?",
        const="bar",
        choices=("bar", "json"),
        help="a bar on a terminal's stderr (default), or JSON lines on stdout (a bare "
        "--progress goes after SOURCE DEST, or it takes SOURCE for its value)",
    )
    s.add_argument(
        "--work-dir",
        metavar="DIR",
        help="staging and (for a block device DEST) the resume record (default: DEST's dir)",
    )
    s.add_argument("--ca-bundle", metavar="FILE", help="CA certificates (PEM) for https://")
    s.add_argument("--s3-endpoint", metavar="URL", help="an S3-compatible store for s3://")
    s.add_argument(
        "--remote-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds one request may take, retries included (default 30)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


class _Parser(argparse.ArgumentParser):
    """Refusals are one line naming the flag, exit 2, as every other configuration error."""

    def error(self, message: str) -> NoReturn:
        where = self.prog if " " in self.prog else "nbdserver serve"  # a subcommand's own
        self.exit(2, f"nbdserver: {message} (see {where} --help)\n")


class _ServeParser(_Parser):
    """Positionals may come between flags (``--plugin F.py k=v --port 0 k2=v2``): argparse
    alone stops taking a ``*`` positional at the first flag after it."""

    _inner = False

    def parse_known_args(  # type: ignore[override]
        self, args: list[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nbdserver", description="An NBD (network block device) server.")
    p.add_argument("--version", action="version", version=f"nbdserver {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_ServeParser)
    serve = sub.add_parser(
        "serve",
        help="serve disk images over NBD",
        description="Serve IMAGE (a file or a block device) and/or the --export entries.",
    )
    add_arguments(serve)
    imp = sub.add_parser(
        "import",
        help="copy an image from a URL or file into a file or block device",
        description="Import SOURCE into DEST, resumably (DEST.import.json), verified, with "
        "progress.",
    )
    add_import_arguments(imp)
    return p


def _image_and_params(args: argparse.Namespace) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """IMAGE (or the --plugin) and the plugin's KEY=VALUE parameters, from the positionals."""
    words: list[str] = list(args.image)
    if args.plugin is not None:
        if args.backend not in ("auto", "plugin"):
            raise ConfigError(f"--plugin and --backend {args.backend} exclude each other")
        args.backend = "plugin"
        image = args.plugin
    else:
        image = words.pop(0) if words else None
    if words and args.backend != "plugin":
        raise ConfigError(f"one IMAGE only (KEY=VALUE arguments are for --plugin): {words[0]!r}")
    params = []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise ConfigError(f"plugin argument {word!r} is not KEY=VALUE")
        params.append((key, value))
    return image, tuple(params)


def _image_export(args: argparse.Namespace) -> tuple[ExportConfig, ...]:
    image, params = _image_and_params(args)
    if image is None and args.backend != "memory":
        return ()
    cfg = ExportConfig(
        name=args.name,
        path=None if args.backend == "memory" else image,
        plugin_params=params,
        size=parse_size(args.size) if args.size else None,
        description=args.description,
        backend=args.backend,
        connections=args.connections,
        format=args.format,
        backing_anywhere=args.backing_anywhere,
        cache_size=parse_size(args.cache_size) if args.cache_size else 0,
        cache_dir=args.cache_dir,
        ca_bundle=args.ca_bundle,
        remote_timeout=args.remote_timeout if args.remote_timeout is not None else 30.0,
        s3_endpoint=args.s3_endpoint,
    )
    cfg.validate(BACKENDS)
    return (cfg,)


def _check(args: argparse.Namespace) -> None:
    """Value checks that need no file system; each names its flag."""
    if args.port is not None and not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {args.metrics_port} is not a TCP port (0-65535)")
    for flag in ("idle_timeout", "handshake_timeout", "shutdown_timeout"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and 0 <= value < 1e9):
            raise ConfigError(f"--{flag.replace('_', '-')} must be a number of seconds")
    if args.handshake_timeout is not None and args.handshake_timeout <= 0:
        raise ConfigError("--handshake-timeout must be positive")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    for flag in ("max_connections", "max_handshakes", "connections"):
        if (getattr(args, flag) or 0) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must not be negative")
    if args.max_handshakes == 0:
        raise ConfigError("--max-handshakes must be at least 1")
    if args.no_tcp and not args.unix:
        raise ConfigError("--no-tcp needs --unix")


def _tls(args: argparse.Namespace) -> TlsSettings | None:
    if args.tls is None and not (args.tls_cert or args.tls_key or args.tls_ca or args.tls_psk):
        return None
    mode = TlsMode(args.tls) if args.tls else TlsMode.ON
    return TlsSettings(mode, args.tls_cert, args.tls_key, args.tls_ca, args.tls_psk)


def read_layer(args: argparse.Namespace) -> Layer:
    """The settings the command line gives (None where a flag was not given)."""
    _check(args)
    qos = {k: getattr(args, f"qos_{k}") for k in _QOS if getattr(args, f"qos_{k}")}
    try:
        allow = Acl.from_rules(args.allow) if args.allow else None
    except AclError as exc:
        raise ConfigError(str(exc)) from None
    return Layer(
        exports=_image_export(args) + tuple(parse_export_spec(s) for s in args.export),
        bind=args.bind,
        port=args.port,
        no_tcp=args.no_tcp,
        unix=args.unix,
        max_connections=args.max_connections,
        max_handshakes=args.max_handshakes,
        handshake_timeout=args.handshake_timeout,
        shutdown_timeout=args.shutdown_timeout,
        workers=args.workers,
        tls=_tls(args),
        allow=allow,
        list_allowed=False if args.no_list else None,
        single_writer=args.single_writer,
        metrics_port=args.metrics_port,
        metrics_bind=args.metrics_bind,
        read_only=args.read_only,
        cow=CowMode(args.copy_on_write) if args.copy_on_write else None,
        cow_dir=args.cow_dir,
        qos=QosLimits(**qos) if qos else None,
        idle_timeout=args.idle_timeout,
    )
