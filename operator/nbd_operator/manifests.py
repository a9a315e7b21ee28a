"""Pure builders of the Kubernetes objects that serve one NBDExport.

Why it exists: what the operator creates must be inspectable and checkable against the real
Kubernetes schemas without a cluster. Each builder takes the typed spec (and operator settings)
and returns a manifest dict; the reconciler only applies what these return.

What it must not do: I/O, or import nbdserver. The server's command line is the contract:
``server_args`` is the one place that spells nbdserver's flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from nbd_api import API_VERSION, KIND, NBD_PORT, parse_quantity

from nbd_operator.config import OperatorConfig
from nbd_operator.image_access import remote_access
from nbd_operator.spec import (
    ExportSpec,
    child_labels,
    claim_name,
    overlay_claim_name,
    policy_name,
    selector_labels,
    server_name,
)

DATA_DIR = "/data"
SCRATCH_DIR = "/scratch"
COW_DIR = "/cow"
TLS_DIR = "/etc/nbd/tls"
BACKING_DEVICE = "/dev/nbd-backing"
IMAGE_FILE = "disk.img"
MiB = 2**20

# The server pod's container (its log announces the served size: served_size.py).
SERVER_CONTAINER = "nbdserver"


def owner_reference(spec: ExportSpec) -> dict[str, Any]:
    """Makes the export the controlling owner: kubectl shows it, the GC follows it."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": spec.name,
        "uid": spec.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(spec: ExportSpec, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": child_labels(spec.name, component),
        "ownerReferences": [owner_reference(spec)],
    }


def quantity(n: int) -> str:
    """Bytes as the API server prints them back (largest exact binary suffix), so that
    comparing desired and current objects does not see a change where there is none."""
    for suffix, unit in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def claim_storage_bytes(spec: ExportSpec) -> int:
    """What the operator's PVC requests: the image plus room for a filesystem around it."""
    assert spec.size_bytes is not None
    if spec.volume_mode == "Block":
        return spec.size_bytes
    # ext4/xfs metadata and reserved blocks need a few percent; round up to whole MiB.
    overhead = max(64 * MiB, spec.size_bytes // 32)
    total = spec.size_bytes + overhead
    return -(-total // MiB) * MiB


def persistent_volume_claim(spec: ExportSpec) -> dict[str, Any]:
    """The claim for a volumeClaimTemplate source."""
    template = spec.source
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": spec.volume_mode,
        "resources": {"requests": {"storage": quantity(claim_storage_bytes(spec))}},
    }
    if template.get("storageClassName"):
        claim_spec["storageClassName"] = template["storageClassName"]
    source = template.get("dataSource")
    if source:
        # Restored or cloned by the claim's storage class (a snapshot or clone of a volume).
        claim_spec["dataSource"] = {"kind": source["kind"], "name": source["name"]}
        if source["kind"] == "VolumeSnapshot":
            claim_spec["dataSource"]["apiGroup"] = "snapshot.storage.k8s.io"
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(spec, claim_name(spec.name), "data"),
        "spec": claim_spec,
    }


