"""``nbd-agent``: attach, detach and list NBD devices from a shell, like nbd-client.

Why it exists: people on a plain Linux box (and our kernel tests) need the agent's attach without
Kubernetes. Each subcommand is registered from one line of ``SUBCOMMANDS``
(``name -> "module:function"``, imported lazily so ``nbd-agent list`` does not load gRPC). The
function receives argparse's subparsers object, adds its parser and sets ``func`` (args -> exit
code) as a default.

What it must not do: hold logic the CSI plugin needs too (that lives in attach.py and persist.py),
or print tracebacks for expected failures: AgentError becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from nbd_agent.errors import AgentError

# One line per subcommand: name -> "module:function(subparsers)", imported when the CLI starts.
SUBCOMMANDS: dict[str, str] = {
    "attach": "nbd_agent.cli:add_attach",
    "detach": "nbd_agent.cli:add_detach",
    "list": "nbd_agent.cli:add_list",
    "watch": "nbd_agent.cli:add_watch",
    "csi": "nbd_agent.csi.cli:add_parser",
    "csi-controller": "nbd_agent.csi.controller_cli:add_parser",
}


def _seconds(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_attach(sub: Any) -> None:
    p = sub.add_parser("attach", help="attach an NBD export to /dev/nbdN and print the device")
    p.add_argument("uri", help="nbd://host[:port]/export, nbds://..., nbd+unix:///export?socket=")
    p.add_argument("--device", help="/dev/nbdN to use (default: the first free one)")
    p.add_argument("--connections", type=int, default=1, help="connections (multi-conn servers)")
    p.add_argument("--read-only", action="store_true", help="attach read-only")
    p.add_argument("--timeout", type=_seconds, help="per-request timeout in seconds")
    p.add_argument(
        "--dead-conn-timeout",
        type=_seconds,
        help="seconds I/O waits for a reconnect before failing (default: 0, or 120 with --persist)",
    )
    p.add_argument(
        "--persist",
        action="store_true",
        help="stay in the foreground, reconnect after server restarts (nbd-client -persist)",
    )
    p.set_defaults(func=_run_attach)


def _run_attach(args: argparse.Namespace) -> int:
    from nbd_agent import attach, devices

    opts = attach.AttachOptions(
        device=devices.device_index(args.device) if args.device else None,
        connections=args.connections,
        read_only=args.read_only,
        timeout=args.timeout,
        dead_conn_timeout=args.dead_conn_timeout,
    )
    if args.persist:
        from nbd_agent import persist

        if opts.dead_conn_timeout is None:
            opts.dead_conn_timeout = persist.DEFAULT_DEAD_CONN_TIMEOUT
        return persist.attach_and_watch(args.uri, opts)
    result = attach.attach(args.uri, opts)
    print(result.device, flush=True)
    return 0


def add_detach(sub: Any) -> None:
    p = sub.add_parser("detach", help="detach /dev/nbdN")
    p.add_argument("device")
    p.add_argument("--force", action="store_true", help="detach even if mounted (I/O will fail)")
    p.set_defaults(func=_run_detach)


def _run_detach(args: argparse.Namespace) -> int:
    from nbd_agent import attach

    attach.detach(args.device, force=args.force)
    return 0


def add_list(sub: Any) -> None:
    p = sub.add_parser("list", help="list nbd devices, their state and backends")
    p.add_argument("--all", action="store_true", help="include unattached devices")
    p.set_defaults(func=_run_list)


def _run_list(args: argparse.Namespace) -> int:
    from nbd_agent import devices
    from nbd_agent.netlink import NbdNetlink

    with NbdNetlink() as nl:
        found = devices.list_devices(nl)
    print(f"{'DEVICE':<12} {'STATE':<9} {'SIZE':>14} {'MODE':<3} BACKEND")
    for dev in found:
        if not dev.connected and not args.all:
            continue
        backend = dev.backend
        what = (
            f"{backend.uri} (connections={backend.connections})"
            if backend
            else (dev.backend_identifier or "-")
        )
        state = "attached" if dev.connected else "free"
        mode = "ro" if dev.read_only else "rw"
        print(f"{dev.path:<12} {state:<9} {dev.size_bytes:>14} {mode:<3} {what}")
    return 0


def add_watch(sub: Any) -> None:
    p = sub.add_parser(
        "watch", help="daemon: adopt every device this agent attached and keep it attached"
    )
    p.set_defaults(func=_run_watch)


def _run_watch(args: argparse.Namespace) -> int:
    from nbd_agent import attach, persist

    return persist.watch_all(attach.AttachOptions())


# Subcommands whose module needs an optional extra: the extra that brings what they import.
EXTRAS: dict[str, str] = {"csi": "agent", "csi-controller": "agent"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (``only``) one that registers just that subcommand: a command
    line names its subcommand, and importing the others (gRPC for csi) costs start-up time."""
    parser = argparse.ArgumentParser(
        prog="nbd-agent",
        description="Attach NBD exports to /dev/nbdN through the kernel's netlink interface, "
        "keep them attached, and serve them to Kubernetes pods (csi).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log reconnects and more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            continue
        adder = _parser_adder(name)
        if isinstance(adder, ImportError):  # a component not installed must not break the rest
            sub.add_parser(name, help=f"(unavailable: {_unavailable_reason(name, adder)})")
        else:
            adder(sub)
    return parser


def _parser_adder(name: str) -> Any:
    """The subcommand's ``add_parser`` function, or the ImportError that its module raised."""
    module, function = SUBCOMMANDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as exc:
        return exc


def _unavailable_reason(name: str, exc: ImportError) -> str:
    extra = EXTRAS.get(name)
    if extra is None:
        return str(exc)
    return (
        f"needs the {extra!r} extra ({exc.name or exc} is not installed): "
        f"pip install 'kube-nbd[{extra}]'"
    )


def _subcommand(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = _subcommand(argv)
    adder = _parser_adder(only) if only else None
    if only and isinstance(adder, ImportError):  # said before parsing: its options are unknown
        print(f"nbd-agent {only}: unavailable: {_unavailable_reason(only, adder)}", file=sys.stderr)
        return 2
    args = build_parser(only=only).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s nbd-agent %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except AgentError as exc:
        print(f"nbd-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
