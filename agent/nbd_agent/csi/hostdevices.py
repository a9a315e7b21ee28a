"""Host-device backed volumes: which allowlisted devices exist, which are free, which one a
CreateVolume request gets. Pure functions over Lease objects; no I/O.

Why it exists: a StorageClass with ``backing: hostDevice`` turns a whole block device of some
node into a volume (an NBDExport with ``source.hostDevice``). The controller cannot see node
devices, so each node plugin publishes the devices its admin allowlisted (``nbd-agent csi
--host-device GLOB``) as a per-node *inventory* Lease in the release namespace: holder the node,
``renewTime`` refreshed every publish, the devices and their sizes in an annotation. A Lease,
because the agent already may create and patch Leases (its writer locks) -- no new permission on
a node -- and because an expired Lease says "this node's plugin is gone, do not offer its disks".

A device is taken by creating a *claim* Lease whose name is a hash of ``node + path``: the API
server lets exactly one create of a name succeed, so two CreateVolume calls (or two controller
replicas) never get the same device. The claim's holder is the volume's export name; a retry of
the same CreateVolume finds its own claim and reuses it (a crash between claim and export leaves
nothing stranded). DeleteVolume deletes the export, then the claim; the device is not wiped,
unless the class says ``wipeOnDelete``: then the claim is marked Wiping and the node plugin
zeroes the device before deleting it (``host_wipe.py``).

What it must not do: offer a device no node published (the allowlist is the node's, resolved
there), talk to Kubernetes, or import grpc.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbd_agent.csi._generated import csi_pb2 as pb

# The topology key every node plugin reports in NodeGetInfo (kubelet copies it to a Node label),
# and the one accessibility requirements and GetCapacity segments are read with.
TOPOLOGY_KEY = "topology.nbd.dev/node"

LABEL_INVENTORY = "nbd.dev/host-device-inventory"
LABEL_CLAIM = "nbd.dev/host-device-claim"
ANNOTATION_DEVICES = "nbd.dev/host-devices"
ANNOTATION_NODE = "nbd.dev/host-device-node"
ANNOTATION_PATH = "nbd.dev/host-device-path"
ANNOTATION_SIZE = "nbd.dev/host-device-size"
# On a claim: the class asked for the device to be zeroed when the volume is deleted; and
# "Wiping" once it was: the node plugin zeroes the device, then deletes the claim.
ANNOTATION_WIPE = "nbd.dev/host-device-wipe-on-delete"
ANNOTATION_STATE = "nbd.dev/host-device-state"
STATE_WIPING = "Wiping"
INVENTORY_PREFIX = "nbd-host-devices-"
CLAIM_PREFIX = "nbd-host-device-"
_MAX_NAME = 253
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass(frozen=True, order=True)
class Device:
    """One allowlisted block device of one node, with its size in bytes."""

    node: str
    path: str
    size: int

    @property
    def key(self) -> str:
        return f"{self.node}\0{self.path}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro_time(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(raw: object) -> datetime.datetime | None:
    if not isinstance(raw, str):
        return None
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(raw, layout).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue
    return None


# ---- inventories (written by the node plugin, read by the controller) ----


def inventory_name(node: str) -> str:
    name = INVENTORY_PREFIX + node
    if len(name) <= _MAX_NAME:
        return name
    return INVENTORY_PREFIX + hashlib.sha256(node.encode()).hexdigest()[:32]


def inventory_lease(
    namespace: str,
    node: str,
    devices: Sequence[tuple[str, int]],
    duration_seconds: int,
    now: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The Lease a node plugin publishes: ``devices`` are (path, bytes) pairs it resolved from
    its allowlist. It is current for ``duration_seconds`` after ``now``."""
    listed = [{"path": path, "sizeBytes": size} for path, size in devices]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": inventory_name(node),
            "namespace": namespace,
            "labels": {LABEL_INVENTORY: "true"},
            "annotations": {ANNOTATION_DEVICES: json.dumps(listed, separators=(",", ":"))},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration_seconds,
            "renewTime": _micro_time(now or _now()),
        },
    }


def published(
    leases: Iterable[Mapping[str, Any]], now: datetime.datetime | None = None
) -> list[Device]:
    """The devices of every inventory Lease that is still current (its node plugin renewed it
    within its duration); garbled entries are skipped, not trusted."""
    when = now or _now()
    devices: list[Device] = []
    for lease in leases:
        meta = lease.get("metadata") or {}
        if (meta.get("labels") or {}).get(LABEL_INVENTORY) != "true":
            continue
        spec = lease.get("spec") or {}
        node = spec.get("holderIdentity")
        renewed = _parse_time(spec.get("renewTime"))
        duration = spec.get("leaseDurationSeconds")
        if not isinstance(node, str) or not node or renewed is None:
            continue
        if not isinstance(duration, int) or renewed + datetime.timedelta(seconds=duration) < when:
            continue
        try:
            entries = json.loads((meta.get("annotations") or {}).get(ANNOTATION_DEVICES, "[]"))
        except ValueError:
            continue
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            path, size = entry.get("path"), entry.get("sizeBytes")
            if isinstance(path, str) and path.startswith("/dev/") and isinstance(size, int):
                devices.extend([Device(node, path, size)] if size > 0 else [])
    return sorted(set(devices))


