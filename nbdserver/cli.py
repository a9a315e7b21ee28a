"""The ``nbdserver`` command line: read the configuration (``nbdserver.config``), set up logging and
signals, run the server; or run one import (``nbdserver.importer``). Exit status 0 after a clean
stop (SIGTERM/SIGINT), 2 for a bad command line, configuration or environment (one line naming the
flag, no traceback), 1 for anything else. SIGHUP re-reads ``--config`` (``Server.reload``).

Must not contain server logic: everything it does is reachable from Python through
``nbdserver.server.Server`` as well.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from nbdserver.backends.base import RemoteOptions
from nbdserver.config import ServerConfig, assemble, read_file
from nbdserver.config.flags import build_parser, read_layer
from nbdserver.errors import ConfigError
from nbdserver.importer.progress import Progress
from nbdserver.importer.run import ImportFailed, ImportRequest, run_import
from nbdserver.server import Server

log = logging.getLogger("nbdserver")


def serve(args: argparse.Namespace) -> int:
    flags = read_layer(args)
    path: str | None = args.config

    def reread() -> ServerConfig:
        return assemble(flags, read_file(path), path)

    server = Server(reread(), reread if path else None)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        server.shutdown()

    def hangup(signum: int, frame: FrameType | None) -> None:
        log.info("received SIGHUP: %s", "re-reading " + path if path else "no config file")
        server.request_reload()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)  # before open: a SIGHUP meanwhile waits, never kills
    server.open()
    server.serve_forever()
    log.info("stopped cleanly")
    return 0


def import_(args: argparse.Namespace) -> int:
    """``nbdserver import``: 0 imported (or already), 2 refused, 1 failed (a rerun may do)."""
    if not (math.isfinite(args.remote_timeout) and args.remote_timeout > 0):
        raise ConfigError("--remote-timeout must be a positive number of seconds")
    progress = Progress(args.progress)
    request = ImportRequest(
        source=args.source,
        dest=args.dest,
        format=args.format,
        output_format=args.output_format,
        sha256=args.sha256,
        work_dir=args.work_dir,
        remote=RemoteOptions(args.ca_bundle, args.remote_timeout, args.s3_endpoint),
    )

    def interrupted(signum: int, frame: FrameType | None) -> None:
        # Raised where the import is: the record on disk stays what it was (it is replaced
        # atomically), and the final progress line says why the import stopped.
        raise ImportFailed(f"interrupted by {signal.Signals(signum).name}: a rerun resumes")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    try:
        outcome = run_import(request, progress)
    except ConfigError as exc:
        progress.finish("failed", str(exc))
        raise
    except (ImportFailed, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        progress.finish("failed", why)
        print(f"nbdserver: {why}", file=sys.stderr)
        return 1
    progress.finish("done", outcome.message, outcome.sha256, outcome.size)
    log.info("%s: %s", args.dest, outcome.message)
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
        if args.command == "import":
            return import_(args)
    except ConfigError as e:
        print(f"nbdserver: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
