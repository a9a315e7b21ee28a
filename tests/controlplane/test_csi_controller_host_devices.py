"""Host-device volumes over gRPC against the stateful API substitute: node plugins publish their
allowlisted devices as inventory Leases (the real ``Publisher``), CreateVolume takes the smallest
free device that fits inside the requested topology with a claim Lease (never the same device
twice, also when calls race), DeleteVolume gives it back, and GetCapacity reports what is free."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from nbd_agent.csi import host_wipe, hostdevices, provision
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.host_inventory import Publisher
from nbd_agent.csi.kube import ExportStore, KubeApi, LeaseStore

from tests.controlplane.controller_harness import (
    Controller,
    Mode,
    block,
    controller,
    create_request,
    mount,
)
from tests.controlplane.operator_harness import NS
from tests.controlplane.test_crd_schema import admit

GIB = 2**30
Code = grpc.StatusCode
KEY = hostdevices.TOPOLOGY_KEY


def leases(ctl: Controller) -> LeaseStore:
    return LeaseStore(KubeApi(str(ctl.api.url)))


async def publish(ctl: Controller, node: str, devices: Sequence[tuple[str, int]]) -> None:
    """What ``nbd-agent csi --host-device`` on ``node`` publishes (its scan replaced by the
    devices given: this machine's disks are not the test's)."""
    publisher = Publisher(leases(ctl), NS, node, ["/dev/x"], scanner=lambda _: list(devices))
    await asyncio.to_thread(publisher.publish_once)


def host_request(name: str = "pvc-1", required: int = 0, limit: int = 0, **params: str) -> Any:
    return create_request(name, required, limit, caps=[block()], backing="hostDevice", **params)


def topology(*nodes: str) -> list[pb.Topology]:
    return [pb.Topology(segments={KEY: n}) for n in nodes]


def source(ctl: Controller, name: str) -> dict[str, Any]:
    obj = ctl.api.current("nbdexports", NS, name)
    assert obj is not None
    return dict(obj["spec"]["source"]["hostDevice"])


@pytest.fixture
async def ctl(tmp_path: Path) -> Any:
    async with controller(tmp_path, host_devices=True) as running:
        yield running


async def test_capabilities_advertise_capacity_and_topology(ctl: Controller) -> None:
    caps = await ctl.call("ControllerGetCapabilities", pb.ControllerGetCapabilitiesRequest())
    assert pb.ControllerServiceCapability.RPC.GET_CAPACITY in [
        c.rpc.type for c in caps.capabilities
    ]
    plugin = await asyncio.to_thread(
        ctl.identity.GetPluginCapabilities, pb.GetPluginCapabilitiesRequest()
    )
    services = [c.service.type for c in plugin.capabilities if c.HasField("service")]
    assert pb.PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services


async def test_create_takes_the_smallest_device_that_fits_and_the_export_is_admitted(
    ctl: Controller,
) -> None:
    await publish(ctl, "node-a", [("/dev/disk/by-id/big", 8 * GIB), ("/dev/sdb", 2 * GIB)])
    await publish(ctl, "node-b", [("/dev/sdc", 4 * GIB)])
    res = await ctl.call("CreateVolume", host_request(required=3 * GIB))
    assert res.volume.volume_id == f"{NS}/pvc-1"
    assert res.volume.capacity_bytes == 4 * GIB  # the device's size, not the request's
    assert list(res.volume.accessible_topology) == []  # reachable from every node over NBD
    assert source(ctl, "pvc-1") == {"nodeName": "node-b", "path": "/dev/sdc"}
    obj = ctl.api.current("nbdexports", NS, "pvc-1")
    assert obj is not None and "size" not in obj["spec"]
    assert admit(obj) == []
    listed = await ctl.call("ListVolumes", pb.ListVolumesRequest())
    assert [e.volume.capacity_bytes for e in listed.entries] == [4 * GIB]


async def test_a_limit_excludes_larger_devices_and_nothing_fitting_is_resource_exhausted(
    ctl: Controller,
) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", 8 * GIB)])
    code = await ctl.code("CreateVolume", host_request(required=GIB, limit=4 * GIB))
    assert code == Code.RESOURCE_EXHAUSTED
    assert ctl.exports() == []
    assert hostdevices.claimed(ctl.api.all("leases", NS)) == {}


async def test_pinned_volumes_report_the_device_node_as_their_topology(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    res = await ctl.call("CreateVolume", host_request(pinToDeviceNode="true"))
    assert [dict(t.segments) for t in res.volume.accessible_topology] == [{KEY: "node-a"}]
    listed = await ctl.call("ListVolumes", pb.ListVolumesRequest())
    assert [dict(t.segments) for t in listed.entries[0].volume.accessible_topology] == [
        {KEY: "node-a"}
    ]


async def test_preferred_topology_wins_over_size_and_requisite_is_a_hard_limit(
    ctl: Controller,
) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    await publish(ctl, "node-b", [("/dev/sdb", 4 * GIB), ("/dev/sdc", 8 * GIB)])
    await publish(ctl, "node-c", [("/dev/sdb", GIB)])
    first = host_request("pvc-1")
    first.accessibility_requirements.requisite.extend(topology("node-a", "node-b"))
    first.accessibility_requirements.preferred.extend(topology("node-b"))
    await ctl.call("CreateVolume", first)
    assert source(ctl, "pvc-1") == {"nodeName": "node-b", "path": "/dev/sdb"}
    only_c = host_request("pvc-2", required=2 * GIB)
    only_c.accessibility_requirements.requisite.extend(topology("node-c"))
    assert await ctl.code("CreateVolume", only_c) == Code.RESOURCE_EXHAUSTED
    unknown = host_request("pvc-3")
    unknown.accessibility_requirements.requisite.add(segments={"topology.kubernetes.io/zone": "z"})
    assert await ctl.code("CreateVolume", unknown) == Code.RESOURCE_EXHAUSTED


async def test_racing_creates_never_share_a_device(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB), ("/dev/sdc", GIB)])
    await publish(ctl, "node-b", [("/dev/sdb", GIB)])

    async def attempt(i: int) -> str:
        try:
            res = await ctl.call("CreateVolume", host_request(f"pvc-{i}"))
        except grpc.RpcError as exc:
            return str(exc.code())
        return str(res.volume.volume_id)

    results = await asyncio.gather(*(attempt(i) for i in range(7)))
    made = [r for r in results if r.startswith(NS)]
    assert len(made) == 3
    assert sorted(set(results) - set(made)) == [str(Code.RESOURCE_EXHAUSTED)]
    used = {
        (s["nodeName"], s["path"])
        for s in (e["spec"]["source"]["hostDevice"] for e in ctl.exports())
    }
    assert used == {("node-a", "/dev/sdb"), ("node-a", "/dev/sdc"), ("node-b", "/dev/sdb")}
    assert len(hostdevices.claimed(ctl.api.all("leases", NS))) == 3


async def test_repeats_are_idempotent_and_a_changed_request_already_exists(
    ctl: Controller,
) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB), ("/dev/sdc", 2 * GIB)])
    first = await ctl.call("CreateVolume", host_request())
    again = await ctl.call("CreateVolume", host_request())
    assert again.volume == first.volume
    assert len(hostdevices.claimed(ctl.api.all("leases", NS))) == 1
    assert await ctl.code("CreateVolume", host_request(required=2 * GIB)) == Code.ALREADY_EXISTS


async def test_a_retry_after_a_crash_reuses_the_claim_it_made(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB), ("/dev/sdc", GIB)])
    # The first attempt claimed sdc, then died before creating the export.
    taken = hostdevices.Device("node-a", "/dev/sdc", GIB)
    await asyncio.to_thread(leases(ctl).create, hostdevices.claim_lease(NS, taken, "pvc-1"))
    await ctl.call("CreateVolume", host_request())
    assert source(ctl, "pvc-1") == {"nodeName": "node-a", "path": "/dev/sdc"}
    assert len(hostdevices.claimed(ctl.api.all("leases", NS))) == 1


async def test_delete_frees_the_device_for_the_next_volume(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    res = await ctl.call("CreateVolume", host_request("pvc-1"))
    assert await ctl.code("CreateVolume", host_request("pvc-2")) == Code.RESOURCE_EXHAUSTED
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=res.volume.volume_id))
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=res.volume.volume_id))
    assert hostdevices.claimed(ctl.api.all("leases", NS)) == {}
    await ctl.call("CreateVolume", host_request("pvc-2"))
    assert source(ctl, "pvc-2") == {"nodeName": "node-a", "path": "/dev/sdb"}


async def test_delete_after_the_export_is_gone_still_frees_the_claim(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    taken = hostdevices.Device("node-a", "/dev/sdb", GIB)
    await asyncio.to_thread(leases(ctl).create, hostdevices.claim_lease(NS, taken, "pvc-1"))
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=f"{NS}/pvc-1"))
    assert hostdevices.claimed(ctl.api.all("leases", NS)) == {}


async def test_a_device_a_hand_written_export_uses_is_never_offered(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB), ("/dev/sdc", 2 * GIB)])
    mine = {
        "accessMode": "ReadWriteOnce",
        "source": {"hostDevice": {"nodeName": "node-a", "path": "/dev/sdb"}},
    }
    await asyncio.to_thread(
        ExportStore(KubeApi(str(ctl.api.url))).create,
        {"apiVersion": "nbd.dev/v1alpha1", "kind": "NBDExport",
         "metadata": {"name": "by-hand", "namespace": NS}, "spec": mine},
    )  # fmt: skip
    cap = await ctl.call("GetCapacity", pb.GetCapacityRequest(parameters={"backing": "hostDevice"}))
    assert cap.available_capacity == 2 * GIB
    await ctl.call("CreateVolume", host_request())
    assert source(ctl, "pvc-1") == {"nodeName": "node-a", "path": "/dev/sdc"}


async def test_a_node_whose_inventory_expired_offers_nothing(ctl: Controller) -> None:
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=10)
    body = hostdevices.inventory_lease(NS, "node-gone", [("/dev/sdb", GIB)], 90, now=old)
    await asyncio.to_thread(leases(ctl).create, body)
    assert await ctl.code("CreateVolume", host_request()) == Code.RESOURCE_EXHAUSTED
    cap = await ctl.call("GetCapacity", pb.GetCapacityRequest(parameters={"backing": "hostDevice"}))
    assert cap.available_capacity == 0 and not cap.HasField("maximum_volume_size")
    # The node plugin comes back and renews the same Lease: its device is offered again.
    await publish(ctl, "node-gone", [("/dev/sdb", GIB)])
    await ctl.call("CreateVolume", host_request())


async def test_get_capacity_counts_free_devices_per_segment(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB), ("/dev/sdc", 4 * GIB)])
    await publish(ctl, "node-b", [("/dev/sdb", 2 * GIB)])
    params = {"backing": "hostDevice"}

    async def capacity(node: str | None) -> tuple[int, int]:
        req = pb.GetCapacityRequest(parameters=params, volume_capabilities=[block()])
        if node:
            req.accessible_topology.segments[KEY] = node
        res = await ctl.call("GetCapacity", req)
        return res.available_capacity, res.maximum_volume_size.value

    assert await capacity(None) == (7 * GIB, 4 * GIB)
    assert await capacity("node-a") == (5 * GIB, 4 * GIB)
    assert await capacity("node-b") == (2 * GIB, 2 * GIB)
    assert await capacity("node-x") == (0, 0)
    await ctl.call("CreateVolume", host_request(required=3 * GIB))
    assert await capacity("node-a") == (GIB, GIB)
    # Capabilities the class cannot serve have nothing available.
    multi = pb.GetCapacityRequest(
        parameters=params, volume_capabilities=[mount(Mode.MULTI_NODE_MULTI_WRITER)]
    )
    assert (await ctl.call("GetCapacity", multi)).available_capacity == 0


async def test_get_capacity_refuses_classes_whose_space_it_cannot_see(ctl: Controller) -> None:
    claim = pb.GetCapacityRequest(parameters={"storageClass": "local"})
    assert await ctl.code("GetCapacity", claim) == Code.FAILED_PRECONDITION
    typo = pb.GetCapacityRequest(parameters={"backing": "hostDevice", "pinned": "true"})
    assert await ctl.code("GetCapacity", typo) == Code.INVALID_ARGUMENT
    bad = pb.GetCapacityRequest(parameters={"backing": "hostDevice", "pinToDeviceNode": "yes"})
    assert await ctl.code("GetCapacity", bad) == Code.INVALID_ARGUMENT
    not_here = pb.GetCapacityRequest(parameters={"backing": "hostDevice", "volumeMode": "Block"})
    assert await ctl.code("GetCapacity", not_here) == Code.INVALID_ARGUMENT


async def test_host_device_requests_refuse_what_a_device_cannot_be(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    bad = [
        host_request(storageClass="fast"),
        host_request(volumeMode="Block"),
        host_request(pinToDeviceNode="yes"),
        host_request(wipeOnDelete="always"),
        create_request(caps=[block()], wipeOnDelete="true"),  # not a host-device class
        create_request(caps=[block()], pinToDeviceNode="true"),  # not a host-device class
    ]
    snap = host_request()
    snap.volume_content_source.snapshot.snapshot_id = f"{NS}/snap"
    bad.append(snap)
    for request in bad:
        assert await ctl.code("CreateVolume", request) == Code.INVALID_ARGUMENT, request
    assert ctl.exports() == []


async def test_a_host_device_volume_neither_grows_nor_snapshots(ctl: Controller) -> None:
    await publish(ctl, "node-a", [("/dev/sdb", GIB)])
    res = await ctl.call("CreateVolume", host_request())
    grow = pb.ControllerExpandVolumeRequest(
        volume_id=res.volume.volume_id, capacity_range=pb.CapacityRange(required_bytes=2 * GIB)
    )
    assert await ctl.code("ControllerExpandVolume", grow) == Code.FAILED_PRECONDITION
    snap = pb.CreateSnapshotRequest(name="snap-1", source_volume_id=res.volume.volume_id)
    assert await ctl.code("CreateSnapshot", snap) == Code.FAILED_PRECONDITION


async def test_without_host_devices_the_backing_and_capacity_are_not_offered(
    tmp_path: Path,
) -> None:
    async with controller(tmp_path) as plain:
        caps = await plain.call("ControllerGetCapabilities", pb.ControllerGetCapabilitiesRequest())
        kinds = [c.rpc.type for c in caps.capabilities]
        assert pb.ControllerServiceCapability.RPC.GET_CAPACITY not in kinds
        assert await plain.code("CreateVolume", host_request()) == Code.INVALID_ARGUMENT
        req = pb.GetCapacityRequest(parameters={"backing": "hostDevice"})
        assert await plain.code("GetCapacity", req) == Code.UNIMPLEMENTED
        assert provision.P_PIN == "pinToDeviceNode"


# ---- wipeOnDelete ----


class Recorded:
    """Stands in for host_wipe.zero_device: what would have been zeroed."""

    def __init__(self) -> None:
        self.zeroed: list[tuple[str, int]] = []

    def __call__(self, path: str, size: int) -> None:
        self.zeroed.append((path, size))


async def test_a_wipe_class_keeps_the_device_claimed_until_its_node_zeroed_it(
    ctl: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = [("/dev/sdb", GIB), ("/dev/sdc", 2 * GIB)]
    await publish(ctl, "node-a", devices)
    res = await ctl.call("CreateVolume", host_request(wipeOnDelete="true"))
    assert source(ctl, "pvc-1") == {"nodeName": "node-a", "path": "/dev/sdb"}
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=res.volume.volume_id))
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=res.volume.volume_id))
    [claim] = hostdevices.held_by(ctl.api.all("leases", NS), "pvc-1")
    assert hostdevices.wiping(claim) and ctl.exports() == []
    # Still claimed: the next volume gets the other device, capacity does not count it.
    cap = await ctl.call("GetCapacity", pb.GetCapacityRequest(parameters={"backing": "hostDevice"}))
    assert cap.available_capacity == 2 * GIB

    # The node plugin's side, against the same API: it zeroes exactly that device, then frees it.
    recorded = Recorded()
    monkeypatch.setattr(host_wipe, "zero_device", recorded)
    store = ExportStore(KubeApi(str(ctl.api.url)))
    wiper = host_wipe.Wiper(leases(ctl), store, NS, "node-a")
    await asyncio.to_thread(wiper.start_due, devices)
    for thread in wiper.threads:
        await asyncio.to_thread(thread.join, 10)
    assert recorded.zeroed == [("/dev/sdb", GIB)]
    assert hostdevices.claimed(ctl.api.all("leases", NS)) == {}
    cap = await ctl.call("GetCapacity", pb.GetCapacityRequest(parameters={"backing": "hostDevice"}))
    assert cap.available_capacity == 3 * GIB


async def test_the_node_never_wipes_a_device_whose_volume_or_claim_says_otherwise(
    ctl: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = [("/dev/sdb", GIB), ("/dev/sdc", GIB), ("/dev/sdd", GIB)]
    await publish(ctl, "node-a", devices)
    await ctl.call("CreateVolume", host_request("pvc-1", wipeOnDelete="true"))  # sdb, live
    await ctl.call("CreateVolume", host_request("pvc-2"))  # sdc, no wipe asked
    # sdd: marked Wiping, but its export still exists (being deleted)
    taken = hostdevices.Device("node-a", "/dev/sdd", GIB)
    claim = hostdevices.claim_lease(NS, taken, "pvc-1", wipe=True)
    claim["metadata"]["annotations"][hostdevices.ANNOTATION_STATE] = hostdevices.STATE_WIPING
    await asyncio.to_thread(leases(ctl).create, claim)
    recorded = Recorded()
    monkeypatch.setattr(host_wipe, "zero_device", recorded)
    store = ExportStore(KubeApi(str(ctl.api.url)))
    wiper = host_wipe.Wiper(leases(ctl), store, NS, "node-a")
    assert await asyncio.to_thread(wiper.due, devices) == []
    # Another node's plugin never wipes this node's devices, even with the same paths.
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=f"{NS}/pvc-1"))
    other = host_wipe.Wiper(leases(ctl), store, NS, "node-b")
    assert await asyncio.to_thread(other.due, devices) == []
    due = await asyncio.to_thread(wiper.due, devices)
    assert sorted(path for path, _, _ in due) == ["/dev/sdb", "/dev/sdd"]
    assert recorded.zeroed == []
