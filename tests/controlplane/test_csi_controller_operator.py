"""The CSI Controller and the operator together against the API substitute: a provisioned
volume becomes a Ready export with a claim of the asked size, an expansion grows the claim and
the served size, and DeleteVolume lets the operator take the children away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_api import parse_quantity

from tests.controlplane.controller_harness import controller, create_request, mount
from tests.controlplane.operator_harness import (
    NS,
    FakeApiServer,
    bind_claim,
    mark_available,
    running_operator,
)

GIB = 2**30
pb_mode = pb.VolumeCapability.AccessMode


def claim_request(api: FakeApiServer, name: str) -> str | None:
    pvc = api.current("persistentvolumeclaims", NS, f"{name}-nbd-data")
    return pvc["spec"]["resources"]["requests"]["storage"] if pvc else None


def server_args(api: FakeApiServer, name: str) -> list[str]:
    dep = api.current("deployments", NS, f"{name}-nbd") or {}
    containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    return list(containers[0].get("args", []))


def served(api: FakeApiServer, name: str, size: int) -> Any:
    obj = api.current("nbdexports", NS, name) or {}
    status = obj.get("status") or {}
    fresh = status.get("observedGeneration") == obj.get("metadata", {}).get("generation")
    return (
        obj
        if fresh and status.get("phase") == "Ready" and status.get("sizeBytes") == size
        else None
    )


async def test_a_provisioned_volume_is_served_grown_and_deleted_by_the_operator(
    tmp_path: Path,
) -> None:
    async with controller(tmp_path) as ctl, running_operator(ctl.api):
        api = ctl.api
        request = create_request("pvc-1", required=GIB)  # an image file in a Filesystem claim
        vol = (await ctl.call("CreateVolume", request)).volume.volume_id
        # The claim holds the image and a filesystem around it: size + max(64 MiB, size/32).
        await api.wait_for(lambda: claim_request(api, "pvc-1") == "1088Mi")
        await api.wait_for(lambda: api.current("deployments", NS, "pvc-1-nbd"))
        client = ctl.client
        await bind_claim(client, "pvc-1-nbd-data")
        await mark_available(client, "pvc-1-nbd")
        await api.wait_for(lambda: served(api, "pvc-1", GIB))

        grow = pb.ControllerExpandVolumeRequest(
            volume_id=vol,
            capacity_range=pb.CapacityRange(required_bytes=2 * GIB),
            volume_capability=mount(),
        )
        resp = await ctl.call("ControllerExpandVolume", grow)
        assert resp.capacity_bytes == 2 * GIB
        await api.wait_for(lambda: claim_request(api, "pvc-1") == "2112Mi")
        # The image's size is on the server's command line: the operator rolls the server.
        await api.wait_for(lambda: str(2 * GIB) in server_args(api, "pvc-1"))
        await mark_available(client, "pvc-1-nbd")
        await api.wait_for(lambda: served(api, "pvc-1", 2 * GIB))
        listed = await ctl.call("ListVolumes", pb.ListVolumesRequest())
        assert [(e.volume.volume_id, e.volume.capacity_bytes) for e in listed.entries] == [
            (vol, 2 * GIB)
        ]

        await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vol))
        await api.wait_for(lambda: api.current("nbdexports", NS, "pvc-1") is None)
        assert api.current("deployments", NS, "pvc-1-nbd") is None
        assert claim_request(api, "pvc-1") is None


async def test_a_restored_volumes_data_claim_is_restored_from_the_backing_snapshot(
    tmp_path: Path,
) -> None:
    async with controller(tmp_path) as ctl, running_operator(ctl.api):
        api = ctl.api
        source = (await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))).volume
        snapshot = pb.CreateSnapshotRequest(name="snap-1", source_volume_id=source.volume_id)
        snap = (await ctl.call("CreateSnapshot", snapshot)).snapshot
        restore = create_request("pvc-2", required=2 * GIB)
        restore.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        await ctl.call("CreateVolume", restore)
        claim = await api.wait_for(
            lambda: api.current("persistentvolumeclaims", NS, "pvc-2-nbd-data")
        )
        assert claim["spec"]["dataSource"] == {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": "snap-1",
        }
        source_claim = api.current("persistentvolumeclaims", NS, "pvc-1-nbd-data") or {}
        wanted = claim["spec"]["resources"]["requests"]["storage"]
        had = source_claim["spec"]["resources"]["requests"]["storage"]
        # A restored claim may not be smaller than the snapshot's source claim.
        assert parse_quantity(wanted) >= parse_quantity(had)


async def test_a_copy_on_write_clone_is_served_over_its_read_only_base_with_its_own_overlay(
    tmp_path: Path,
) -> None:
    async with controller(tmp_path) as ctl, running_operator(ctl.api):
        api = ctl.api
        source = (await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))).volume
        golden = create_request("pvc-golden", caps=[mount(pb_mode.MULTI_NODE_READER_ONLY)])
        golden.volume_content_source.volume.volume_id = source.volume_id
        base = (await ctl.call("CreateVolume", golden)).volume
        clone = create_request("pvc-clone", cloneMode="copyOnWrite")
        clone.volume_content_source.volume.volume_id = base.volume_id
        await ctl.call("CreateVolume", clone)
        # The operator serves the clone over the golden export's claim, read-only, with a
        # persistent overlay on a claim of the clone's own.
        await api.wait_for(lambda: "persistent" in server_args(api, "pvc-clone"))
        args = server_args(api, "pvc-clone")
        assert args[args.index("--copy-on-write") + 1] == "persistent"
        await api.wait_for(
            lambda: api.current("persistentvolumeclaims", NS, "pvc-clone-nbd-overlay")
        )
        dep = api.current("deployments", NS, "pvc-clone-nbd") or {}
        volumes = dep["spec"]["template"]["spec"]["volumes"]
        assert {"claimName": "pvc-golden-nbd-data", "readOnly": True} in [
            v.get("persistentVolumeClaim") for v in volumes
        ]
