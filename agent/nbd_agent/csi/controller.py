"""The CSI Controller service: volumes are NBDExports that this service creates and deletes.

Why it exists: external-provisioner and external-resizer call these RPCs for dynamically
provisioned claims. Each volume is one NBDExport in the controller's namespace (the operator then
makes its claim, server and Service); the volume id is ``<namespace>/<export>``, which the node
plugin already resolves. The rules follow the CSI spec's order: validate the request
(INVALID_ARGUMENT, OUT_OF_RANGE), then let the API server arbitrate (a create either wins or
finds the name taken), then treat "already there, identical" as success and "already there,
different" as ALREADY_EXISTS. There is no in-process lock: two controller replicas, or two racing
calls, meet at the API server's create, which lets exactly one through.

What it must not do: import grpc (the server module maps ``CsiError`` to status codes), build
manifests (``provision.py`` does), or wait for the operator: an RPC answers from what the API
holds now, and the sidecars retry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from nbd_agent.csi import provision
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from nbd_agent.csi.kube import Conflict

log = logging.getLogger(__name__)
RPC = pb.ControllerServiceCapability.RPC
CAPABILITIES = (RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.EXPAND_VOLUME)


class Exports(Protocol):
    """What the controller needs of the Kubernetes API (``kube.ExportStore``)."""

    def create(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(self, namespace: str, label: str) -> list[dict[str, Any]]: ...

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...

    def delete(self, namespace: str, name: str) -> None: ...


def _volume(obj: Mapping[str, Any]) -> pb.Volume:
    meta = obj["metadata"]
    return pb.Volume(
        volume_id=provision.volume_id(meta["namespace"], meta["name"]),
        capacity_bytes=provision.capacity(obj),
    )


class ControllerService:
    def __init__(self, exports: Exports, namespace: str) -> None:
        self.exports = exports
        self.namespace = namespace

    def ControllerGetCapabilities(
        self, req: pb.ControllerGetCapabilitiesRequest
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse(
            capabilities=[pb.ControllerServiceCapability(rpc=RPC(type=k)) for k in CAPABILITIES]
        )

    # ---- create / delete ----

    def CreateVolume(self, req: pb.CreateVolumeRequest) -> pb.CreateVolumeResponse:
        plan = provision.plan(req, self.namespace)
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
        return pb.CreateVolumeResponse(volume=_volume(obj))

    def DeleteVolume(self, req: pb.DeleteVolumeRequest) -> pb.DeleteVolumeResponse:
        if not req.volume_id:
            raise InvalidArgument("volume_id is required")
        where = provision.split_volume_id(req.volume_id)
        if where is None:
            return pb.DeleteVolumeResponse()  # no export can have this id: already gone
        obj = self.exports.get(*where)
        if obj is None:
            return pb.DeleteVolumeResponse()
        if not provision.is_provisioned(obj):
            raise FailedPrecondition(
                f"NBDExport {req.volume_id} was not provisioned by the CSI controller;"
                " delete it with kubectl if that is meant"
            )
        self.exports.delete(*where)
        log.info("deleted NBDExport %s", req.volume_id)
        return pb.DeleteVolumeResponse()

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
        have = (obj.get("spec") or {}).get("accessMode", "ReadWriteOnce")
        try:
            wanted = provision.access_mode(req.volume_capabilities, dict(req.parameters))
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
        if req.max_entries < 0:
            raise InvalidArgument("max_entries must not be negative")
        items = self.exports.list(self.namespace, provision.LABEL_VOLUME)
        start = 0
        if req.starting_token:
            if not req.starting_token.isdigit() or int(req.starting_token) > len(items):
                raise Aborted(f"starting_token {req.starting_token!r} is not valid (any more)")
            start = int(req.starting_token)
        end = len(items) if not req.max_entries else min(len(items), start + req.max_entries)
        entries = [pb.ListVolumesResponse.Entry(volume=_volume(o)) for o in items[start:end]]
        return pb.ListVolumesResponse(
            entries=entries, next_token=str(end) if end < len(items) else ""
        )

    # ---- expansion ----

    def ControllerExpandVolume(
        self, req: pb.ControllerExpandVolumeRequest
    ) -> pb.ControllerExpandVolumeResponse:
        if not req.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        obj = self._existing(req.volume_id)
        spec = obj.get("spec") or {}
        if "memory" in (spec.get("source") or {}):
            raise FailedPrecondition(
                "a memory volume cannot grow: its server restarts to grow and memory starts empty"
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
