"""``nbd-operator``: run the NBDExport operator against the current cluster.

Why it exists: one entry point for in-cluster and local runs. With no arguments it logs in the
way kopf does (in-cluster service account, else the current kubeconfig context) and watches
NBDExports in all namespaces; ``--namespace`` (repeatable) narrows that.

What it must not do: hold logic. It reads settings, builds the registry and hands over to kopf.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence

import kopf

from nbd_operator.config import OperatorConfig
from nbd_operator.handlers import build_registry, configure_settings


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
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = OperatorConfig.from_env()
        if args.server_image:
            config = dataclasses.replace(config, server_image=args.server_image)
        if args.server_metrics_port is not None:
            port = args.server_metrics_port or None
            config = dataclasses.replace(config, server_metrics_port=port)
    except ValueError as exc:  # a bad setting stops the start with a clear line, exit 2
        print(f"nbd-operator: {exc}", file=sys.stderr)
        return 2
    kopf.configure(verbose=args.verbose)
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    asyncio.run(
        kopf.operator(
            registry=build_registry(config),
            settings=settings,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            # One operator replica (the chart's Deployment uses Recreate): no peering objects.
            standalone=True,
            liveness_endpoint=args.liveness,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
