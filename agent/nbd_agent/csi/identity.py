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
    def __init__(
        self, attacher: Attacher | None, controller: bool = False, topology: bool = False
    ) -> None:
        self.attacher = attacher
        self.controller = controller
        # Host-device volumes place data on a node: the provisioner then passes the topology
        # (the scheduler's node first) and honours a pinned volume's accessible topology.
        self.topology = topology
        self.last_probe_reason = ""

    def GetPluginInfo(self, req: pb.GetPluginInfoRequest) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=_version())

    def GetPluginCapabilities(
        self, req: pb.GetPluginCapabilitiesRequest
    ) -> pb.GetPluginCapabilitiesResponse:
        # Claim and memory volumes are reachable from every node and report no topology; only
        # with host devices is VOLUME_ACCESSIBILITY_CONSTRAINTS advertised.
        if not self.controller:
            return pb.GetPluginCapabilitiesResponse(capabilities=[])
        cap = pb.PluginCapability
        service = cap(service=cap.Service(type=cap.Service.CONTROLLER_SERVICE))
        online = cap(volume_expansion=cap.VolumeExpansion(type=cap.VolumeExpansion.ONLINE))
        caps = [service, online]
        if self.topology:
            topology = cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS
            caps.append(cap(service=cap.Service(type=topology)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    def Probe(self, req: pb.ProbeRequest) -> pb.ProbeResponse:
        if self.attacher is None:
            return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=True))
        ready, reason = self.attacher.ready()
        self.last_probe_reason = reason
        return pb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
