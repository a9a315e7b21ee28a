"""What a CreateVolume request asks for, as an NBDExport: pure functions, no I/O.

Why it exists: the controller has to turn a CSI request (a name, a capacity range, capabilities,
StorageClass parameters) into one NBDExport manifest, and to decide whether an export that
already carries the name is "the same volume" (idempotent success) or another one
(ALREADY_EXISTS). Keeping that here, as data in and data out, lets unit tests inspect every
manifest and every refusal without a gRPC server or an API server.

Decisions, each in one place:

- the export's name is the request name when that is a DNS-1035 label of at most 50 characters
  (external-provisioner's ``pvc-<uid>`` is), otherwise ``csi-`` plus a hash of it; the full
  request name is kept in an annotation and compared on every repeat;
- the volume id is ``<namespace>/<export>``, the handle the node plugin already resolves;
- sizes are rounded up to whole MiB (a block size every filesystem and claim accepts);
- a request is remembered by a digest of the spec it produced: a repeat with another capacity or
  other parameters produces another digest and is ALREADY_EXISTS.

What it must not do: talk to Kubernetes, import grpc, or accept a parameter it does not know
(a typo in a StorageClass must fail loudly, not provision something else).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nbd_api import API_VERSION, KIND

from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import InvalidArgument, OutOfRange
from nbd_agent.csi.mounter import SUPPORTED_FS

Mode = pb.VolumeCapability.AccessMode

MIB = 2**20
DEFAULT_SIZE = 2**30

LABEL_VOLUME = "nbd.dev/csi-volume"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "nbd-csi-controller"
ANNOTATION_NAME = "nbd.dev/csi-name"
ANNOTATION_DIGEST = "nbd.dev/csi-request-digest"
ANNOTATION_CLAIM = "nbd.dev/csi-claim"
# The size a spec without ``size`` (a copy-on-write clone: its base's) was provisioned at.
ANNOTATION_SIZE = "nbd.dev/csi-size"
# A host-device volume whose accessible topology is its device's node (parameter P_PIN).
ANNOTATION_PINNED = "nbd.dev/csi-pinned-to-device-node"

# StorageClass parameters kube-nbd reads (docs/csi.md lists them).
P_BACKING = "backing"
P_STORAGE_CLASS = "storageClass"
P_VOLUME_MODE = "volumeMode"
P_CONNECTIONS = "connections"
P_TLS_SECRET = "tlsSecretName"
P_TLS_MODE = "tlsMode"
P_CLUSTER_FS = "clusterFilesystemAcknowledged"
# How a volume cloned from another volume gets its data: "copy" (the backing storage class clones
# the claim; the clone is independent) or "copyOnWrite" (an overlay over the source, which must
# be read-only: instant and thin, the golden-image pattern; its overlay lives on its own claim).
P_CLONE_MODE = "cloneMode"
CLONE_MODES = ("copy", "copyOnWrite")
BACKINGS = ("claim", "memory", "hostDevice")
# A host-device volume is reachable from every node over NBD; "true" reports the device's node
# as its only accessible topology, so its consumers are scheduled beside the disk.
P_PIN = "pinToDeviceNode"
# "true": DeleteVolume does not free the device at once; its node plugin zeroes it first.
P_WIPE = "wipeOnDelete"
HOST_DEVICE_ONLY = (P_PIN, P_WIPE)
QOS_PARAMETERS = ("readBytesPerSecond", "writeBytesPerSecond", "readIOPS", "writeIOPS")
KNOWN_PARAMETERS = frozenset(
    {P_BACKING, P_STORAGE_CLASS, P_VOLUME_MODE, P_CONNECTIONS, P_TLS_SECRET, P_TLS_MODE}
    | {P_CLUSTER_FS, P_CLONE_MODE, *HOST_DEVICE_ONLY, *QOS_PARAMETERS}
)
# Keys the sidecars add or reserve (--extra-create-metadata adds the claim's name/namespace).
RESERVED_PREFIX = "csi.storage.k8s.io/"
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_EXPORT_NAME = 50
_SINGLE_NODE = {
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
}


def export_name(request_name: str) -> str:
    """The NBDExport name for a CSI volume name (stable: the same request, the same export)."""
    if len(request_name) <= _MAX_EXPORT_NAME and _DNS_1035.match(request_name):
        return request_name
    return "csi-" + hashlib.sha256(request_name.encode()).hexdigest()[:32]


def volume_id(namespace: str, export: str) -> str:
    return f"{namespace}/{export}"


def split_volume_id(value: str) -> tuple[str, str] | None:
    """``(namespace, export)`` of a volume id, or None when it cannot name an export."""
    namespace, sep, name = value.partition("/")
    if not sep or not namespace or not _DNS_1035.match(name) or "/" in name:
        return None
    return namespace, name


def round_size(required: int, limit: int) -> int:
    """Bytes to provision for a capacity range: ``required`` rounded up to MiB, within ``limit``.

    0 means unset for both (CSI); no range at all gives 1 GiB (capped by the limit)."""
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"required_bytes {required} exceeds limit_bytes {limit}")
    if required:
        size = -(-required // MIB) * MIB
    elif limit:
        size = min(DEFAULT_SIZE, limit // MIB * MIB)
    else:
        size = DEFAULT_SIZE
    if size == 0 or (limit and size > limit):
        raise OutOfRange(
            f"no whole number of MiB lies in [{required}, {limit or 'unbounded'}] bytes"
        )
    return size


def access_mode(
    caps: Iterable[pb.VolumeCapability], parameters: Mapping[str, str], has_data: bool = False
) -> str:
    """The export's ``accessMode`` that serves every requested capability, or INVALID_ARGUMENT.
    ``has_data``: the volume starts from a snapshot or clone, so read-only-many makes sense."""
    wanted: set[str] = set()
    for cap in caps:
        kind = cap.WhichOneof("access_type")
        if kind is None:
            raise InvalidArgument("every volume capability needs block or mount access_type")
        if kind == "mount" and cap.mount.fs_type not in ("", *SUPPORTED_FS):
            raise InvalidArgument(f"fs_type {cap.mount.fs_type!r} is not one of {SUPPORTED_FS}")
        wanted.add(_mode_for(cap, kind, parameters, has_data))
    if not wanted:
        raise InvalidArgument("volume_capabilities is required")
    if len(wanted) > 1:
        raise InvalidArgument(f"no one export serves all of {sorted(wanted)}; ask for one kind")
    return wanted.pop()


def _mode_for(
    cap: pb.VolumeCapability, kind: str, parameters: Mapping[str, str], has_data: bool
) -> str:
    mode = cap.access_mode.mode
    if mode in _SINGLE_NODE:
        return "ReadWriteOnce"
    if mode == Mode.MULTI_NODE_MULTI_WRITER:
        if kind != "block" or parameters.get(P_CLUSTER_FS) != "true":
            raise InvalidArgument(
                "MULTI_NODE_MULTI_WRITER needs volumeMode Block and the StorageClass parameter"
                f" {P_CLUSTER_FS}: 'true' (several writers corrupt any non-cluster filesystem)"
            )
        return "ReadWriteMany"
    if mode == Mode.MULTI_NODE_READER_ONLY:
        if not has_data:
            raise InvalidArgument("MULTI_NODE_READER_ONLY needs a snapshot or volume to start from")
        return "ReadOnlyMany"
    raise InvalidArgument(
        f"access mode {pb.VolumeCapability.AccessMode.Mode.Name(mode)} is not supported by nbd.dev"
    )


def _positive(parameters: Mapping[str, str], key: str, most: int | None = None) -> int | None:
    raw = parameters.get(key)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1 or (most is not None and int(raw) > most):
        bound = f"1..{most}" if most else "a positive integer"
        raise InvalidArgument(f"StorageClass parameter {key} must be {bound}, not {raw!r}")
    return int(raw)


def _claim_of(params: Mapping[str, str]) -> str:
    """namespace/name of the claim the external-provisioner says it provisions for, or ""."""
    if params.get(PVC_NAME) and params.get(PVC_NAMESPACE):
        return f"{params[PVC_NAMESPACE]}/{params[PVC_NAME]}"
    return ""


def _choice(parameters: Mapping[str, str], key: str, allowed: tuple[str, ...]) -> str:
    value = parameters.get(key, allowed[0])
    if value not in allowed:
        raise InvalidArgument(f"StorageClass parameter {key} must be one of {allowed}")
    return value


def qos_patch(mutable: Mapping[str, str]) -> dict[str, int]:
    """The ``spec.qos`` a VolumeAttributesClass asks for: QoS keys only, positive integers."""
    unknown = sorted(k for k in mutable if k not in QOS_PARAMETERS)
    if unknown:
        raise InvalidArgument(
            f"unknown mutable parameters {unknown}; a VolumeAttributesClass may set"
            f" {list(QOS_PARAMETERS)}"
        )
    return {k: v for k in QOS_PARAMETERS if (v := _positive(mutable, k)) is not None}


def check_parameters(parameters: Mapping[str, str]) -> None:
    unknown = sorted(
        k for k in parameters if k not in KNOWN_PARAMETERS and not k.startswith(RESERVED_PREFIX)
    )
    if unknown:
        raise InvalidArgument(
            f"unknown StorageClass parameters {unknown}; known: {sorted(KNOWN_PARAMETERS)}"
        )


def export_spec(
    size: int,
    mode: str,
    parameters: Mapping[str, str],
    data_source: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The NBDExport spec for a new volume of ``size`` bytes served as ``mode``; its claim is
    restored or cloned from ``data_source`` (a VolumeSnapshot or a claim) when one is given."""
    check_parameters(parameters)
    backing = _choice(parameters, P_BACKING, BACKINGS)
    if backing == "hostDevice":
        raise InvalidArgument("backing 'hostDevice' volumes are planned by host_device_request")
    for key in HOST_DEVICE_ONLY:
        if key in parameters:
            raise InvalidArgument(f"{key} is for backing 'hostDevice' only")
    spec: dict[str, Any] = {"size": size, "accessMode": mode}
    if backing == "memory":
        if P_STORAGE_CLASS in parameters or P_VOLUME_MODE in parameters:
            raise InvalidArgument("backing 'memory' takes no storageClass or volumeMode")
        if data_source:
            raise InvalidArgument("a memory volume starts empty: no snapshot or clone source")
        spec["source"] = {"memory": {}}
    else:
        template: dict[str, Any] = {
            "volumeMode": _choice(parameters, P_VOLUME_MODE, ("Filesystem", "Block")),
            "reclaimPolicy": "Delete",
        }
        if parameters.get(P_STORAGE_CLASS):
            template["storageClassName"] = parameters[P_STORAGE_CLASS]
        if data_source:
            template["dataSource"] = dict(data_source)
        spec["source"] = {"volumeClaimTemplate": template}
    if mode == "ReadWriteMany":
        spec["clusterFilesystemAcknowledged"] = True
    if mode == "ReadOnlyMany":
        spec["readOnly"] = True  # many readers of restored data, never a writer
    return {**spec, **_serving(parameters)}