def overlay_claim(
    spec: ExportSpec, base_size: int, base_claim: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The claim for a clone's overlay (``source.export``): the overlay file is as large as the
    base (sparse) plus a byte per 64 KiB block of map; room for the filesystem comes on top. The
    storage class is the spec's, else the base claim's, else the cluster's default."""
    overhead = max(64 * MiB, base_size // 32)
    storage = -(-(base_size + overhead) // MiB) * MiB
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": quantity(storage)}},
    }
    storage_class = spec.source.get("storageClassName") or (
        ((base_claim or {}).get("spec") or {}).get("storageClassName")
    )
    if storage_class:
        claim_spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(spec, overlay_claim_name(spec.name), "overlay"),
        "spec": claim_spec,
    }


def server_args(
    spec: ExportSpec,
    image: str,
    *,
    size: bool,
    client_ca: bool,
    cow_dir: str | None,
    metrics: tuple[int, str] | None = None,
    source_args: Sequence[str] = (),
) -> list[str]:
    """nbdserver's command line for this export (``nbdserver serve IMAGE --name NAME ...``);
    ``metrics`` is (port, bind address) of its Prometheus endpoint."""
    # Always said explicitly, raw included: a consumer may legitimately write a qcow2, VMDK or
    # xz header at the start of its raw volume (a VM disk inside it, a copied image), and
    # without --format the server refuses such a file at its next start.
    args = ["serve", image, "--name", spec.name, "--port", str(NBD_PORT), "--format", spec.format]
    args += source_args  # how to reach a remote image (a stream)
    if metrics is not None:
        args += ["--metrics-port", str(metrics[0]), "--metrics-bind", metrics[1]]
    if size and spec.size_bytes is not None:
        args += ["--size", str(spec.size_bytes)]
    if spec.read_only:
        args.append("--read-only")
    elif spec.access_mode == "ReadWriteOnce":
        # The agents' writer Lease is the gate; the server refusing a second writing host is
        # the second line (a stale node that never released its attachment).
        args.append("--single-writer")
    if cow_dir is not None:
        # A clone's (or a stream's) overlay lives on its own claim: keep it across restarts.
        mode = "persistent" if spec.persistent_overlay else "shared"
        args += ["--copy-on-write", mode, "--cow-dir", cow_dir]
    if spec.tls is not None:
        args += ["--tls", "require" if spec.tls.required else "on"]
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
        if client_ca:
            args += ["--tls-ca", f"{TLS_DIR}/ca.crt"]
    for cidr in spec.allowed_clients:
        args += ["--allow", cidr]
    if spec.connections is not None:
        args += ["--connections", str(spec.connections)]
    qos = spec.qos
    for flag, value in (
        ("--qos-read-bps", qos.read_bps),
        ("--qos-write-bps", qos.write_bps),
        ("--qos-read-iops", qos.read_iops),
        ("--qos-write-iops", qos.write_iops),
    ):
        if value is not None:
            args += [flag, str(value)]
    return args


class _Backing:
    """Where the data comes from inside the pod: volumes, mounts and the path to serve."""

    def __init__(self) -> None:
        self.volumes: list[dict[str, Any]] = []
        self.mounts: list[dict[str, Any]] = []
        self.devices: list[dict[str, Any]] = []
        self.path = ""
        self.sized = False  # the server sizes an image file itself (--size)
        self.root = False  # opening a block device node needs uid 0
        self.privileged = False  # a host device needs the device cgroup opened
        self.node: str | None = None  # pinned to this node (host devices)
        self.near: str | None = None  # scheduled next to this export's server (clones)
        self.env: list[dict[str, Any]] = []
        self.args: list[str] = []  # flags that say how to reach the data (a remote's)


def _backing(
    data: ExportSpec, *, read_only: bool, secret_keys: frozenset[str] = frozenset()
) -> _Backing:
    b = _Backing()
    kind = data.source_kind
    if kind == "image" and data.image_mode == "stream":
        # Nothing mounted: the server reads the remote itself.
        access = remote_access(data, secret_keys)
        b.volumes += access.volumes
        b.mounts += access.mounts
        b.env, b.path = access.env, data.image_location
        b.args = list(access.args)
        if data.source.get("cacheSize") is not None:
            b.args += ["--cache-size", str(parse_quantity(data.source["cacheSize"]))]
    elif kind in ("volumeClaimTemplate", "persistentVolumeClaim", "image"):
        # An import's claim is the operator's, as a template's; its file is never sized.
        own = kind != "persistentVolumeClaim"
        claim = claim_name(data.name) if own else data.source["claimName"]
        b.volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
        )
        if data.volume_mode == "Block":
            b.devices.append({"name": "data", "devicePath": BACKING_DEVICE})
            b.path, b.root = BACKING_DEVICE, True
        else:
            b.mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": read_only})
            rel = IMAGE_FILE if own else data.source["path"]
            b.path, b.sized = f"{DATA_DIR}/{rel}", kind != "image"
    elif kind == "hostDevice":
        host = {"path": data.source["path"], "type": "BlockDevice"}
        b.volumes.append({"name": "data", "hostPath": host})
        b.mounts.append({"name": "data", "mountPath": BACKING_DEVICE, "readOnly": read_only})
        b.path, b.root, b.privileged = BACKING_DEVICE, True, True
        b.node = data.source["nodeName"]
    elif kind == "memory":
        assert data.size_bytes is not None
        empty = {"medium": "Memory", "sizeLimit": quantity(data.size_bytes)}
        b.volumes.append({"name": "data", "emptyDir": empty})
        b.mounts.append({"name": "data", "mountPath": SCRATCH_DIR})
        b.path, b.sized = f"{SCRATCH_DIR}/{IMAGE_FILE}", True
    else:  # pragma: no cover - a clone's data is its base's; the caller resolves it
        raise ValueError(f"no backing for source kind {kind}")
    return b


