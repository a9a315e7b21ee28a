"""The CSI Controller service: volumes are NBDExports that this service creates and deletes.

Why it exists: external-provisioner, external-resizer and external-snapshotter call these RPCs
for dynamically provisioned claims, their growth, QoS changes and snapshots. Each volume is one
NBDExport in the controller's namespace (the operator then makes its claim, server and Service);
the volume id is ``<namespace>/<export>``, which the node plugin already resolves. The rules
follow the CSI spec's order: validate the request (INVALID_ARGUMENT, OUT_OF_RANGE), then let the
API server arbitrate (a create either wins or finds the name taken), then treat "already there,
identical" as success and "already there, different" as ALREADY_EXISTS. There is no in-process
lock: two controller replicas, or two racing calls, meet at the API server's create, which lets
exactly one through.

Snapshots are VolumeSnapshots of the volumes' data claims, made by the backing storage class
after the volume's server flushed (``snapshots.py`` says why); restores and clones are volumes
whose claim has a ``dataSource``. The flush is the one call that reaches an NBD server.

What it must not do: import grpc (the server module maps ``CsiError`` to status codes), build
manifests (``provision.py``, ``snapshots.py`` do), or wait for the operator or the snapshot
controller: an RPC answers from what the API holds now, and the sidecars retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from nbd_agent import handshake
from nbd_agent.csi import provision, snapshots
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from nbd_agent.csi.host_volumes import HostDeviceVolumes
from nbd_agent.csi.host_volumes import volume as host_device_volume
from nbd_agent.csi.kube import Conflict
from nbd_agent.errors import AgentError

log = logging.getLogger(__name__)
RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME,
    RPC.LIST_VOLUMES,
    RPC.EXPAND_VOLUME,
    RPC.CLONE_VOLUME,
    RPC.MODIFY_VOLUME,
)
SNAPSHOT_CAPABILITIES = (RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS)
# Capacity is known for host devices only (what the node plugins published, minus the claimed).
HOST_DEVICE_CAPABILITIES = (RPC.GET_CAPACITY,)
Quiesce = Callable[[Mapping[str, Any]], None]


def flush_server(export: Mapping[str, Any]) -> None:
    """NBD_CMD_FLUSH to a Ready export's server, so its acknowledged writes are on the claim
    before the claim is snapshotted. An export without a running server has nothing to flush."""
    status = export.get("status") or {}
    if status.get("phase") != "Ready" or not status.get("uri"):
        return
    try:
        handshake.flush_export(handshake.parse_uri(str(status["uri"])))
    except AgentError as exc:
        raise Unavailable(f"flushing {status['uri']} before the snapshot: {exc}") from exc


class Exports(Protocol):
    """What the controller needs of the Kubernetes API (``kube.ExportStore``, and
    ``kube.SnapshotStore`` for VolumeSnapshots)."""

    def create(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def every(self, namespace: str) -> list[dict[str, Any]]: ...

    def list(self, namespace: str, label: str) -> list[dict[str, Any]]: ...

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...

    def delete(self, namespace: str, name: str) -> None: ...


def _volume(obj: Mapping[str, Any]) -> pb.Volume:
    if "hostDevice" in ((obj.get("spec") or {}).get("source") or {}):
        return host_device_volume(obj)
    meta = obj["metadata"]
    return pb.Volume(
        volume_id=provision.volume_id(meta["namespace"], meta["name"]),
        capacity_bytes=provision.capacity(obj),
    )


def _page(
    items: list[dict[str, Any]], max_entries: int, token: str
) -> tuple[list[dict[str, Any]], str]:
    """One page of a listing and the token of the next (the offset; "" after the last page).
    A token that no longer fits the listing is ABORTED, as the spec asks."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must not be negative")
    start = 0
    if token:
        if not token.isdigit() or int(token) > len(items):
            raise Aborted(f"starting_token {token!r} is not valid (any more)")
        start = int(token)
    end = len(items) if not max_entries else min(len(items), start + max_entries)
    return items[start:end], str(end) if end < len(items) else ""


