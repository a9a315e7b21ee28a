"""The CSI Identity service: who the plugin is and whether it can work right now.

Why it exists: kubelet's registrar, the controller's sidecars and the liveness probe ask these
three questions. Probe is the honest one on a node: the plugin is not ready while the kernel's
``nbd`` generic netlink family is missing (module not loaded), because every stage would then
fail. The controller (no attacher) is ready when it serves; it advertises CONTROLLER_SERVICE and
online expansion, the node plugin advertises neither.

What it must not do: import grpc, or block (Probe runs every few seconds).
"""

from __future__ import annotations

from importlib import metadata

from google.protobuf import wrappers_pb2

from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.attacher import Attacher

DRIVER_NAME = "nbd.dev"


def _version() -> str:
    try:
        return metadata.version("kube-nbd")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


class IdentityService:
    def __init__(self, attacher: Attacher | None, controller: bool = False) -> None:
        self.attacher = attacher
        self.controller = controller
        self.last_probe_reason = ""

    def GetPluginInfo(self, req: pb.GetPluginInfoRequest) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=_version())

    def GetPluginCapabilities(
        self, req: pb.GetPluginCapabilitiesRequest
    ) -> pb.GetPluginCapabilitiesResponse:
        # Volumes are reachable from every node: no VOLUME_ACCESSIBILITY_CONSTRAINTS.
        if not self.controller:
            return pb.GetPluginCapabilitiesResponse(capabilities=[])
        cap = pb.PluginCapability
        service = cap(service=cap.Service(type=cap.Service.CONTROLLER_SERVICE))
        online = cap(volume_expansion=cap.VolumeExpansion(type=cap.VolumeExpansion.ONLINE))
        return pb.GetPluginCapabilitiesResponse(capabilities=[service, online])

    def Probe(self, req: pb.ProbeRequest) -> pb.ProbeResponse:
        if self.attacher is None:
            return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        ready, reason = self.attacher.ready()
        self.last_probe_reason = reason
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