def _security(spec_uid: int, b: _Backing) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod and container security contexts: non-root unless a device node needs more."""
    if b.root:
        pod: dict[str, Any] = {"runAsUser": 0, "runAsNonRoot": False}
    else:
        pod = {
            "runAsUser": spec_uid,
            "runAsGroup": spec_uid,
            "fsGroup": spec_uid,
            "runAsNonRoot": True,
        }
    pod["seccompProfile"] = {"type": "RuntimeDefault"}
    container: dict[str, Any] = {"readOnlyRootFilesystem": True}
    if b.privileged:
        container["privileged"] = True
    else:
        container["allowPrivilegeEscalation"] = False
        container["capabilities"] = {"drop": ["ALL"]}
    return pod, container


def _resources(spec: ExportSpec, config: OperatorConfig) -> dict[str, Any]:
    """The server's resources; a memory export's tmpfs pages count against its memory, so the
    default request and limit grow by the export's size (an explicit spec.server wins)."""
    if spec.server.resources:
        return dict(spec.server.resources)
    resources = {k: dict(v) for k, v in config.server_resources.items()}
    if spec.source_kind == "memory" and spec.size_bytes is not None:
        for kind in ("requests", "limits"):
            base = resources.setdefault(kind, {}).get("memory")
            extra = parse_quantity(base) if base is not None else 0
            resources[kind]["memory"] = quantity(spec.size_bytes + extra)
    return resources