def _serving(parameters: Mapping[str, str]) -> dict[str, Any]:
    """The spec fields on how the volume is served: connections, TLS, QoS."""
    spec: dict[str, Any] = {}
    connections = _positive(parameters, P_CONNECTIONS, most=64)
    if connections is not None:
        spec["connections"] = connections
    if parameters.get(P_TLS_SECRET):
        tls_mode = _choice(parameters, P_TLS_MODE, ("Required", "Optional"))
        spec["tls"] = {"secretName": parameters[P_TLS_SECRET], "mode": tls_mode}
    elif P_TLS_MODE in parameters:
        raise InvalidArgument(f"{P_TLS_MODE} needs {P_TLS_SECRET}")
    qos = {k: v for k in QOS_PARAMETERS if (v := _positive(parameters, k)) is not None}
    if qos:
        spec["qos"] = qos
    return spec


@dataclass(frozen=True)
class Provision:
    """One CreateVolume request, checked: where its export goes and what it holds."""

    request_name: str
    namespace: str
    name: str
    size: int
    spec: dict[str, Any]
    claim: str = ""
    # Set when the spec holds a choice the controller made (a host device): then the request,
    # not the spec, is what a repeat must match.
    request_digest: str = ""
    pinned: bool = False

    @property
    def volume_id(self) -> str:
        return volume_id(self.namespace, self.name)

    @property
    def digest(self) -> str:
        if self.request_digest:
            return self.request_digest
        canonical = json.dumps(self.spec, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Content:
    """What a new volume starts from: the claim's ``dataSource`` and the smallest size it fits;
    for a volume source also the source's export and whether it is read-only (what a
    copy-on-write clone needs)."""

    data_source: Mapping[str, str]
    min_size: int
    base_export: str = ""
    base_read_only: bool = False


def check_request(req: pb.CreateVolumeRequest) -> None:
    if not req.name:
        raise InvalidArgument("name is required")
    if not req.volume_capabilities:
        raise InvalidArgument("volume_capabilities is required")


def plan(req: pb.CreateVolumeRequest, namespace: str, content: Content | None = None) -> Provision:
    """Validate a CreateVolume request (INVALID_ARGUMENT / OUT_OF_RANGE) into a Provision; a
    snapshot or clone source has been resolved into ``content`` by the caller."""
    check_request(req)
    params = dict(req.parameters)
    qos_patch(req.mutable_parameters)  # checked here; they override the class's QoS below
    params.update(req.mutable_parameters)
    mode = access_mode(req.volume_capabilities, params, has_data=content is not None)
    wanted = req.capacity_range
    if content and not wanted.required_bytes and not wanted.limit_bytes:
        size = round_size(content.min_size, 0)  # unasked: the size of what it restores
    else:
        size = round_size(wanted.required_bytes, wanted.limit_bytes)
    if content and size < content.min_size:
        raise OutOfRange(f"{size} bytes cannot hold the {content.min_size} bytes of the source")
    claim = _claim_of(params)
    if _choice(params, P_CLONE_MODE, CLONE_MODES) == "copyOnWrite":
        spec = cow_clone_spec(size, mode, params, content)
    else:
        spec = export_spec(size, mode, params, content.data_source if content else None)
    return Provision(
        request_name=req.name,
        namespace=namespace,
        name=export_name(req.name),
        size=size,
        spec=spec,
        claim=claim,
    )


def cow_clone_spec(
    size: int, mode: str, parameters: Mapping[str, str], content: Content | None
) -> dict[str, Any]:
    """A copy-on-write clone over a read-only source volume's export (``source.export``): the
    operator serves the base read-only under a persistent overlay on a claim of its own."""
    check_parameters(parameters)
    if content is None or not content.base_export:
        raise InvalidArgument(
            f"{P_CLONE_MODE} copyOnWrite needs a volume to clone (a PVC dataSource); a new or "
            "restored volume is always a copy"
        )
    if not content.base_read_only:
        raise InvalidArgument(
            f"{P_CLONE_MODE} copyOnWrite needs a read-only source volume (its data must not "
            "change under the overlay); clone a ReadOnlyMany volume, or use cloneMode copy"
        )
    if size != content.min_size:
        raise OutOfRange(
            f"a copy-on-write clone has its source's size ({content.min_size} bytes), "
            f"not {size}; grow it after it is created"
        )
    if mode in ("ReadOnlyMany", "ReadWriteMany"):
        raise InvalidArgument("a copy-on-write clone is a single writer's volume (ReadWriteOnce)")
    for key in (P_BACKING, P_VOLUME_MODE, *HOST_DEVICE_ONLY):
        if key in parameters:
            raise InvalidArgument(f"{key} is the source's for a copy-on-write clone; omit it")
    base: dict[str, Any] = {"name": content.base_export}
    if parameters.get(P_STORAGE_CLASS):
        base["storageClassName"] = parameters[P_STORAGE_CLASS]  # the overlay's claim's class
    return {"accessMode": mode, "source": {"export": base}, **_serving(parameters)}


def is_host_device(parameters: Mapping[str, str]) -> bool:
    return parameters.get(P_BACKING) == "hostDevice"


@dataclass(frozen=True)
class HostDeviceRequest:
    """A checked CreateVolume request for a host-device volume, before a device is chosen."""

    request_name: str
    namespace: str
    name: str
    mode: str
    required: int
    limit: int
    pinned: bool
    wipe: bool
    serving: dict[str, Any]
    claim: str
    digest: str

    def provision(self, node: str, path: str, size: int) -> Provision:
        """The Provision of this request on the device ``path`` of ``node``."""
        spec: dict[str, Any] = {
            "accessMode": self.mode,
            "source": {"hostDevice": {"nodeName": node, "path": path}},
        }
        if self.mode == "ReadWriteMany":
            spec["clusterFilesystemAcknowledged"] = True
        return Provision(
            request_name=self.request_name,
            namespace=self.namespace,
            name=self.name,
            size=size,
            spec={**spec, **self.serving},
            claim=self.claim,
            request_digest=self.digest,
            pinned=self.pinned,
        )


def host_device_request(req: pb.CreateVolumeRequest, namespace: str) -> HostDeviceRequest:
    """Validate a CreateVolume request of a ``backing: hostDevice`` class. Its size is the
    device's: the capacity range only says which devices fit (no range: any)."""
    check_request(req)
    params = dict(req.parameters)
    qos_patch(req.mutable_parameters)
    params.update(req.mutable_parameters)
    check_parameters(params)
    if req.HasField("volume_content_source"):
        raise InvalidArgument("a host-device volume starts as its device is: no snapshot or clone")
    for key in (P_STORAGE_CLASS, P_VOLUME_MODE, P_CLONE_MODE):
        if key in params:
            raise InvalidArgument(f"backing 'hostDevice' takes no {key}")
    pinned = _choice(params, P_PIN, ("false", "true")) == "true"
    wipe = _choice(params, P_WIPE, ("false", "true")) == "true"
    mode = access_mode(req.volume_capabilities, params, has_data=False)
    required, limit = req.capacity_range.required_bytes, req.capacity_range.limit_bytes
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(f"required_bytes {required} exceeds limit_bytes {limit}")
    serving = _serving(params)
    claim = _claim_of(params)
    asked = {"mode": mode, "required": required, "limit": limit, "pinned": pinned, **serving}
    if wipe:
        asked["wipe"] = True
    canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"))
    return HostDeviceRequest(
        request_name=req.name,
        namespace=namespace,
        name=export_name(req.name),
        mode=mode,
        required=required,
        limit=limit,
        pinned=pinned,
        wipe=wipe,
        serving=serving,
        claim=claim,
        digest=hashlib.sha256(canonical.encode()).hexdigest()[:32],
    )


def manifest(p: Provision) -> dict[str, Any]:
    """The NBDExport object to create for a Provision."""
    annotations = {ANNOTATION_NAME: p.request_name, ANNOTATION_DIGEST: p.digest}
    if p.claim:
        annotations[ANNOTATION_CLAIM] = p.claim
    if "size" not in p.spec:
        annotations[ANNOTATION_SIZE] = str(p.size)
    if p.pinned:
        annotations[ANNOTATION_PINNED] = "true"
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": p.name,
            "namespace": p.namespace,
            "labels": {LABEL_VOLUME: p.name, LABEL_MANAGED_BY: MANAGED_BY},
            "annotations": annotations,
        },
        "spec": p.spec,
    }


def same_request(existing: Mapping[str, Any], p: Provision) -> bool:
    """True when ``existing`` was created by an identical request."""
    annotations = (existing.get("metadata") or {}).get("annotations") or {}
    return bool(
        annotations.get(ANNOTATION_NAME) == p.request_name
        and annotations.get(ANNOTATION_DIGEST) == p.digest
    )


def is_provisioned(obj: Mapping[str, Any]) -> bool:
    """True for exports this controller made (a hand-written export is never deleted by CSI)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_MANAGED_BY) == MANAGED_BY and LABEL_VOLUME in labels


def capacity(obj: Mapping[str, Any]) -> int:
    """An export's size: what the server serves, else what the spec asks for."""
    served = (obj.get("status") or {}).get("sizeBytes")
    if isinstance(served, int) and served > 0:
        return served
    size = (obj.get("spec") or {}).get("size")
    if isinstance(size, int):
        return size
    provisioned = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SIZE, "")
    return int(provisioned) if provisioned.isdigit() else 0