# ---- claims (created and deleted by the controller) ----


def claim_name(device: Device) -> str:
    return CLAIM_PREFIX + hashlib.sha256(device.key.encode()).hexdigest()[:32]


def claim_lease(namespace: str, device: Device, export: str, wipe: bool = False) -> dict[str, Any]:
    """The Lease whose creation takes ``device`` for the volume ``export`` (it never expires:
    only DeleteVolume, or the node plugin after a wipe, gives the device back)."""
    annotations = {
        ANNOTATION_NODE: device.node,
        ANNOTATION_PATH: device.path,
        ANNOTATION_SIZE: str(device.size),
    }
    if wipe:
        annotations[ANNOTATION_WIPE] = "true"
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": claim_name(device),
            "namespace": namespace,
            "labels": {LABEL_CLAIM: "true"},
            "annotations": annotations,
        },
        "spec": {"holderIdentity": export},
    }


def claimed(leases: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Claim Lease name -> the export holding it."""
    return {
        str(lease["metadata"]["name"]): str((lease.get("spec") or {}).get("holderIdentity", ""))
        for lease in leases
        if ((lease.get("metadata") or {}).get("labels") or {}).get(LABEL_CLAIM) == "true"
    }


def claim_device(lease: Mapping[str, Any]) -> Device | None:
    annotations = (lease.get("metadata") or {}).get("annotations") or {}
    size = annotations.get(ANNOTATION_SIZE, "")
    node, path = annotations.get(ANNOTATION_NODE), annotations.get(ANNOTATION_PATH)
    if not node or not path or not str(size).isdigit():
        return None
    return Device(str(node), str(path), int(size))


def wipe_on_delete(lease: Mapping[str, Any]) -> bool:
    return ((lease.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_WIPE) == "true"


def wiping(lease: Mapping[str, Any]) -> bool:
    """True for a claim whose volume is deleted and whose device waits to be zeroed."""
    annotations = (lease.get("metadata") or {}).get("annotations") or {}
    return annotations.get(ANNOTATION_STATE) == STATE_WIPING


def held_by(leases: Iterable[Mapping[str, Any]], export: str) -> list[Mapping[str, Any]]:
    """The claim Leases ``export`` holds (one, unless something went wrong)."""
    return [
        lease
        for lease in leases
        if ((lease.get("metadata") or {}).get("labels") or {}).get(LABEL_CLAIM) == "true"
        and (lease.get("spec") or {}).get("holderIdentity") == export
    ]


def free(devices: Iterable[Device], claims: Mapping[str, str]) -> list[Device]:
    return [d for d in devices if claim_name(d) not in claims]


# ---- topology and choice ----


def is_label_value(value: str) -> bool:
    """True when ``value`` may be a label value (a node's segment becomes a Node label)."""
    return bool(value) and _LABEL_VALUE.match(value) is not None


def in_segment(node: str, segment: Mapping[str, str]) -> bool:
    """True when ``node`` lies in a topology segment: every key of it is ours and matches (a
    key this driver does not report can never be satisfied by it)."""
    return all(key == TOPOLOGY_KEY and value == node for key, value in segment.items())


def segment_of(device: Device) -> pb.Topology:
    return pb.Topology(segments={TOPOLOGY_KEY: device.node})


def fits(device: Device, required: int, limit: int) -> bool:
    return device.size >= required and (not limit or device.size <= limit)


def candidates(
    devices: Iterable[Device],
    required: int,
    limit: int,
    requirement: pb.TopologyRequirement | None = None,
) -> list[Device]:
    """Free devices a request may get, best first: inside the requisite topology (when there
    is one), on the first preferred segment (with WaitForFirstConsumer, the scheduler's node),
    then the smallest that fits, so large disks stay for large claims. Later preferred segments
    are not ranked: external-provisioner orders them arbitrarily (by a hash of the claim)."""
    requisite = [dict(t.segments) for t in requirement.requisite] if requirement else []
    first = (
        dict(requirement.preferred[0].segments) if requirement and requirement.preferred else None
    )
    allowed = [
        d
        for d in devices
        if fits(d, required, limit)
        and (not requisite or any(in_segment(d.node, s) for s in requisite))
    ]

    def rank(device: Device) -> tuple[bool, int, str, str]:
        elsewhere = first is None or not in_segment(device.node, first)
        return elsewhere, device.size, device.node, device.path

    return sorted(allowed, key=rank)


def capacity_in(devices: Iterable[Device], segment: Mapping[str, str] | None) -> tuple[int, int]:
    """(total, largest) bytes of the free devices in a segment (all of them when None)."""
    sizes = [d.size for d in devices if segment is None or in_segment(d.node, segment)]
    return sum(sizes), max(sizes, default=0)
