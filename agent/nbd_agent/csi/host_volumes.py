"""CreateVolume, DeleteVolume and GetCapacity for ``backing: hostDevice`` classes.

Why it exists: a host-device volume needs one more step than the others: a device is chosen
from what the node plugins published and taken with a claim Lease (``hostdevices.py`` says
why Leases) before its NBDExport is created. The order makes every step safe to repeat: a retry
finds its own claim, a lost race for a device moves on to the next one, and DeleteVolume gives
the claim back only after the export is gone.

What it must not do: choose a device no node plugin published, take a device by anything but
a claim create (the API server is the only arbiter), free a device its class asked to have
wiped (its node plugin frees it after the wipe), or import grpc.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from nbd_agent.csi import hostdevices, provision
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import Aborted, AlreadyExists, InvalidArgument, ResourceExhausted
from nbd_agent.csi.kube import Conflict

log = logging.getLogger(__name__)


class Store(Protocol):
    def create(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def every(self, namespace: str) -> list[dict[str, Any]]: ...

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]: ...

    def list(self, namespace: str, label: str) -> list[dict[str, Any]]: ...

    def delete(self, namespace: str, name: str) -> None: ...


def volume(obj: Mapping[str, Any]) -> pb.Volume:
    """The CSI Volume of a host-device export: the device's size; its node as the accessible
    topology only when the class pinned it (NBD reaches the device from every node)."""
    meta = obj["metadata"]
    out = pb.Volume(
        volume_id=provision.volume_id(meta["namespace"], meta["name"]),
        capacity_bytes=provision.capacity(obj),
    )
    source = ((obj.get("spec") or {}).get("source") or {}).get("hostDevice") or {}
    pinned = (meta.get("annotations") or {}).get(provision.ANNOTATION_PINNED) == "true"
    if pinned and source.get("nodeName"):
        out.accessible_topology.add(segments={hostdevices.TOPOLOGY_KEY: source["nodeName"]})
    return out


class HostDeviceVolumes:
    def __init__(self, exports: Store, leases: Store, namespace: str) -> None:
        self.exports = exports
        self.leases = leases
        self.namespace = namespace

    def _claims(self) -> list[dict[str, Any]]:
        return self.leases.list(self.namespace, hostdevices.LABEL_CLAIM)

    def free_devices(self) -> list[hostdevices.Device]:
        """Published, unclaimed, and named by no NBDExport of the namespace (an export written
        by hand on an allowlisted device has no claim; its path is compared as written)."""
        inventories = self.leases.list(self.namespace, hostdevices.LABEL_INVENTORY)
        claims = hostdevices.claimed(self._claims())
        used = {
            (str(source.get("nodeName")), str(source.get("path")))
            for export in self.exports.every(self.namespace)
            if (source := ((export.get("spec") or {}).get("source") or {}).get("hostDevice"))
        }
        return [
            d
            for d in hostdevices.free(hostdevices.published(inventories), claims)
            if (d.node, d.path) not in used
        ]

    # ---- create ----

    def create(self, req: pb.CreateVolumeRequest) -> pb.Volume:
        asked = provision.host_device_request(req, self.namespace)
        existing = self.exports.get(self.namespace, asked.name)
        if existing is not None:
            return self._same(existing, asked)
        device = self._own_claim(asked.name) or self._take(asked, req)
        plan = asked.provision(device.node, device.path, device.size)
        try:
            obj = self.exports.create(provision.manifest(plan))
        except Conflict:
            # Raced with a repeat of this request (or a hand-made export of the name).
            again = self.exports.get(self.namespace, asked.name)
            if again is None:
                raise Aborted(f"NBDExport {plan.volume_id} is being deleted; retry") from None
            return self._same(again, asked)
        log.info(
            "created NBDExport %s on %s of node %s (%d bytes) for volume %r",
            plan.volume_id,
            device.path,
            device.node,
            device.size,
            req.name,
        )
        return volume(obj)

    def _same(self, existing: Mapping[str, Any], asked: provision.HostDeviceRequest) -> pb.Volume:
        annotations = (existing.get("metadata") or {}).get("annotations") or {}
        if (
            annotations.get(provision.ANNOTATION_NAME) != asked.request_name
            or annotations.get(provision.ANNOTATION_DIGEST) != asked.digest
        ):
            raise AlreadyExists(
                f"NBDExport {self.namespace}/{asked.name} exists with another capacity or"
                f" parameters (or was not made for volume {asked.request_name!r})"
            )
        return volume(existing)

    def _own_claim(self, export: str) -> hostdevices.Device | None:
        """The device an earlier attempt of this request claimed before it could create the
        export (the controller restarted, or the export create failed)."""
        for lease in hostdevices.held_by(self._claims(), export):
            device = hostdevices.claim_device(lease)
            if device is not None and not hostdevices.wiping(lease):
                return device
        return None

    def _take(
        self, asked: provision.HostDeviceRequest, req: pb.CreateVolumeRequest
    ) -> hostdevices.Device:
        requirement = (
            req.accessibility_requirements if req.HasField("accessibility_requirements") else None
        )
        free = self.free_devices()
        options = hostdevices.candidates(free, asked.required, asked.limit, requirement)
        for device in options:
            try:
                claim = hostdevices.claim_lease(self.namespace, device, asked.name, asked.wipe)
                self.leases.create(claim)
            except Conflict:
                continue  # another CreateVolume took it between our list and our create
            return device
        raise ResourceExhausted(self._why_none(free, asked, len(options)))

    def _why_none(
        self, free: list[hostdevices.Device], asked: provision.HostDeviceRequest, tried: int
    ) -> str:
        if tried:
            return f"all {tried} fitting host devices were taken meanwhile; retry"
        if not free:
            return (
                "no free host device: no node plugin publishes an unclaimed allowlisted device"
                " (hostDevices.paths in the chart)"
            )
        wanted = f"[{asked.required}, {asked.limit or 'unbounded'}] bytes"
        return (
            f"none of the {len(free)} free host devices is within {wanted} and the requested"
            " topology"
        )

    # ---- delete ----

    def release(self, export: str) -> None:
        """Give back the devices ``export`` holds (after its NBDExport is gone). Without
        ``wipeOnDelete`` the data stays on the device; with it the claim is marked Wiping and
        stays until the device's node plugin has zeroed the device and deleted it."""
        for lease in hostdevices.held_by(self._claims(), export):
            name = lease["metadata"]["name"]
            device = hostdevices.claim_device(lease)
            where = f"{device.path} of node {device.node}" if device else name
            if not hostdevices.wipe_on_delete(lease):
                self.leases.delete(self.namespace, name)
                log.info("host device %s is free again (not wiped)", where)
            elif not hostdevices.wiping(lease):
                mark = {hostdevices.ANNOTATION_STATE: hostdevices.STATE_WIPING}
                self.leases.patch(self.namespace, name, {"metadata": {"annotations": mark}})
                log.info("host device %s is left to its node plugin to wipe", where)

    # ---- capacity ----

    def capacity(self, req: pb.GetCapacityRequest) -> pb.GetCapacityResponse:
        # The class's parameters must be valid (INVALID_ARGUMENT otherwise) ...
        provision.host_device_request(
            pb.CreateVolumeRequest(
                name="capacity", parameters=req.parameters, volume_capabilities=[_any_capability()]
            ),
            self.namespace,
        )
        # ... but capabilities it cannot serve only mean that nothing is available to them.
        if req.volume_capabilities:
            try:
                provision.access_mode(req.volume_capabilities, dict(req.parameters))
            except InvalidArgument:
                return pb.GetCapacityResponse(available_capacity=0)
        segment = (
            dict(req.accessible_topology.segments) if req.HasField("accessible_topology") else None
        )
        total, largest = hostdevices.capacity_in(self.free_devices(), segment)
        response = pb.GetCapacityResponse(available_capacity=total)
        if largest:
            # A volume is one whole device: nothing larger than the largest free one fits.
            response.maximum_volume_size.value = largest
        return response


def _any_capability() -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
