"""The CSI Controller service over gRPC against the stateful API substitute: CreateVolume makes
one NBDExport per name (idempotent, ALREADY_EXISTS when the request changes, one winner when two
race), capacity ranges and StorageClass parameters reach the export's spec, DeleteVolume is
idempotent, and ValidateVolumeCapabilities, ListVolumes and ControllerExpandVolume answer with
the CSI spec's codes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from nbd_agent.csi import provision
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.kube import ExportStore, KubeApi

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

MIB = 2**20
GIB = 2**30
Code = grpc.StatusCode


def store(ctl: Controller) -> ExportStore:
    """A second client, for what a user (not the controller) does."""
    return ExportStore(KubeApi(str(ctl.api.url)))


@pytest.fixture
async def ctl(tmp_path: Path) -> Any:
    async with controller(tmp_path) as running:
        yield running


# ---- identity and capabilities ----


async def test_identity_advertises_the_controller_service_and_online_expansion(
    ctl: Controller,
) -> None:
    caps = await asyncio.to_thread(
        ctl.identity.GetPluginCapabilities, pb.GetPluginCapabilitiesRequest()
    )
    services = [c.service.type for c in caps.capabilities if c.HasField("service")]
    expansion = [
        c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")
    ]
    assert services == [pb.PluginCapability.Service.CONTROLLER_SERVICE]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]
    probe = await asyncio.to_thread(ctl.identity.Probe, pb.ProbeRequest())
    assert probe.ready.value is True


async def test_controller_capabilities_are_volumes_expansion_clones_and_snapshots(
    ctl: Controller,
) -> None:
    resp = await ctl.call("ControllerGetCapabilities", pb.ControllerGetCapabilitiesRequest())
    rpc = pb.ControllerServiceCapability.RPC
    assert {c.rpc.type for c in resp.capabilities} == {
        rpc.CREATE_DELETE_VOLUME,
        rpc.LIST_VOLUMES,
        rpc.EXPAND_VOLUME,
        rpc.CLONE_VOLUME,
        rpc.CREATE_DELETE_SNAPSHOT,
        rpc.LIST_SNAPSHOTS,
        rpc.MODIFY_VOLUME,
    }


async def test_get_capacity_is_not_offered(ctl: Controller) -> None:
    assert await ctl.code("GetCapacity", pb.GetCapacityRequest()) == Code.UNIMPLEMENTED


# ---- CreateVolume ----


async def test_create_makes_one_labelled_export_named_after_the_request(ctl: Controller) -> None:
    resp = await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))
    assert resp.volume.volume_id == f"{NS}/pvc-1"
    assert resp.volume.capacity_bytes == GIB
    [obj] = ctl.exports()
    assert obj["metadata"]["name"] == "pvc-1"
    assert obj["metadata"]["labels"][provision.LABEL_VOLUME] == "pvc-1"
    assert obj["metadata"]["annotations"][provision.ANNOTATION_NAME] == "pvc-1"
    assert not obj["metadata"].get("ownerReferences")
    assert obj["spec"]["size"] == GIB
    assert obj["spec"]["accessMode"] == "ReadWriteOnce"
    assert obj["spec"]["source"] == {
        "volumeClaimTemplate": {"volumeMode": "Filesystem", "reclaimPolicy": "Delete"}
    }


async def test_a_repeated_create_is_the_same_volume(ctl: Controller) -> None:
    first = await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))
    again = await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))
    assert again.volume == first.volume
    assert len(ctl.exports()) == 1


@pytest.mark.parametrize(
    "changed",
    [
        create_request("pvc-1", required=2 * GIB),
        create_request("pvc-1", required=GIB, storageClass="fast"),
        create_request("pvc-1", required=GIB, readIOPS="100"),
        create_request("pvc-1", required=GIB, caps=[block(Mode.MULTI_NODE_MULTI_WRITER)],
                       clusterFilesystemAcknowledged="true"),
    ],
    ids=["capacity", "storage-class", "qos", "access-mode"],
)  # fmt: skip
async def test_the_same_name_asked_differently_is_already_exists(
    ctl: Controller, changed: pb.CreateVolumeRequest
) -> None:
    await ctl.call("CreateVolume", create_request("pvc-1", required=GIB))
    assert await ctl.code("CreateVolume", changed) == Code.ALREADY_EXISTS
    assert len(ctl.exports()) == 1


async def test_block_or_mount_access_is_the_same_volume(ctl: Controller) -> None:
    # Block or filesystem is the node's business: the export, so the volume, is the same.
    first = await ctl.call("CreateVolume", create_request("pvc-1", caps=[mount()]))
    again = await ctl.call("CreateVolume", create_request("pvc-1", caps=[block()]))
    assert again.volume == first.volume


async def test_a_hand_written_export_with_the_name_is_already_exists(ctl: Controller) -> None:
    hand = provision.manifest(provision.plan(create_request("pvc-1"), NS))
    del hand["metadata"]["annotations"]
    await asyncio.to_thread(store(ctl).create, hand)
    assert await ctl.code("CreateVolume", create_request("pvc-1")) == Code.ALREADY_EXISTS


async def test_racing_creates_for_one_name_yield_one_export(ctl: Controller) -> None:
    racers = 8
    results = await asyncio.gather(
        *(ctl.call("CreateVolume", create_request("pvc-race", required=GIB)) for _ in range(racers))
    )
    assert {r.volume.volume_id for r in results} == {f"{NS}/pvc-race"}
    assert [o["metadata"]["name"] for o in ctl.exports()] == ["pvc-race"]


async def test_racing_creates_that_differ_yield_one_export_and_one_refusal(
    ctl: Controller,
) -> None:
    outcomes = await asyncio.gather(
        ctl.call("CreateVolume", create_request("pvc-x", required=GIB)),
        ctl.call("CreateVolume", create_request("pvc-x", required=2 * GIB)),
        return_exceptions=True,
    )
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert [e.code() for e in errors] == [Code.ALREADY_EXISTS]
    assert len(ctl.exports()) == 1


async def test_a_long_or_odd_name_gets_a_stable_hashed_export_name(ctl: Controller) -> None:
    name = "Volume_For_" + "x" * 80
    first = await ctl.call("CreateVolume", create_request(name))
    again = await ctl.call("CreateVolume", create_request(name))
    assert first.volume.volume_id == again.volume.volume_id
    export = first.volume.volume_id.split("/")[1]
    assert export.startswith("csi-") and len(export) <= 50
    assert ctl.exports()[0]["metadata"]["annotations"][provision.ANNOTATION_NAME] == name


@pytest.mark.parametrize(
    ("required", "limit", "size"),
    [
        (0, 0, GIB),
        (1, 0, MIB),
        (GIB + 1, 0, GIB + MIB),
        (0, 512 * MIB, 512 * MIB),
        (3 * MIB + 5, 4 * MIB, 4 * MIB),
        (5 * MIB, 5 * MIB, 5 * MIB),
    ],
)
async def test_capacity_is_rounded_up_to_whole_mib_within_the_limit(
    ctl: Controller, required: int, limit: int, size: int
) -> None:
    resp = await ctl.call("CreateVolume", create_request("pvc-c", required, limit))
    assert resp.volume.capacity_bytes == size
    assert ctl.exports()[0]["spec"]["size"] == size


async def test_a_range_holding_no_whole_mib_is_out_of_range(ctl: Controller) -> None:
    request = create_request("pvc-c", required=MIB + 1, limit=MIB + 100)
    assert await ctl.code("CreateVolume", request) == Code.OUT_OF_RANGE
    assert ctl.exports() == []


@pytest.mark.parametrize(
    "request_",
    [
        create_request(""),
        create_request("pvc-1", caps=[]),
        create_request("pvc-1", caps=[pb.VolumeCapability()]),
        create_request("pvc-1", caps=[mount(fs_type="btrfs")]),
        create_request("pvc-1", caps=[mount(Mode.MULTI_NODE_SINGLE_WRITER)]),
        create_request("pvc-1", caps=[mount(Mode.MULTI_NODE_READER_ONLY)]),
        create_request("pvc-1", caps=[mount(Mode.MULTI_NODE_MULTI_WRITER)]),
        create_request("pvc-1", caps=[block(Mode.MULTI_NODE_MULTI_WRITER)]),
        create_request("pvc-1", required=-1),
        create_request("pvc-1", required=2 * GIB, limit=GIB),
        create_request("pvc-1", storageClas="typo"),
        create_request("pvc-1", volumeMode="Raw"),
        create_request("pvc-1", connections="0"),
        create_request("pvc-1", connections="65"),
        create_request("pvc-1", readIOPS="fast"),
        create_request("pvc-1", tlsMode="Required"),
        create_request("pvc-1", backing="memory", storageClass="fast"),
        create_request("pvc-1", backing="tape"),
    ],
    ids=[
        "no-name", "no-capabilities", "no-access-type", "unknown-fs", "multi-single-writer",
        "reader-only-empty", "rwx-filesystem", "rwx-unacknowledged", "negative", "limit-below",
        "unknown-parameter", "bad-volume-mode", "zero-connections", "too-many-connections",
        "bad-qos", "tls-mode-without-secret", "memory-with-class", "unknown-backing",
    ],
)  # fmt: skip
async def test_malformed_requests_are_invalid_argument(
    ctl: Controller, request_: pb.CreateVolumeRequest
) -> None:
    assert await ctl.code("CreateVolume", request_) == Code.INVALID_ARGUMENT
    assert ctl.exports() == []


async def test_storage_class_parameters_reach_the_export_spec(ctl: Controller) -> None:
    params = {
        "storageClass": "fast-ssd",
        "volumeMode": "Block",
        "connections": "4",
        "tlsSecretName": "nbd-tls",
        "readBytesPerSecond": "1000000",
        "writeIOPS": "500",
        # what external-provisioner --extra-create-metadata adds: kept as an annotation
        provision.PVC_NAME: "data",
        provision.PVC_NAMESPACE: "team",
    }
    await ctl.call("CreateVolume", create_request("pvc-p", required=GIB, **params))
    [obj] = ctl.exports()
    assert obj["spec"] == {
        "size": GIB,
        "accessMode": "ReadWriteOnce",
        "source": {
            "volumeClaimTemplate": {
                "storageClassName": "fast-ssd",
                "volumeMode": "Block",
                "reclaimPolicy": "Delete",
            }
        },
        "connections": 4,
        "tls": {"secretName": "nbd-tls", "mode": "Required"},
        "qos": {"readBytesPerSecond": 1000000, "writeIOPS": 500},
    }
    assert obj["metadata"]["annotations"][provision.ANNOTATION_CLAIM] == "team/data"


@pytest.mark.parametrize(
    ("caps", "parameters", "mode"),
    [
        ([mount(Mode.SINGLE_NODE_WRITER)], {}, "ReadWriteOnce"),
        ([mount(Mode.SINGLE_NODE_READER_ONLY)], {}, "ReadWriteOnce"),
        ([block(Mode.SINGLE_NODE_MULTI_WRITER), block()], {}, "ReadWriteOnce"),
        (
            [block(Mode.MULTI_NODE_MULTI_WRITER)],
            {"clusterFilesystemAcknowledged": "true"},
            "ReadWriteMany",
        ),
    ],
)
async def test_access_modes_map_to_the_exports_access_mode(
    ctl: Controller, caps: list[pb.VolumeCapability], parameters: dict[str, str], mode: str
) -> None:
    await ctl.call("CreateVolume", create_request("pvc-m", caps=caps, **parameters))
    assert ctl.exports()[0]["spec"]["accessMode"] == mode


@pytest.mark.parametrize(
    "parameters",
    [
        {},
        {"backing": "memory"},
        {"storageClass": "fast", "volumeMode": "Block", "connections": "2"},
        {"tlsSecretName": "tls", "tlsMode": "Optional", "readIOPS": "10"},
    ],
)
def test_every_export_the_controller_builds_is_admitted_by_the_crd(
    parameters: dict[str, str],
) -> None:
    body = provision.manifest(provision.plan(create_request("pvc-1", **parameters), NS))
    assert admit(body) == []


# ---- DeleteVolume ----


async def test_delete_removes_the_export_and_repeats_succeed(ctl: Controller) -> None:
    resp = await ctl.call("CreateVolume", create_request("pvc-d"))
    request = pb.DeleteVolumeRequest(volume_id=resp.volume.volume_id)
    await ctl.call("DeleteVolume", request)
    assert ctl.exports() == []
    await ctl.call("DeleteVolume", request)
    await ctl.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id="no-slash-here"))


async def test_delete_without_an_id_is_invalid_argument(ctl: Controller) -> None:
    assert await ctl.code("DeleteVolume", pb.DeleteVolumeRequest()) == Code.INVALID_ARGUMENT


async def test_delete_spares_a_hand_written_export(ctl: Controller) -> None:
    hand = provision.manifest(provision.plan(create_request("db"), NS))
    hand["metadata"]["labels"] = {}
    await asyncio.to_thread(store(ctl).create, hand)
    request = pb.DeleteVolumeRequest(volume_id=f"{NS}/db")
    assert await ctl.code("DeleteVolume", request) == Code.FAILED_PRECONDITION
    assert len(ctl.exports()) == 1


async def test_an_unreachable_api_server_is_unavailable(ctl: Controller) -> None:
    ctl.api.fail("POST", "nbdexports")
    assert await ctl.code("CreateVolume", create_request("pvc-u")) == Code.UNAVAILABLE
    resp = await ctl.call("CreateVolume", create_request("pvc-u"))  # the sidecar's retry
    assert resp.volume.volume_id == f"{NS}/pvc-u"


# ---- ValidateVolumeCapabilities, ListVolumes ----


async def test_validate_confirms_what_the_export_serves_and_says_why_not(
    ctl: Controller,
) -> None:
    vol = (await ctl.call("CreateVolume", create_request("pvc-v"))).volume.volume_id
    ok = await ctl.call(
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=vol, volume_capabilities=[block()]),
    )
    assert list(ok.confirmed.volume_capabilities) == [block()]
    rwx = block(Mode.MULTI_NODE_MULTI_WRITER)
    no = await ctl.call(
        "ValidateVolumeCapabilities",
        pb.ValidateVolumeCapabilitiesRequest(volume_id=vol, volume_capabilities=[rwx]),
    )
    assert not no.HasField("confirmed") and no.message
    missing = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=f"{NS}/nope", volume_capabilities=[block()]
    )
    assert await ctl.code("ValidateVolumeCapabilities", missing) == Code.NOT_FOUND
    empty = pb.ValidateVolumeCapabilitiesRequest(volume_id=vol)
    assert await ctl.code("ValidateVolumeCapabilities", empty) == Code.INVALID_ARGUMENT


async def test_list_volumes_pages_with_tokens_and_refuses_a_stale_one(ctl: Controller) -> None:
    for i in range(5):
        await ctl.call("CreateVolume", create_request(f"pvc-{i}", required=(i + 1) * MIB))
    seen: list[tuple[str, int]] = []
    token = ""
    while True:
        page = await ctl.call(
            "ListVolumes", pb.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(page.entries) <= 2
        seen += [(e.volume.volume_id, e.volume.capacity_bytes) for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert seen == [(f"{NS}/pvc-{i}", (i + 1) * MIB) for i in range(5)]
    stale = pb.ListVolumesRequest(starting_token="99")
    assert await ctl.code("ListVolumes", stale) == Code.ABORTED


# ---- ControllerExpandVolume ----


def expand(volume: str, required: int, limit: int = 0) -> pb.ControllerExpandVolumeRequest:
    return pb.ControllerExpandVolumeRequest(
        volume_id=volume,
        capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capability=mount(),
    )


async def test_expand_grows_the_export_and_leaves_the_rest_to_the_node(ctl: Controller) -> None:
    vol = (await ctl.call("CreateVolume", create_request("pvc-e", required=GIB))).volume.volume_id
    resp = await ctl.call("ControllerExpandVolume", expand(vol, 2 * GIB + 1))
    assert resp.capacity_bytes == 2 * GIB + MIB
    assert resp.node_expansion_required is True
    assert ctl.exports()[0]["spec"]["size"] == 2 * GIB + MIB
    again = await ctl.call("ControllerExpandVolume", expand(vol, 2 * GIB + 1))
    assert again.capacity_bytes == 2 * GIB + MIB
    # A smaller request (the resizer retrying an old size) never shrinks the export.
    smaller = await ctl.call("ControllerExpandVolume", expand(vol, GIB))
    assert smaller.capacity_bytes == 2 * GIB + MIB
    assert ctl.exports()[0]["spec"]["size"] == 2 * GIB + MIB
    # The original request still names the same volume after it grew.
    same = await ctl.call("CreateVolume", create_request("pvc-e", required=GIB))
    assert same.volume.volume_id == vol


async def test_expand_errors_carry_the_spec_codes(ctl: Controller) -> None:
    vol = (await ctl.call("CreateVolume", create_request("pvc-e", required=GIB))).volume.volume_id
    mem = await ctl.call("CreateVolume", create_request("pvc-m", backing="memory"))
    assert await ctl.code("ControllerExpandVolume", expand(f"{NS}/nope", GIB)) == Code.NOT_FOUND
    no_range = pb.ControllerExpandVolumeRequest(volume_id=vol)
    assert await ctl.code("ControllerExpandVolume", no_range) == Code.INVALID_ARGUMENT
    inside = expand(vol, 2 * GIB + 1, 2 * GIB + 2)
    assert await ctl.code("ControllerExpandVolume", inside) == Code.OUT_OF_RANGE
    memory = expand(mem.volume.volume_id, 2 * GIB)
    assert await ctl.code("ControllerExpandVolume", memory) == Code.FAILED_PRECONDITION
    raw = await ctl.call("CreateVolume", create_request("pvc-b", volumeMode="Block"))
    block = expand(raw.volume.volume_id, 2 * GIB)
    assert await ctl.code("ControllerExpandVolume", block) == Code.FAILED_PRECONDITION
    assert ctl.exports()[0]["spec"]["size"] == GIB


# ---- ControllerModifyVolume (VolumeAttributesClass) ----


def modify(volume: str, **mutable: str) -> pb.ControllerModifyVolumeRequest:
    return pb.ControllerModifyVolumeRequest(volume_id=volume, mutable_parameters=mutable)


async def test_a_volume_attributes_class_sets_the_exports_qos(ctl: Controller) -> None:
    request = create_request("pvc-q", writeIOPS="50")
    vol = (await ctl.call("CreateVolume", request)).volume.volume_id
    await ctl.call("ControllerModifyVolume", modify(vol, readIOPS="100", writeIOPS="70"))
    assert ctl.exports()[0]["spec"]["qos"] == {"readIOPS": 100, "writeIOPS": 70}
    generation = ctl.exports()[0]["metadata"]["generation"]
    await ctl.call("ControllerModifyVolume", modify(vol, readIOPS="100"))  # already so
    assert ctl.exports()[0]["metadata"]["generation"] == generation
    # At creation, the class's values override the StorageClass's.
    created = create_request("pvc-v", readIOPS="5")
    created.mutable_parameters["readIOPS"] = "9"
    await ctl.call("CreateVolume", created)
    qos = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-v")["spec"]["qos"]
    assert qos == {"readIOPS": 9}


async def test_modify_errors_carry_the_spec_codes(ctl: Controller) -> None:
    vol = (await ctl.call("CreateVolume", create_request("pvc-q"))).volume.volume_id
    mem = (await ctl.call("CreateVolume", create_request("pvc-m", backing="memory"))).volume
    bad = [modify(vol, connections="4"), modify(vol, readIOPS="0"), modify(vol, readIOPS="x")]
    for request in bad:
        assert await ctl.code("ControllerModifyVolume", request) == Code.INVALID_ARGUMENT
    missing = modify(f"{NS}/nope", readIOPS="1")
    assert await ctl.code("ControllerModifyVolume", missing) == Code.NOT_FOUND
    memory = modify(mem.volume_id, readIOPS="1")
    assert await ctl.code("ControllerModifyVolume", memory) == Code.FAILED_PRECONDITION
    created = create_request("pvc-bad")
    created.mutable_parameters["storageClass"] = "other"
    assert await ctl.code("CreateVolume", created) == Code.INVALID_ARGUMENT
    assert "qos" not in ctl.exports()[0]["spec"]
