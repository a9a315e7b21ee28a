"""The CSI node plugin's Kubernetes side against kmock (a stateful fake Kubernetes API):
resolving NBDExports, the ReadWriteOnce writer Lease taken race-free by create, the attachment
Lease the operator mirrors, and what a second node is told while the first one writes.

The plugin's HTTP client is blocking (it runs in gRPC's thread pool); the tests call it through
``asyncio.to_thread`` so kmock keeps serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import kmock as km
import pytest
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import FailedPrecondition, Internal, Unavailable
from nbd_agent.csi.kube import ClusterAccess, KubeApi
from nbd_api import (
    GROUP,
    PLURAL,
    VERSION,
    attachment_from_lease,
    attachment_lease_name,
    writer_lease_name,
)

from tests.interop.csi_harness import CsiHarness, mount_cap

Mode = pb.VolumeCapability.AccessMode
EXPORTS = km.resource(f"{GROUP}/{VERSION}/{PLURAL}")
LEASES = km.resource("coordination.k8s.io/v1/leases")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")


def nbdexport(name: str, ns: str = "team", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "status": {
            "phase": "Ready",
            # The harness's FileAttacher maps nbd://files/NAME to an image file.
            "uri": f"nbd://files/{name}",
            "sizeBytes": 64 * 2**20,
            "accessMode": "ReadWriteOnce",
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True"}],
            **status,
        },
    }


@pytest.fixture
async def cluster(kmock: Any) -> Any:
    kmock.resources["coordination.k8s.io/v1/leases"] = {}
    return kmock


def access(kmock: Any, node: str) -> ClusterAccess:
    return ClusterAccess(KubeApi(str(kmock.url)), node)


@pytest.fixture
async def nodes(cluster: Any, tmp_path: Path) -> AsyncIterator[dict[str, CsiHarness]]:
    made: dict[str, CsiHarness] = {}
    for node in ("node-a", "node-b"):
        acc = access(cluster, node)
        made[node] = await asyncio.to_thread(
            CsiHarness, tmp_path / node, lookup=acc, leases=acc, node_id=node
        )
    try:
        yield made
    finally:
        for harness in made.values():
            await asyncio.to_thread(harness.close)


def lease(kmock: Any, name: str, ns: str = "team") -> dict[str, Any] | None:
    key = (LEASES, ns, name)
    if key not in kmock.objects or kmock.objects[key].deleted:
        return None
    return dict(kmock.objects[key].raw)


async def stage(csi: CsiHarness, vol: str, mode: int = Mode.SINGLE_NODE_WRITER, **ctx: str) -> Any:
    request = pb.NodeStageVolumeRequest(
        volume_id=vol,
        staging_target_path=csi.path("staging", vol.replace("/", "_")),
        volume_capability=mount_cap(mode=mode),
        volume_context=ctx,
    )
    return await asyncio.to_thread(csi.node_stub.NodeStageVolume, request)


async def unstage(csi: CsiHarness, vol: str) -> Any:
    request = pb.NodeUnstageVolumeRequest(
        volume_id=vol, staging_target_path=csi.path("staging", vol.replace("/", "_"))
    )
    return await asyncio.to_thread(csi.node_stub.NodeUnstageVolume, request)


async def test_export_status_is_read_through_the_api(cluster: Any) -> None:
    cluster.objects[EXPORTS, "team", "db"] = nbdexport("db", readOnly=True)
    status = await asyncio.to_thread(access(cluster, "n").get_export, "team", "db")
    assert status is not None and status.usable
    assert (status.uri, status.read_only, status.size_bytes) == ("nbd://files/db", True, 2**26)
    assert await asyncio.to_thread(access(cluster, "n").get_export, "team", "nope") is None


async def test_writer_lease_goes_to_exactly_one_of_racing_nodes(cluster: Any) -> None:
    # Four, not more: asyncio's default executor has min(32, cpus + 4) threads.
    start = threading.Barrier(4)

    def contend(node: str) -> str:
        start.wait(10)
        try:
            access(cluster, node).acquire_writer("team", "db")
            return "won"
        except FailedPrecondition as exc:
            return str(exc)

    results = await asyncio.gather(*(asyncio.to_thread(contend, f"node-{i}") for i in range(4)))
    assert results.count("won") == 1
    winner = lease(cluster, writer_lease_name("db"))
    assert winner is not None
    holder = winner["spec"]["holderIdentity"]
    assert all(holder in r for r in results if r != "won")  # the loser is told who writes


async def test_writer_lease_is_idempotent_and_release_leaves_others_alone(cluster: Any) -> None:
    a, b = access(cluster, "node-a"), access(cluster, "node-b")
    ref = await asyncio.to_thread(a.acquire_writer, "team", "db")
    assert ref == f"team/{writer_lease_name('db')}"
    assert await asyncio.to_thread(a.acquire_writer, "team", "db") == ref
    await asyncio.to_thread(b.release, ref)  # not b's: must stay
    assert lease(cluster, writer_lease_name("db")) is not None
    await asyncio.to_thread(a.release, ref)
    await asyncio.to_thread(a.release, ref)  # already gone: fine
    assert lease(cluster, writer_lease_name("db")) is None


async def test_unreachable_api_is_unavailable(tmp_path: Path) -> None:
    dead = ClusterAccess(KubeApi("http://127.0.0.1:9", timeout=2), "n")
    with pytest.raises(Unavailable):
        await asyncio.to_thread(dead.get_export, "team", "db")


async def test_second_writer_node_is_refused_until_the_first_unstages(
    cluster: Any, nodes: dict[str, CsiHarness]
) -> None:
    cluster.objects[EXPORTS, "team", "db"] = nbdexport("db")
    a, b = nodes["node-a"], nodes["node-b"]
    a.image("db")
    b.image("db")
    await stage(a, "team/db")

    writer = lease(cluster, writer_lease_name("db"))
    assert writer is not None and writer["spec"]["holderIdentity"] == "node-a"
    record = lease(cluster, attachment_lease_name("db", "node-a"))
    assert record is not None
    seen = attachment_from_lease(record)
    assert seen is not None
    assert (seen.node, seen.device, seen.mode) == (
        "node-a",
        a.path("devices", "db.img"),
        "ReadWrite",
    )

    with pytest.raises(grpc.RpcError) as info:
        await stage(b, "team/db")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "node-a" in (info.value.details() or "")
    assert b.attacher.attach_calls == []  # refused before touching the device

    await unstage(a, "team/db")
    assert lease(cluster, writer_lease_name("db")) is None
    assert lease(cluster, attachment_lease_name("db", "node-a")) is None
    await stage(b, "team/db")
    assert lease(cluster, writer_lease_name("db"))["spec"]["holderIdentity"] == "node-b"  # type: ignore[index]


async def test_readers_take_no_writer_lease_and_read_only_exports_refuse_writers(
    cluster: Any, nodes: dict[str, CsiHarness]
) -> None:
    cluster.objects[EXPORTS, "team", "rom"] = nbdexport("rom", accessMode="ReadOnlyMany")
    a = nodes["node-a"]
    a.image("rom")
    with pytest.raises(grpc.RpcError) as info:
        await stage(a, "team/rom")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert lease(cluster, writer_lease_name("rom")) is None
    assert a.attacher.attach_calls == []


async def test_missing_export_is_not_found(cluster: Any, nodes: dict[str, CsiHarness]) -> None:
    with pytest.raises(grpc.RpcError) as info:
        await stage(nodes["node-a"], "team/ghost")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ephemeral_inline_export_resolves_in_the_pod_namespace(
    cluster: Any, nodes: dict[str, CsiHarness]
) -> None:
    cluster.objects[EXPORTS, "apps", "scratch"] = nbdexport("scratch", ns="apps")
    a = nodes["node-a"]
    a.image("scratch")
    target = a.path("pods", "p", "vol")
    request = pb.NodePublishVolumeRequest(
        volume_id="csi-0123abcd",
        target_path=target,
        volume_capability=mount_cap(),
        volume_context={
            "export": "scratch",
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.namespace": "apps",
            "csi.storage.k8s.io/pod.name": "p",
        },
    )
    await asyncio.to_thread(a.node_stub.NodePublishVolume, request)
    assert lease(cluster, writer_lease_name("scratch"), ns="apps") is not None
    assert lease(cluster, attachment_lease_name("scratch", "node-a"), ns="apps") is not None
    unpublish = pb.NodeUnpublishVolumeRequest(volume_id="csi-0123abcd", target_path=target)
    await asyncio.to_thread(a.node_stub.NodeUnpublishVolume, unpublish)
    assert lease(cluster, writer_lease_name("scratch"), ns="apps") is None
    assert lease(cluster, attachment_lease_name("scratch", "node-a"), ns="apps") is None
    assert a.attacher.attached == {}


async def test_api_refusals_map_to_csi_codes(cluster: Any) -> None:
    exports = f"/apis/{GROUP}/{VERSION}/namespaces/team/{PLURAL}"
    cluster[f"get {exports}/denied"] << 403 << {"kind": "Status", "message": "forbidden by RBAC"}
    cluster[f"get {exports}/overloaded"] << 503
    cluster["post /apis/coordination.k8s.io/v1/namespaces/team/leases"] << 403
    acc = access(cluster, "node-a")
    with pytest.raises(Internal, match="service account may not"):
        await asyncio.to_thread(acc.get_export, "team", "denied")
    with pytest.raises(Unavailable):
        await asyncio.to_thread(acc.get_export, "team", "overloaded")
    with pytest.raises(Internal, match="creating Lease"):
        await asyncio.to_thread(acc.acquire_writer, "team", "db")


async def test_a_refused_device_leaves_a_warning_event_on_its_export(cluster: Any) -> None:
    cluster.resources["v1/events"] = {}
    api = access(cluster, "node-a")
    await asyncio.to_thread(
        api.record_event, "team", "db", "DataChanged", "/dev/nbd0: identity changed"
    )
    events = [obj.raw for key, obj in cluster.objects.items() if key[0] == km.resource("v1/events")]
    assert len(events) == 1
    event = events[0]
    assert event["involvedObject"] == {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "NBDExport", "name": "db", "namespace": "team"
    }  # fmt: skip
    assert (event["type"], event["reason"]) == ("Warning", "DataChanged")
    assert "identity changed" in event["message"] and event["source"]["host"] == "node-a"
