"""The ``nbdserver`` command line: parse arguments into ``ExportConfig``/``ServerConfig``, set up
logging and signals, run the server. Exit status 0 after a clean stop (SIGTERM/SIGINT), 2 for a
bad command line or configuration, 1 for anything else.

Must not contain server logic: everything it does is reachable from Python through
``nbdserver.server.Server`` as well.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from nbdserver import __version__, security_cli
from nbdserver.errors import ConfigError
from nbdserver.exports import BACKEND_KINDS, ExportConfig, parse_export_spec, parse_size
from nbdserver.protocol.constants import NBD_DEFAULT_PORT
from nbdserver.server import Server, ServerConfig

log = logging.getLogger("nbdserver")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nbdserver", description="An NBD (network block device) server."
    )
    p.add_argument("--version", action="version", version=f"nbdserver {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "serve",
        help="serve disk images over NBD",
        description="Serve IMAGE (a file or a block device) and/or the --export entries.",
    )
    s.add_argument("image", nargs="?", help="image file or block device to serve")
    s.add_argument("--name", default="", help='export name of IMAGE (default "")')
    s.add_argument(
        "--size",
        help="create IMAGE sparse with this size (1G, 512M, bytes) if absent; grow, never shrink",
    )
    s.add_argument("--read-only", "-r", action="store_true", help="refuse writes to IMAGE")
    s.add_argument("--description", default="", help="export description shown to clients")
    s.add_argument(
        "--backend",
        choices=BACKEND_KINDS,
        default="auto",
        help="auto picks block for devices, else file; memory needs --size",
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
        help="another export (PATH memory: RAM); opts: size, ro, description, backend, "
        "connections, idle-timeout",
    )
    s.add_argument("--bind", "-b", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    s.add_argument(
        "--port",
        "-p",
        type=int,
        default=NBD_DEFAULT_PORT,
        help="TCP port (default 10809; 0 = any free port)",
    )
    s.add_argument("--unix", "-u", metavar="PATH", help="also listen on a unix socket")
    s.add_argument("--no-tcp", action="store_true", help="no TCP listener (with --unix)")
    s.add_argument(
        "--max-connections", type=int, default=256, help="global connection limit (0 = none)"
    )
    s.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a client may take to finish the handshake",
    )
    s.add_argument(
        "--idle-timeout",
        type=float,
        default=0.0,
        metavar="S",
        help="end a connection after S seconds without a request (0 = never; per export: "
        "idle-timeout=S)",
    )
    s.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds to let connections finish on SIGTERM",
    )
    s.add_argument("--workers", type=int, default=4, help="threads for FLUSH/TRIM/WRITE_ZEROES")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    security_cli.add_arguments(s)
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    exports: list[ExportConfig] = []
    if args.image is not None or args.backend == "memory":
        cfg = ExportConfig(
            name=args.name,
            path=args.image,
            size=parse_size(args.size) if args.size else None,
            read_only=args.read_only,
            description=args.description,
            backend=args.backend,
            connections=args.connections,
        )
        if args.backend == "memory":
            cfg.path = None
        cfg.validate()
        exports.append(cfg)
    exports.extend(parse_export_spec(spec) for spec in args.export)
    exports.extend(security_cli.file_exports(args))  # --config FILE (nbd-server format)
    if not exports:
        raise ConfigError("nothing to serve: give IMAGE or --export NAME=PATH")
    if not 0 <= args.idle_timeout < 1e9:
        raise ConfigError("--idle-timeout must be 0 (none) or a number of seconds")
    for cfg in exports:  # the flag covers every export that has no timeout of its own
        cfg.idle_timeout = cfg.idle_timeout or args.idle_timeout
    if args.no_tcp and not args.unix:
        raise ConfigError("--no-tcp needs --unix")
    if args.handshake_timeout <= 0:
        raise ConfigError("--handshake-timeout must be positive")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.workers < 1 or args.max_connections < 0 or args.connections < 0:
        raise ConfigError("--workers must be at least 1; connection limits must not be negative")
    return ServerConfig(
        exports=exports,
        bind=args.bind,
        port=None if args.no_tcp else args.port,
        unix=args.unix,
        max_connections=args.max_connections,
        handshake_timeout=args.handshake_timeout,
        shutdown_timeout=args.shutdown_timeout,
        workers=args.workers,
    )


def build_server(config: ServerConfig) -> Server:
    """Hook point: features configured on the command line are attached to the server here."""
    return Server(config)


def serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    guard = security_cli.finish(args, config)  # TLS, ACLs, cow, QoS, metrics (or None)
    server = build_server(config)
    server.guard = guard
    server.open()
    if guard is not None:
        guard.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        server.shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    finally:
        if guard is not None:
            guard.close()
    log.info("stopped cleanly")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            return serve(args)
    except ConfigError as e:
        print(f"nbdserver: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