def deployment(
    spec: ExportSpec,
    config: OperatorConfig,
    base: ExportSpec | None = None,
    *,
    secret_keys: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The server: one replica, Recreate (two servers must never write one image at once).
    ``secret_keys``: the keys of an image source's Secret (a stream reads its remote)."""
    if spec.source_kind == "export":
        if base is None:
            raise ValueError("a clone's deployment needs its base export's spec")
        # The overlay is kept over the base's image as the base serves it (its format).
        spec = dataclasses.replace(spec, format=base.format, format_known=True)
        b = _backing(base, read_only=True)
        b.near = None if b.node else base.name
    else:
        # Copy-on-write leaves the source untouched: writes land in the overlay directory.
        b = _backing(spec, read_only=spec.read_only or spec.copy_on_write, secret_keys=secret_keys)
    cow_dir = COW_DIR if spec.copy_on_write else None
    if cow_dir is not None:
        # A clone's (a writable stream's) writes are its data: they live on a claim the
        # operator owns and survive a reschedule. copyOnWrite over another source is a scratch
        # overlay (emptyDir).
        overlay: dict[str, Any] = (
            {"persistentVolumeClaim": {"claimName": overlay_claim_name(spec.name)}}
            if spec.persistent_overlay
            else {"emptyDir": {}}
        )
        b.volumes.append({"name": "cow", **overlay})
        b.mounts.append({"name": "cow", "mountPath": COW_DIR})
    if spec.tls is not None:
        secret = {"secretName": spec.tls.secret_name, "defaultMode": 0o440}
        b.volumes.append({"name": "tls", "secret": secret})
        b.mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    b.volumes.append({"name": "tmp", "emptyDir": {}})
    b.mounts.append({"name": "tmp", "mountPath": "/tmp"})
    # --size creates or grows the image file, so only a writable source gets it; a clone
    # serves its base's file at the base's size.
    # A non-raw image is never created or grown by the server (qemu-img makes one).
    sized = b.sized and not (spec.read_only or spec.copy_on_write) and spec.format == "raw"
    client_ca = spec.tls is not None and spec.tls.client_certificate
    pod_security, container_security = _security(config.server_uid, b)

    ports = [{"name": "nbd", "containerPort": NBD_PORT, "protocol": "TCP"}]
    metrics = None
    if config.server_metrics_port is not None:
        metrics = (config.server_metrics_port, config.server_metrics_bind)
        # The chart's PodMonitor scrapes the port by this name.
        ports.append(
            {"name": "metrics", "containerPort": config.server_metrics_port, "protocol": "TCP"}
        )
    args = server_args(
        spec,
        b.path,
        size=sized,
        client_ca=client_ca,
        cow_dir=cow_dir,
        metrics=metrics,
        source_args=b.args,
    )
    container: dict[str, Any] = {
        "name": SERVER_CONTAINER,
        "image": spec.server.image or config.server_image,
        "imagePullPolicy": spec.server.image_pull_policy or config.image_pull_policy,
        "command": ["nbdserver"],
        "args": args,
        "ports": ports,
        "readinessProbe": {
            "tcpSocket": {"port": "nbd"},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": _resources(spec, config),
        "securityContext": container_security,
        "volumeMounts": b.mounts,
    }
    if b.devices:
        container["volumeDevices"] = b.devices
    if b.env:
        container["env"] = b.env
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": b.volumes,
        # The server holds the image open; give it time to flush before SIGKILL.
        "terminationGracePeriodSeconds": 30,
    }
    if spec.server.node_selector:
        pod_spec["nodeSelector"] = dict(spec.server.node_selector)
    if spec.server.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.server.tolerations]
    if b.node is not None:
        # matchFields on metadata.name pins to the node object itself, whatever its labels.
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [b.node]}]}
        required = {"nodeSelectorTerms": [term]}
        pod_spec["affinity"] = {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}
        }
    elif b.near is not None:
        # A ReadWriteOnce claim mounts on one node only: the clone must run beside its base.
        near: dict[str, Any] = {
            "labelSelector": {"matchLabels": selector_labels(b.near)},
            "topologyKey": "kubernetes.io/hostname",
        }
        pod_spec["affinity"] = {
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [near]}
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(spec, server_name(spec.name), "nbd-server"),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector_labels(spec.name)},
            "template": {
                "metadata": {"labels": child_labels(spec.name)},
                "spec": pod_spec,
            },
        },
    }


def service(spec: ExportSpec) -> dict[str, Any]:
    """A ClusterIP Service on the NBD port; the URI in status names it."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, server_name(spec.name), "nbd-server"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(spec.name),
            "ports": [{"name": "nbd", "port": NBD_PORT, "targetPort": "nbd", "protocol": "TCP"}],
        },
    }


def network_policy(spec: ExportSpec, metrics_port: int | None = None) -> dict[str, Any] | None:
    """Admits only spec.allowedClients to the server; None when every client is allowed.

    With a metrics endpoint, its port stays open to every source: Prometheus scrapes from
    wherever it runs, and the counters carry no data (the NBD port stays restricted)."""
    if not spec.allowed_clients:
        return None
    ingress: list[dict[str, Any]] = [
        {
            "from": [{"ipBlock": {"cidr": cidr}} for cidr in spec.allowed_clients],
            "ports": [{"protocol": "TCP", "port": NBD_PORT}],
        }
    ]
    if metrics_port is not None:
        ingress.append({"ports": [{"protocol": "TCP", "port": metrics_port}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(spec, policy_name(spec.name), "nbd-server"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(spec.name)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
