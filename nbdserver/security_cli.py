"""Command-line options and nbd-server config files for the security and operations features.

Why: ``nbdserver.cli`` owns the ``serve`` command; this module adds the TLS, ACL, copy-on-write,
single-writer, QoS, metrics and ``--config`` options to it and turns them (plus an nbd-server
config file) into export settings and a ``Guard``. Keeping it here keeps cli.py to three calls.

What it must not do: start anything (the guard's metrics endpoint starts in ``serve``), or accept
a setting it cannot honour: every error becomes ``nbdserver.errors.ConfigError`` (exit 2) with
the file, flag or line at fault.
"""

from __future__ import annotations

import argparse
import logging

from nbdserver import nbdconfig
from nbdserver.acl import Acl, AclError
from nbdserver.errors import ConfigError
from nbdserver.exports import ExportConfig
from nbdserver.protocol.constants import NBD_DEFAULT_PORT
from nbdserver.security import Guard, SecurityOptions
from nbdserver.tls import TlsConfigError, TlsMode, TlsSettings

log = logging.getLogger("nbdserver")

_QOS = ("read_bps", "write_bps", "read_iops", "write_iops")


def add_arguments(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("security and operations (docs/security.md)")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="read exports and settings from an nbd-server(5) config file (command-line flags win)",
    )
    g.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        default=None,
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
        action="store_true",
        help="writes go to a private sparse overlay; the image is never written",
    )
    g.add_argument("--cow-dir", metavar="DIR", help="where the overlay lives (default: $TMPDIR)")
    g.add_argument(
        "--cow-persistent",
        action="store_true",
        help="keep the overlay in --cow-dir across restarts (EXPORT.cow + EXPORT.cow.map)",
    )
    g.add_argument(
        "--single-writer",
        action="store_true",
        help="one client host may write; the others get the export read-only",
    )
    g.add_argument("--no-list", action="store_true", help="refuse NBD_OPT_LIST")
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
        help="serve Prometheus metrics on http://BIND:PORT/metrics",
    )
    g.add_argument(
        "--metrics-bind",
        default="0.0.0.0",
        metavar="ADDR",
        help="address of the metrics endpoint (default 0.0.0.0)",
    )


def _file(args: argparse.Namespace) -> nbdconfig.NbdConfig | None:
    if not getattr(args, "config", None):
        return None
    cached = getattr(args, "_nbdconfig", None)
    if cached is None:
        try:
            cached = nbdconfig.load(args.config)
        except nbdconfig.ConfigError as exc:
            raise ConfigError(str(exc)) from None
        for warning in cached.warnings:
            log.warning("%s", warning)
        args._nbdconfig = cached
    return cached


def file_exports(args: argparse.Namespace) -> list[ExportConfig]:
    """The exports of ``--config FILE`` (none without it)."""
    conf = _file(args)
    if conf is None:
        return []
    out = []
    for e in conf.exports:
        caps = {"trim": e.trim, "flush": e.flush, "fua": e.fua, "rotational": e.rotational}
        cfg = ExportConfig(
            name=e.name,
            path=e.exportname,
            size=e.filesize,
            read_only=e.readonly,
            connections=e.maxconnections or 0,
            idle_timeout=float(e.timeout),
            tls=e.tlsonly,
            copy_on_write=e.copyonwrite,
            cow_dir=e.cowdir,
            caps=caps,
        )
        cfg.validate()
        out.append(cfg)
    return out


def finish(args: argparse.Namespace, config: object) -> Guard | None:
    """Apply the options to ``config`` (a ServerConfig) and build the guard (None: not needed)."""
    from nbdserver.server import ServerConfig  # the edge imports us; import it lazily

    assert isinstance(config, ServerConfig)
    conf = _file(args)
    file_acls: dict[str, Acl | None] = {}
    tls = TlsSettings()
    list_allowed = not args.no_list
    if conf is not None:
        g = conf.generic
        # The command line wins where it was given (differs from its default).
        if args.port == NBD_DEFAULT_PORT and config.port is not None:
            config.port = g.port
        if args.bind == "0.0.0.0":
            config.bind = g.listenaddr[0]
        if g.maxconnections:
            config.max_connections = g.maxconnections
        list_allowed = list_allowed and g.allowlist
        if conf.tls_enabled:
            mode = TlsMode.REQUIRE if g.force_tls else TlsMode.ON
            tls = TlsSettings(mode, g.certfile or g.keyfile, g.keyfile, g.cacertfile)
        file_acls = {e.name: e.acl for e in conf.exports}
    if args.tls is not None or args.tls_cert or args.tls_key or args.tls_ca or args.tls_psk:
        mode = TlsMode(args.tls) if args.tls else TlsMode.ON
        tls = TlsSettings(
            mode,
            args.tls_cert or tls.certfile,
            args.tls_key or tls.keyfile,
            args.tls_ca or tls.cafile,
            args.tls_psk,
        )
    if tls.mode is TlsMode.OFF and (tls.certfile or tls.cafile):
        raise ConfigError("TLS files given but --tls off")
    if any(e.tls for e in config.exports) and tls.mode is TlsMode.OFF:
        raise ConfigError("an export is TLS-only but TLS is off (give --tls and certificates)")
    config.tls_policy = tls.mode.value  # type: ignore[assignment]

    qos = {k: getattr(args, f"qos_{k}") for k in _QOS if getattr(args, f"qos_{k}")}
    for cfg in config.exports:
        if args.copy_on_write:
            cfg.copy_on_write = True
        if args.cow_dir:
            cfg.cow_dir = args.cow_dir
        if args.cow_persistent:
            cfg.cow_persistent = True
        if qos:
            cfg.qos = {**qos, **cfg.qos}
    try:
        export_acls = dict(file_acls)
        for cfg in config.exports:
            if cfg.allowed_clients:
                export_acls[cfg.name] = Acl.from_rules(
                    cfg.allowed_clients, f"allow= of {cfg.name!r}"
                )
            else:
                export_acls.setdefault(cfg.name, None)
        opts = SecurityOptions(
            tls=tls,
            allow=Acl.from_rules(args.allow) if args.allow else None,
            export_acls=export_acls,
            tls_only=frozenset(c.name for c in config.exports if c.tls),
            single_writer=args.single_writer,
            list_allowed=list_allowed,
            metrics_port=args.metrics_port,
            metrics_bind=args.metrics_bind,
        )
        if not opts.active:
            return None
        return Guard(opts)
    except (AclError, TlsConfigError) as exc:
        raise ConfigError(str(exc)) from None
