"""``nbd-operator``: run the NBDExport operator against the current cluster.

Why it exists: one entry point for in-cluster and local runs. With no arguments it logs in the
way kubectl does (``login``: in-cluster service account, else the kubeconfig's current context;
``--kubeconfig`` and ``--context`` choose) and watches NBDExports in all namespaces;
``--namespace`` (repeatable) narrows that. Without any cluster to log in to it says so in one
line and exits 2 before kopf starts. With
``--leader-elect`` it first stands by (answering its health URL) until it holds the leader
Lease (``leader``), and runs kopf only while it does.

What it must not do: hold reconciliation logic. It reads settings, builds the registry and
hands over to kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import os
import pathlib
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import kopf
from aiohttp import web

from nbd_operator import leader, login
from nbd_operator.config import OperatorConfig
from nbd_operator.handlers import build_registry, configure_settings
from nbd_operator.kube import Kube


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nbd-operator", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--server-image", help="image of the NBD server pods (env NBD_OPERATOR_SERVER_IMAGE)"
    )
    parser.add_argument(
        "--server-metrics-port",
        type=int,
        metavar="PORT",
        help="start every server with --metrics-port PORT, 0 for none "
        "(env NBD_OPERATOR_SERVER_METRICS_PORT; default none)",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="run as one of several replicas: reconcile only while holding a Lease "
        "(namespace from POD_NAMESPACE, identity from POD_NAME)",
    )
    parser.add_argument(
        "--leader-lease",
        default="nbd-operator-leader",
        metavar="NAME",
        help="name of the leader election Lease (default nbd-operator-leader)",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="FILE",
        help="log in with this kubeconfig (default: in-cluster, else KUBECONFIG, else "
        "~/.kube/config)",
    )
    parser.add_argument(
        "--context", metavar="NAME", help="the kubeconfig context to use (default: its current)"
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"nbd-operator {_version()}")
    return parser.parse_args(argv)


def _version() -> str:
    try:
        return importlib.metadata.version("kube-nbd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = OperatorConfig.from_env()
        if args.server_image:
            config = dataclasses.replace(config, server_image=args.server_image)
        if args.server_metrics_port is not None:
            port = args.server_metrics_port or None
            config = dataclasses.replace(config, server_metrics_port=port)
        source = login.find(args.kubeconfig, args.context, os.environ, pathlib.Path.home())
        asyncio.run(login.connection_info(source))  # a wrong file or context fails now, once
    except (ValueError, login.NoCredentials) as exc:  # one clear line, exit 2, no traceback
        print(f"nbd-operator: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose)
    settings = kopf.OperatorSettings()
    configure_settings(settings)

    async def operate() -> None:
        await kopf.operator(
            registry=build_registry(config, source=source),
            settings=settings,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            # No kopf peering: one replica, or several under our own Lease (--leader-elect).
            standalone=True,
            liveness_endpoint=args.liveness,
        )

    if not args.leader_elect:
        asyncio.run(operate())
        return 0
    return asyncio.run(_elected(args, source, operate))


async def _elected(
    args: argparse.Namespace,
    source: login.LoginSource,
    operate: Callable[[], Coroutine[Any, Any, None]],
) -> int:
    """Campaign for the Lease, operate while holding it; exit 1 when it was lost, so that the
    pod restarts and campaigns afresh instead of resuming with stale state."""
    info = await login.connection_info(source)
    namespace = os.environ.get("POD_NAMESPACE") or "default"
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    kube = Kube(info)
    try:
        elector = leader.Elector(kube, namespace, args.leader_lease, identity)
        async with _standby(args.liveness):
            if not await _until_signalled(elector.acquire()):
                return 0  # stopped while standing by
        return 0 if await leader.lead(elector, operate) else 1
    finally:
        await kube.close()


@contextlib.asynccontextmanager
async def _standby(liveness: str | None) -> AsyncIterator[None]:
    """Answer the liveness URL while waiting for the Lease (kopf serves it once leading): a
    standby replica is healthy, and must count as ready, or a rolling update that waits for
    the new pod before stopping the old leader would wait forever."""
    if not liveness:
        yield
        return
    url = urllib.parse.urlsplit(liveness)

    async def healthy(_: web.Request) -> web.Response:
        return web.json_response({"standby": True})

    app = web.Application()
    app.router.add_get(url.path or "/", healthy)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, url.hostname, url.port or 80).start()
    try:
        yield
    finally:
        await runner.cleanup()  # frees the port for kopf's own endpoint


async def _until_signalled(waiting: Coroutine[Any, Any, None]) -> bool:
    """Run ``waiting``; False when SIGTERM or SIGINT came first (kopf handles them later)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(waiting)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
        return True
    except asyncio.CancelledError:
        return False
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    raise SystemExit(main())
