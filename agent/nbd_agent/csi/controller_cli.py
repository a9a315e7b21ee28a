"""``nbd-agent csi-controller``: run the CSI Controller service until SIGTERM.

Why it exists: the controller runs in its own Deployment beside the external-provisioner and
external-resizer sidecars, from the same image as the node plugin. This module owns that
subcommand: it wires Kubernetes access (in-cluster, or an API URL such as ``kubectl proxy``'s)
to the Controller and Identity services on a unix socket shared with the sidecars.

What it must not do: hold CSI logic, or run without Kubernetes (every volume is an NBDExport).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from typing import Any

from nbd_agent.csi.controller import ControllerService
from nbd_agent.csi.identity import IdentityService
from nbd_agent.csi.kube import ExportStore, KubeApi, KubeApiError, LeaseStore, SnapshotStore
from nbd_agent.csi.server import build_server, log_at, run_until, stop_on_signals

log = logging.getLogger("nbd_agent.csi.controller")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``csi-controller`` subcommand to an argparse subparsers object; sets ``func``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "csi-controller",
        help="run the CSI Controller service (volumes as NBDExports) on a unix socket",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
    parser.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", ""),
        help="namespace of the NBDExports it creates ($POD_NAMESPACE)",
    )
    parser.add_argument(
        "--kube-api",
        default="in-cluster",
        help="'in-cluster' (the pod's service account) or an API URL such as"
        " http://127.0.0.1:8001 (kubectl proxy)",
    )
    parser.add_argument(
        "--host-devices",
        action="store_true",
        help="offer 'backing: hostDevice' classes and GetCapacity, from the devices the node"
        " plugins publish (nbd-agent csi --host-device) in --namespace",
    )
    parser.add_argument("--workers", type=int, default=8, help="gRPC worker threads")
    parser.add_argument("--log-level", default="INFO")


def snapshot_store(api: KubeApi) -> SnapshotStore | None:
    """VolumeSnapshots, when the cluster serves their API (the snapshot CRDs are installed);
    looked up once at start: install the CRDs, then restart the controller."""
    try:
        api.request("GET", SnapshotStore.prefix)
    except KubeApiError as exc:
        log.warning("no snapshot.storage.k8s.io/v1 API (%s): snapshots are not offered", exc)
        return None
    return SnapshotStore(api)


def serve(
    endpoint: str,
    api: KubeApi,
    namespace: str,
    stop: threading.Event,
    workers: int = 8,
    host_devices: bool = False,
) -> None:
    """Serve until ``stop`` is set, then stop gracefully (in-flight calls finish)."""
    leases = LeaseStore(api) if host_devices else None
    controller = ControllerService(ExportStore(api), namespace, snapshot_store(api), leases=leases)
    identity = IdentityService(None, controller=True, topology=host_devices)
    server = build_server(endpoint, identity, controller=controller, workers=workers)
    started = f"CSI controller nbd.dev serving on {endpoint}, volumes in namespace {namespace!r}"
    run_until(server, stop, started, "CSI controller stopped")


def run(args: argparse.Namespace) -> int:
    log_at(args.log_level)
    if not args.namespace:
        log.error("--namespace (or $POD_NAMESPACE) is required")
        return 2
    try:
        api = KubeApi.in_cluster() if args.kube_api == "in-cluster" else KubeApi(args.kube_api)
    except (RuntimeError, OSError) as exc:
        log.error("no Kubernetes API: %s (use --kube-api URL outside a cluster)", exc)
        return 2
    stop = stop_on_signals()
    serve(
        args.endpoint,
        api,
        args.namespace,
        stop,
        workers=args.workers,
        host_devices=args.host_devices,
    )
    return 0
