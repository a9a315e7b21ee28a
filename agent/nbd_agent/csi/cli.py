"""``nbd-agent csi``: run the CSI node plugin until SIGTERM.

Why it exists: the agent's CLI dispatches subcommands (``nbd_agent.cli.SUBCOMMANDS``); this
module owns the ``csi`` one: ``add_parser(subparsers)`` adds it and sets ``func``. It wires
the pieces together: state file, reconciliation, the kernel attacher, Kubernetes access
(in-cluster, or a given API URL such as ``kubectl proxy``'s, or none for direct-``uri`` volumes
only) and the gRPC server on the unix socket.

What it must not do: hold CSI logic; print secrets (the API token is only read from a file).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

from nbd_agent.csi.attacher import Attacher
from nbd_agent.csi.host_inventory import Publisher
from nbd_agent.csi.host_wipe import Wiper
from nbd_agent.csi.identity import IdentityService
from nbd_agent.csi.kernel import KernelAttacher
from nbd_agent.csi.kube import ClusterAccess, ExportStore, KubeApi, LeaseStore
from nbd_agent.csi.node import NodeService
from nbd_agent.csi.reconcile import reconcile
from nbd_agent.csi.server import build_server, log_at, run_until, stop_on_signals
from nbd_agent.csi.state import NodeState

log = logging.getLogger("nbd_agent.csi")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``csi`` subcommand to an argparse subparsers object; sets ``func``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "csi", help="run the CSI node plugin (Identity and Node services) on a unix socket"
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
    parser.add_argument(
        "--node-id", default=os.environ.get("NODE_NAME", ""), help="this node's name ($NODE_NAME)"
    )
    parser.add_argument(
        "--state-dir", default="/var/lib/kube-nbd", help="hostPath folder for the node state"
    )
    parser.add_argument(
        "--kube-api",
        default="auto",
        help="'auto' (in-cluster when running in a pod, else none), 'none', or an API URL"
        " such as http://127.0.0.1:8001 (kubectl proxy)",
    )
    parser.add_argument(
        "--host-device",
        action="append",
        default=[],
        metavar="GLOB",
        help="allowlist: block devices matching this path glob may become host-device volumes"
        " (repeatable; e.g. '/dev/disk/by-id/nvme-*'). None: no device is ever offered",
    )
    parser.add_argument(
        "--host-device-namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of this node's host-device inventory Lease, the CSI controller's"
        " ($POD_NAMESPACE)",
    )
    parser.add_argument(
        "--host-device-interval",
        type=float,
        default=30,
        help="seconds between inventory renewals (it expires after three missed ones)",
    )
    parser.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    parser.add_argument("--log-level", default="INFO")


def cluster_access(kube_api: str, node_id: str) -> ClusterAccess | None:
    if kube_api == "none":
        return None
    if kube_api == "auto":
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            log.warning("no Kubernetes API: only volumes with a direct 'uri' attribute will work")
            return None
        return ClusterAccess(KubeApi.in_cluster(), node_id)
    return ClusterAccess(KubeApi(kube_api), node_id)


def serve(
    endpoint: str,
    node_id: str,
    state_dir: str,
    attacher: Attacher,
    cluster: ClusterAccess | None,
    stop: threading.Event,
    workers: int = 8,
    inventory: Publisher | None = None,
) -> None:
    """Reconcile, serve until ``stop`` is set, then stop gracefully (in-flight calls finish)."""
    if inventory is not None:
        inventory.start(stop)
    state = NodeState(state_dir).load()
    node = NodeService(node_id, state, attacher, lookup=cluster, leases=cluster)
    if isinstance(attacher, KernelAttacher):
        attacher.on_refused = node.volumes.report_refused
    reconcile(node.volumes)
    server = build_server(endpoint, IdentityService(attacher), node, workers=workers)
    started = f"CSI node plugin nbd.dev serving on {endpoint} as node {node_id!r}"
    run_until(server, stop, started, "CSI node plugin stopped")


def run(args: argparse.Namespace) -> int:
    log_at(args.log_level)
    if not args.node_id:
        log.error("--node-id (or $NODE_NAME) is required")
        return 2
    cluster = cluster_access(args.kube_api, args.node_id)
    inventory = None
    if args.host_device:
        if cluster is None or not args.host_device_namespace:
            log.error("--host-device needs the Kubernetes API and --host-device-namespace")
            return 2
        leases, namespace = LeaseStore(cluster.api), args.host_device_namespace
        inventory = Publisher(
            leases,
            namespace,
            args.node_id,
            args.host_device,
            interval=args.host_device_interval,
            wiper=Wiper(leases, ExportStore(cluster.api), namespace, args.node_id),
        )
    stop = stop_on_signals()
    attacher = KernelAttacher()
    attacher.start()
    try:
        serve(
            args.endpoint,
            args.node_id,
            args.state_dir,
            attacher,
            cluster,
            stop,
            workers=args.workers,
            inventory=inventory,
        )
    finally:
        attacher.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: ``python -m nbd_agent.csi.cli --endpoint ...``."""
    parser = argparse.ArgumentParser(prog="nbd-agent csi")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