class ControllerService:
    def __init__(
        self,
        exports: Exports,
        namespace: str,
        snapshots: Exports | None = None,
        quiesce: Quiesce = flush_server,
        leases: Exports | None = None,
    ) -> None:
        self.exports = exports
        self.namespace = namespace
        self.snapshots = snapshots  # None: the cluster has no VolumeSnapshot API
        self.quiesce = quiesce
        # None: host-device volumes are not enabled (--host-devices), GetCapacity not offered.
        self.host_devices = HostDeviceVolumes(exports, leases, namespace) if leases else None

    def ControllerGetCapabilities(
        self, req: pb.ControllerGetCapabilitiesRequest
    ) -> pb.ControllerGetCapabilitiesResponse:
        kinds = CAPABILITIES + (SNAPSHOT_CAPABILITIES if self.snapshots is not None else ())
        kinds += HOST_DEVICE_CAPABILITIES if self.host_devices is not None else ()
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=RPC(type=k)) for k in kinds]
        )

    # ---- create / delete ----

    def _content(self, req: pb.CreateVolumeRequest) -> provision.Content | None:
        """The snapshot or volume a new volume starts from (NOT_FOUND when it is gone)."""
        kind = req.volume_content_source.WhichOneof("type")
        if kind == "volume":
            return snapshots.clone_source(
                self._existing(req.volume_content_source.volume.volume_id)
            )
        if kind == "snapshot":
            snapshot = self._snapshot(req.volume_content_source.snapshot.snapshot_id)
            if snapshot is None:
                raise NotFound(f"snapshot {req.volume_content_source.snapshot.snapshot_id!r}")
            return snapshots.restore_source(snapshot)
        return None

    def CreateVolume(self, req: pb.CreateVolumeRequest) -> pb.CreateVolumeResponse:
        provision.check_request(req)
        if provision.is_host_device(req.parameters):
            if self.host_devices is None:
                raise InvalidArgument(
                    "backing 'hostDevice' is not enabled in this controller (--host-devices;"
                    " hostDevices.enabled in the chart)"
                )
            return pb.CreateVolumeResponse(volume=self.host_devices.create(req))
        plan = provision.plan(req, self.namespace, self._content(req))
        try:
            obj = self.exports.create(provision.manifest(plan))
        except Conflict:
            existing = self.exports.get(plan.namespace, plan.name)
            if existing is None:
                raise Aborted(f"NBDExport {plan.volume_id} is being deleted; retry") from None
            if not provision.same_request(existing, plan):
                raise AlreadyExists(
                    f"NBDExport {plan.volume_id} exists with another capacity or parameters"
                    f" (or was not made for volume {req.name!r})"
                ) from None
            obj = existing
        else:
            log.info("created NBDExport %s for volume %r", plan.volume_id, req.name)
        volume = _volume(obj)
        if req.HasField("volume_content_source"):
            volume.content_source.CopyFrom(req.volume_content_source)
        return pb.CreateVolumeResponse(volume=volume)

    def DeleteVolume(self, req: pb.DeleteVolumeRequest) -> pb.DeleteVolumeResponse:
        if not req.volume_id:
            raise InvalidArgument("volume_id is required")
        where = provision.split_volume_id(req.volume_id)
        if where is None:
            return pb.DeleteVolumeResponse()  # no export can have this id: already gone
        obj = self.exports.get(*where)
        if obj is not None and not provision.is_provisioned(obj):
            raise FailedPrecondition(
                f"NBDExport {req.volume_id} was not provisioned by the CSI controller;"
                " delete it with kubectl if that is meant"
            )
        if obj is not None:
            self.exports.delete(*where)
            log.info("deleted NBDExport %s", req.volume_id)
        if self.host_devices is not None and where[0] == self.namespace:
            # Also when the export is already gone: a retry after the delete frees the device.
            self.host_devices.release(where[1])
        return pb.DeleteVolumeResponse()

    def GetCapacity(self, req: pb.GetCapacityRequest) -> pb.GetCapacityResponse:
        """Free allowlisted host devices of a ``backing: hostDevice`` class (in the segment,
        when one is given). Other classes get FAILED_PRECONDITION: their space is the backing
        storage class's or a node's memory, which kube-nbd cannot see; no number is true."""
        if self.host_devices is None:
            raise Unimplemented("GetCapacity is offered with --host-devices only")
        provision.check_parameters(req.parameters)
        if not provision.is_host_device(req.parameters):
            raise FailedPrecondition(
                "kube-nbd knows the capacity of backing 'hostDevice' classes only; a claim or"
                " memory class's space is its backing storage's (use volumeBindingMode"
                " Immediate for such classes when capacity tracking is on)"
            )
        return self.host_devices.capacity(req)

    # ---- inspection ----

    def _existing(self, volume: str) -> dict[str, Any]:
        if not volume:
            raise InvalidArgument("volume_id is required")
        where = provision.split_volume_id(volume)
        obj = self.exports.get(*where) if where else None
        if obj is None:
            raise NotFound(f"volume {volume!r} does not exist")
        return obj

    def ValidateVolumeCapabilities(
        self, req: pb.ValidateVolumeCapabilitiesRequest
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        if not req.volume_id:
            raise InvalidArgument("volume_id is required")
        if not req.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        obj = self._existing(req.volume_id)
        spec = obj.get("spec") or {}
        have = spec.get("accessMode", "ReadWriteOnce")
        try:
            params, read_only = dict(req.parameters), bool(spec.get("readOnly"))
            wanted = provision.access_mode(req.volume_capabilities, params, has_data=read_only)
        except InvalidArgument as exc:
            return pb.ValidateVolumeCapabilitiesResponse(message=str(exc))
        if wanted != have:
            return pb.ValidateVolumeCapabilitiesResponse(
                message=f"the export is {have}; these capabilities need {wanted}"
            )
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=req.volume_context,
            volume_capabilities=req.volume_capabilities,
            parameters=req.parameters,
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    def ListVolumes(self, req: pb.ListVolumesRequest) -> pb.ListVolumesResponse:
        items = self.exports.list(self.namespace, provision.LABEL_VOLUME)
        page, next_token = _page(items, req.max_entries, req.starting_token)
        entries = [pb.ListVolumesResponse.Entry(volume=_volume(o)) for o in page]
        return pb.ListVolumesResponse(entries=entries, next_token=next_token)

    # ---- expansion ----

    def ControllerExpandVolume(
        self, req: pb.ControllerExpandVolumeRequest
    ) -> pb.ControllerExpandVolumeResponse:
        if not req.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        obj = self._existing(req.volume_id)
        spec = obj.get("spec") or {}
        source = spec.get("source") or {}
        if "hostDevice" in source:
            raise FailedPrecondition(
                "a host-device volume is its whole device; it cannot grow (claim a larger one)"
            )
        if "memory" in source:
            raise FailedPrecondition(
                "a memory volume cannot grow: its server restarts to grow and memory starts empty"
            )
        if (source.get("volumeClaimTemplate") or {}).get("volumeMode") == "Block":
            raise FailedPrecondition(
                "a volume on a Block backing claim cannot grow: its server serves the device as"
                " it was opened (use volumeMode Filesystem, the default, for volumes that grow)"
            )
        wanted = req.capacity_range
        size = provision.round_size(wanted.required_bytes, wanted.limit_bytes)
        current = spec.get("size")
        if not isinstance(current, int):
            raise FailedPrecondition(f"volume {req.volume_id} has no byte size in its spec")
        if size > current:
            meta = obj["metadata"]
            self.exports.patch(meta["namespace"], meta["name"], {"spec": {"size": size}})
            log.info("growing NBDExport %s from %d to %d bytes", req.volume_id, current, size)
        # The node always finishes: the device grows when the restarted server is reattached,
        # then the filesystem is grown (block volumes only wait for the device's new size).
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=max(size, current), node_expansion_required=True
        )

    # ---- VolumeAttributesClass ----

    def ControllerModifyVolume(
        self, req: pb.ControllerModifyVolumeRequest
    ) -> pb.ControllerModifyVolumeResponse:
        """New QoS limits from a VolumeAttributesClass: the export's ``spec.qos`` (the operator
        restarts its server with them; attached nodes reconnect, I/O pauses, nothing fails)."""
        qos = provision.qos_patch(req.mutable_parameters)
        obj = self._existing(req.volume_id)
        if "memory" in ((obj.get("spec") or {}).get("source") or {}):
            raise FailedPrecondition(
                "a memory volume's server cannot restart with new limits: memory starts empty"
            )
        if qos and any((obj["spec"].get("qos") or {}).get(k) != v for k, v in qos.items()):
            meta = obj["metadata"]
            self.exports.patch(meta["namespace"], meta["name"], {"spec": {"qos": qos}})
            log.info("volume %s: QoS now %s", req.volume_id, qos)
        return pb.ControllerModifyVolumeResponse()

    # ---- snapshots ----

    def _snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        """Our VolumeSnapshot of this id, or None (unknown ids, other namespaces, not ours)."""
        if not snapshot_id:
            raise InvalidArgument("snapshot_id is required")
        where = provision.split_volume_id(snapshot_id)
        if self.snapshots is None or where is None or where[0] != self.namespace:
            return None
        obj = self.snapshots.get(*where)
        return obj if obj is not None and snapshots.is_provisioned(obj) else None

    def CreateSnapshot(self, req: pb.CreateSnapshotRequest) -> pb.CreateSnapshotResponse:
        if not req.name:
            raise InvalidArgument("name is required")
        if not req.source_volume_id:
            raise InvalidArgument("source_volume_id is required")
        snapshots.check_parameters(req.parameters)
        if self.snapshots is None:
            raise FailedPrecondition("the cluster serves no snapshot.storage.k8s.io/v1 API")
        source = self._existing(req.source_volume_id)
        if not snapshots.is_claim_backed(source):
            raise FailedPrecondition(
                f"volume {req.source_volume_id} has no data claim to snapshot (memory or host"
                " device backing)"
            )
        wanted = snapshots.manifest(req, self.namespace, source)
        existing = self.snapshots.get(self.namespace, wanted["metadata"]["name"])
        if existing is None:
            self.quiesce(source)
            try:
                existing = self.snapshots.create(wanted)
                log.info("snapshot %r of %s requested", req.name, req.source_volume_id)
            except Conflict:
                existing = self.snapshots.get(self.namespace, wanted["metadata"]["name"])
        if existing is None:
            raise Aborted(f"snapshot {req.name!r} is being deleted; retry")
        if not snapshots.same_request(existing, wanted):
            raise AlreadyExists(
                f"snapshot {req.name!r} exists for another volume or with other parameters"
            )
        return pb.CreateSnapshotResponse(snapshot=snapshots.to_csi(existing))

    def ListSnapshots(self, req: pb.ListSnapshotsRequest) -> pb.ListSnapshotsResponse:
        """Our snapshots, or the one ``snapshot_id`` names, or those of ``source_volume_id``;
        an id that matches nothing is an empty answer, not an error."""
        if self.snapshots is None:
            return pb.ListSnapshotsResponse()
        items = self.snapshots.list(self.namespace, snapshots.LABEL_SNAPSHOT)
        if req.snapshot_id:
            items = [o for o in items if snapshots.to_csi(o).snapshot_id == req.snapshot_id]
        if req.source_volume_id:
            wanted = req.source_volume_id
            items = [o for o in items if snapshots.to_csi(o).source_volume_id == wanted]
        page, next_token = _page(items, req.max_entries, req.starting_token)
        entries = [pb.ListSnapshotsResponse.Entry(snapshot=snapshots.to_csi(o)) for o in page]
        return pb.ListSnapshotsResponse(entries=entries, next_token=next_token)

    def DeleteSnapshot(self, req: pb.DeleteSnapshotRequest) -> pb.DeleteSnapshotResponse:
        obj = self._snapshot(req.snapshot_id)
        if obj is not None and self.snapshots is not None:
            self.snapshots.delete(self.namespace, obj["metadata"]["name"])
            log.info("deleted snapshot %s", req.snapshot_id)
        return pb.DeleteSnapshotResponse()
