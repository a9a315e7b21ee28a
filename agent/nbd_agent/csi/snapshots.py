"""What a CreateSnapshot request asks for, as a VolumeSnapshot of the volume's data claim.

Why it exists: kube-nbd keeps a volume's data in a PersistentVolumeClaim of a backing storage
class (``<export>-nbd-data``). A snapshot of the volume is a snapshot of that claim, made by the
backing class's own CSI driver (reflink, copy-on-write or a storage array's snapshot: whatever
it does, point in time), after the volume's server has been told NBD_CMD_FLUSH so every write it
acknowledged is on the claim. A restore or a clone is a new volume whose claim has a
``dataSource`` (the backing snapshot, or the source volume's claim). This module builds those
objects and reads them back, as pure functions the tests inspect.

What it must not do: talk to Kubernetes or the NBD server, or import grpc.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from nbd_api import data_claim_name

from nbd_agent.csi import provision
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import InvalidArgument

LABEL_SNAPSHOT = "nbd.dev/csi-snapshot"
ANNOTATION_SOURCE = "nbd.dev/csi-source-volume"
ANNOTATION_SIZE = "nbd.dev/csi-size"
P_SNAPSHOT_CLASS = "snapshotClass"


def check_parameters(parameters: Mapping[str, str]) -> None:
    unknown = sorted(
        k
        for k in parameters
        if k != P_SNAPSHOT_CLASS and not k.startswith(provision.RESERVED_PREFIX)
    )
    if unknown:
        raise InvalidArgument(
            f"unknown VolumeSnapshotClass parameters {unknown}; known: [{P_SNAPSHOT_CLASS!r}]"
        )


def is_claim_backed(export: Mapping[str, Any]) -> bool:
    return "volumeClaimTemplate" in ((export.get("spec") or {}).get("source") or {})


def manifest(
    req: pb.CreateSnapshotRequest, namespace: str, source: Mapping[str, Any]
) -> dict[str, Any]:
    """The VolumeSnapshot of ``source``'s data claim for a CreateSnapshot request."""
    name = provision.export_name(req.name)
    spec: dict[str, Any] = {
        "source": {"persistentVolumeClaimName": data_claim_name(source["metadata"]["name"])}
    }
    if req.parameters.get(P_SNAPSHOT_CLASS):
        spec["volumeSnapshotClassName"] = req.parameters[P_SNAPSHOT_CLASS]
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {LABEL_SNAPSHOT: name, provision.LABEL_MANAGED_BY: provision.MANAGED_BY},
            "annotations": {
                provision.ANNOTATION_NAME: req.name,
                ANNOTATION_SOURCE: req.source_volume_id,
                ANNOTATION_SIZE: str(provision.capacity(source)),
                provision.ANNOTATION_DIGEST: _digest(spec),
            },
        },
        "spec": spec,
    }


def _digest(spec: Mapping[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def same_request(existing: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    have = (existing.get("metadata") or {}).get("annotations") or {}
    want = wanted["metadata"]["annotations"]
    keys = (provision.ANNOTATION_NAME, ANNOTATION_SOURCE, provision.ANNOTATION_DIGEST)
    return all(have.get(k) == want[k] for k in keys)


def is_provisioned(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(provision.LABEL_MANAGED_BY) == provision.MANAGED_BY and (
        LABEL_SNAPSHOT in labels
    )


def size_of(obj: Mapping[str, Any]) -> int:
    raw = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SIZE, "0")
    return int(raw) if str(raw).isdigit() else 0


def to_csi(obj: Mapping[str, Any]) -> pb.Snapshot:
    """The CSI view of a VolumeSnapshot: ready once the backing class says so."""
    meta = obj["metadata"]
    snap = pb.Snapshot(
        snapshot_id=provision.volume_id(meta["namespace"], meta["name"]),
        source_volume_id=(meta.get("annotations") or {}).get(ANNOTATION_SOURCE, ""),
        size_bytes=size_of(obj),
        ready_to_use=bool((obj.get("status") or {}).get("readyToUse")),
    )
    created = meta.get("creationTimestamp")
    if created:
        when = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
        snap.creation_time.FromDatetime(when.replace(tzinfo=datetime.UTC))
    else:
        snap.creation_time.GetCurrentTime()
    return snap


def restore_source(snapshot: Mapping[str, Any]) -> provision.Content:
    """A new volume restored from a snapshot: its claim's dataSource, and the size it needs."""
    return provision.Content(
        data_source={"kind": "VolumeSnapshot", "name": snapshot["metadata"]["name"]},
        min_size=size_of(snapshot),
    )


def clone_source(volume: Mapping[str, Any]) -> provision.Content:
    """A new volume cloned from a volume: its claim is cloned from the source's data claim."""
    if not is_claim_backed(volume):
        raise InvalidArgument(
            "only claim-backed volumes can be cloned (a memory volume has no claim)"
        )
    return provision.Content(
        data_source={
            "kind": "PersistentVolumeClaim",
            "name": data_claim_name(volume["metadata"]["name"]),
        },
        min_size=provision.capacity(volume),
        base_export=volume["metadata"]["name"],
        base_read_only=bool((volume.get("spec") or {}).get("readOnly")),
    )
