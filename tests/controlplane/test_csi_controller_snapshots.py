"""CSI snapshots, restores and clones over gRPC against the API substitute: a snapshot is one
VolumeSnapshot of the volume's data claim, made only after the volume's server was flushed; a
restore or clone is a volume whose claim has a dataSource. The consistency test runs a real
nbdserver on loopback: write A, snapshot (the test plays the backing snapshot controller with a
copy of the image), write B, and the volume restored from the snapshot reads A.
"""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from nbd_agent.csi import provision, snapshots
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.controller import flush_server
from nbd_agent.csi.errors import Unavailable
from nbd_agent.csi.kube import KubeApi, SnapshotStore

from nbdserver import client
from tests.controlplane.controller_harness import (
    Controller,
    Mode,
    controller,
    create_request,
    mount,
)
from tests.controlplane.operator_harness import NS
from tests.controlplane.test_crd_schema import admit
from tests.interop.security_helpers import free_port, serve, wait_for

GIB = 2**30
MIB = 2**20
Code = grpc.StatusCode


class Flushes:
    """A quiesce that records what it saw: the snapshots that existed when it was called."""

    def __init__(self, ctl_ref: list[Controller], fail: bool = False) -> None:
        self.ctl_ref = ctl_ref
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def __call__(self, export: Mapping[str, Any]) -> None:
        self.calls.append((export["metadata"]["name"], len(self.ctl_ref[0].snapshots())))
        if self.fail:
            raise Unavailable("the server did not answer the flush")
        flush_server(export)


def snap_request(name: str, source: str, **parameters: str) -> pb.CreateSnapshotRequest:
    return pb.CreateSnapshotRequest(name=name, source_volume_id=source, parameters=parameters)


async def _volume(ctl: Controller, name: str, **parameters: str) -> str:
    request = create_request(name, required=GIB, **parameters)
    return str((await ctl.call("CreateVolume", request)).volume.volume_id)


async def _ready(ctl: Controller, snapshot: str) -> None:
    """Play the backing class's snapshot controller: the VolumeSnapshot is ready."""
    name = snapshot.split("/")[1]
    body = {"status": {"readyToUse": True, "restoreSize": "1Gi"}}
    await asyncio.to_thread(SnapshotStore(KubeApi(str(ctl.api.url))).patch, NS, name, body)


@pytest.fixture
async def flushes_and_ctl(tmp_path: Path) -> Any:
    ref: list[Controller] = []
    flushes = Flushes(ref)
    async with controller(tmp_path, quiesce=flushes) as ctl:
        ref.append(ctl)
        yield flushes, ctl


async def test_a_snapshot_is_one_volume_snapshot_of_the_data_claim_taken_after_a_flush(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    flushes, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    resp = await ctl.call("CreateSnapshot", snap_request("snapshot-1", vol, snapshotClass="csi"))
    assert resp.snapshot.snapshot_id == f"{NS}/snapshot-1"
    assert resp.snapshot.source_volume_id == vol
    assert resp.snapshot.size_bytes == GIB
    assert resp.snapshot.ready_to_use is False
    assert resp.snapshot.creation_time.seconds > 0
    [obj] = ctl.snapshots()
    assert obj["spec"] == {
        "source": {"persistentVolumeClaimName": "pvc-src-nbd-data"},
        "volumeSnapshotClassName": "csi",
    }
    assert flushes.calls == [("pvc-src", 0)]  # flushed before the VolumeSnapshot existed
    again = await ctl.call("CreateSnapshot", snap_request("snapshot-1", vol, snapshotClass="csi"))
    assert again.snapshot.snapshot_id == resp.snapshot.snapshot_id
    assert len(ctl.snapshots()) == 1 and len(flushes.calls) == 1  # nothing flushed twice
    await _ready(ctl, resp.snapshot.snapshot_id)
    ready = await ctl.call("CreateSnapshot", snap_request("snapshot-1", vol, snapshotClass="csi"))
    assert ready.snapshot.ready_to_use is True


async def test_snapshot_errors_carry_the_spec_codes(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    mem = await _volume(ctl, "pvc-mem", backing="memory")
    other = await _volume(ctl, "pvc-other")
    assert await ctl.code("CreateSnapshot", snap_request("", vol)) == Code.INVALID_ARGUMENT
    assert await ctl.code("CreateSnapshot", snap_request("s", "")) == Code.INVALID_ARGUMENT
    typo = snap_request("s", vol, snapshotClas="x")
    assert await ctl.code("CreateSnapshot", typo) == Code.INVALID_ARGUMENT
    assert await ctl.code("CreateSnapshot", snap_request("s", f"{NS}/nope")) == Code.NOT_FOUND
    assert await ctl.code("CreateSnapshot", snap_request("s", mem)) == Code.FAILED_PRECONDITION
    await ctl.call("CreateSnapshot", snap_request("s", vol))
    assert await ctl.code("CreateSnapshot", snap_request("s", other)) == Code.ALREADY_EXISTS
    assert len(ctl.snapshots()) == 1


async def test_a_failed_flush_is_unavailable_and_takes_no_snapshot(tmp_path: Path) -> None:
    ref: list[Controller] = []
    async with controller(tmp_path, quiesce=Flushes(ref, fail=True)) as ctl:
        ref.append(ctl)
        vol = await _volume(ctl, "pvc-src")
        assert await ctl.code("CreateSnapshot", snap_request("s", vol)) == Code.UNAVAILABLE
        assert ctl.snapshots() == []


async def test_delete_snapshot_is_idempotent_and_spares_foreign_ones(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    snap = (await ctl.call("CreateSnapshot", snap_request("s", vol))).snapshot.snapshot_id
    request = pb.DeleteSnapshotRequest(snapshot_id=snap)
    await ctl.call("DeleteSnapshot", request)
    assert ctl.snapshots() == []
    await ctl.call("DeleteSnapshot", request)
    await ctl.call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot_id="nonsense"))
    assert await ctl.code("DeleteSnapshot", pb.DeleteSnapshotRequest()) == Code.INVALID_ARGUMENT


def _from_snapshot(name: str, snapshot: str, required: int = 0) -> pb.CreateVolumeRequest:
    request = create_request(name, required=required)
    request.volume_content_source.snapshot.snapshot_id = snapshot
    return request


def _from_volume(name: str, volume: str, **parameters: str) -> pb.CreateVolumeRequest:
    request = create_request(name, **parameters)
    request.volume_content_source.volume.volume_id = volume
    return request


async def test_a_restored_volume_is_a_claim_restored_from_the_backing_snapshot(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    snap = (await ctl.call("CreateSnapshot", snap_request("s", vol))).snapshot.snapshot_id
    resp = await ctl.call("CreateVolume", _from_snapshot("pvc-restored", snap))
    assert resp.volume.capacity_bytes == GIB  # unasked: the snapshot's size
    assert resp.volume.content_source.snapshot.snapshot_id == snap
    restored = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-restored")
    template = restored["spec"]["source"]["volumeClaimTemplate"]
    assert template["dataSource"] == {"kind": "VolumeSnapshot", "name": "s"}
    bigger = await ctl.call("CreateVolume", _from_snapshot("pvc-bigger", snap, 2 * GIB))
    assert bigger.volume.capacity_bytes == 2 * GIB
    small = _from_snapshot("pvc-small", snap, GIB // 2)
    assert await ctl.code("CreateVolume", small) == Code.OUT_OF_RANGE
    missing = _from_snapshot("pvc-x", f"{NS}/nope")
    assert await ctl.code("CreateVolume", missing) == Code.NOT_FOUND
    # The same name from another snapshot is another volume.
    snap2 = (await ctl.call("CreateSnapshot", snap_request("s2", vol))).snapshot.snapshot_id
    assert await ctl.code("CreateVolume", _from_snapshot("pvc-restored", snap2)) == (
        Code.ALREADY_EXISTS
    )


async def test_a_clone_is_a_claim_cloned_from_the_source_volumes_claim(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    resp = await ctl.call("CreateVolume", _from_volume("pvc-clone", vol))
    assert resp.volume.capacity_bytes == GIB
    assert resp.volume.content_source.volume.volume_id == vol
    clone = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-clone")
    assert clone["spec"]["source"]["volumeClaimTemplate"]["dataSource"] == {
        "kind": "PersistentVolumeClaim",
        "name": "pvc-src-nbd-data",
    }
    mem = await _volume(ctl, "pvc-mem", backing="memory")
    assert await ctl.code("CreateVolume", _from_volume("c2", mem)) == Code.INVALID_ARGUMENT
    assert await ctl.code("CreateVolume", _from_volume("c3", f"{NS}/nope")) == Code.NOT_FOUND
    in_memory = _from_volume("c4", vol, backing="memory")
    assert await ctl.code("CreateVolume", in_memory) == Code.INVALID_ARGUMENT


async def test_a_copy_on_write_clone_is_an_overlay_over_a_read_only_source_volume(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    src = await _volume(ctl, "pvc-src")
    # The golden image: a read-only-many copy of the source, which never changes again.
    golden_request = _from_volume("pvc-golden", src)
    golden_request.volume_capabilities[0].CopyFrom(mount(Mode.MULTI_NODE_READER_ONLY))
    golden = (await ctl.call("CreateVolume", golden_request)).volume.volume_id
    cow = _from_volume("pvc-cow", golden, cloneMode="copyOnWrite", storageClass="fast")
    resp = await ctl.call("CreateVolume", cow)
    assert resp.volume.capacity_bytes == GIB  # the base's size
    clone = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-cow")
    assert clone["spec"]["source"] == {"export": {"name": "pvc-golden", "storageClassName": "fast"}}
    assert clone["spec"]["accessMode"] == "ReadWriteOnce" and "size" not in clone["spec"]
    assert admit(clone) == []
    # Repeating the request is the same volume; the overlay's class is part of the request.
    assert (await ctl.call("CreateVolume", cow)).volume.volume_id == resp.volume.volume_id
    other_class = _from_volume("pvc-cow", golden, cloneMode="copyOnWrite", storageClass="slow")
    assert await ctl.code("CreateVolume", other_class) == Code.ALREADY_EXISTS


async def test_a_copy_on_write_clone_is_refused_where_its_base_could_change(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    writable = await _volume(ctl, "pvc-src")
    over_writable = _from_volume("c1", writable, cloneMode="copyOnWrite")
    assert await ctl.code("CreateVolume", over_writable) == Code.INVALID_ARGUMENT
    fresh = create_request("c2", required=GIB, cloneMode="copyOnWrite")
    assert await ctl.code("CreateVolume", fresh) == Code.INVALID_ARGUMENT
    typo = _from_volume("c3", writable, cloneMode="thin")
    assert await ctl.code("CreateVolume", typo) == Code.INVALID_ARGUMENT
    assert not [o for o in ctl.exports() if o["metadata"]["name"] in ("c1", "c2", "c3")]


def test_a_copy_on_write_clone_keeps_its_bases_size() -> None:
    base = provision.Content(
        {"kind": "PersistentVolumeClaim", "name": "g-nbd-data"}, GIB, "g", base_read_only=True
    )
    bigger = create_request("pvc-1", required=2 * GIB, cloneMode="copyOnWrite")
    with pytest.raises(provision.OutOfRange, match="source's size"):
        provision.plan(bigger, NS, base)
    same = provision.plan(create_request("pvc-1", cloneMode="copyOnWrite"), NS, base)
    assert same.spec["source"] == {"export": {"name": "g"}}


def test_every_restored_or_cloned_export_is_admitted_by_the_crd() -> None:
    for content in (
        provision.Content({"kind": "VolumeSnapshot", "name": "s"}, GIB),
        provision.Content({"kind": "PersistentVolumeClaim", "name": "v-nbd-data"}, GIB),
    ):
        body = provision.manifest(provision.plan(create_request("pvc-1"), NS, content))
        assert admit(body) == []
    assert snapshots.P_SNAPSHOT_CLASS == "snapshotClass"


# ---- consistency, with a real nbdserver on loopback ----


def _flush_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("nbdserver_requests_total{")]
    return sum(int(float(ln.split()[-1])) for ln in lines if 'command="flush"' in ln)


def _metrics_up(port: int) -> bool:
    try:
        _flush_count(port)
        return True
    except OSError:
        return False


async def test_write_a_snapshot_write_b_and_the_restored_volume_reads_a(tmp_path: Path) -> None:
    image, copy = tmp_path / "src.img", tmp_path / "snapshot.img"
    size = 8 * MIB
    metrics = free_port()
    args = [str(image), "--name", "disk", "--size", str(size),
            "--metrics-port", str(metrics), "--metrics-bind", "127.0.0.1"]  # fmt: skip
    with serve(args, tmp_path) as src:
        wait_for(lambda: _metrics_up(metrics), what="the metrics endpoint")
        uri = f"nbd://127.0.0.1:{src.port}/disk"
        async with controller(tmp_path, quiesce=flush_server) as ctl:
            vol = await _volume(ctl, "pvc-src")
            status = {"phase": "Ready", "uri": uri, "sizeBytes": size}
            await ctl.client.patch(
                "NBDExport", NS, "pvc-src", {"status": status}, subresource="status"
            )
            with client.connect(uri) as conn:
                conn.pwrite(b"A" * 4096, 0)  # acknowledged, never flushed by the writer
                before = _flush_count(metrics)
                snap = await ctl.call("CreateSnapshot", snap_request("s", vol))
                assert _flush_count(metrics) == before + 1
                # The backing class snapshots the claim now (here: a copy of the image).
                assert ctl.snapshots(), "no VolumeSnapshot to act on"
                await asyncio.to_thread(shutil.copyfile, image, copy)
                await _ready(ctl, snap.snapshot.snapshot_id)
                conn.pwrite(b"B" * 4096, 0)
                conn.flush()
                restore = _from_snapshot("pvc-restored", snap.snapshot.snapshot_id)
                await ctl.call("CreateVolume", restore)
                restored = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-restored")
                source = restored["spec"]["source"]["volumeClaimTemplate"]["dataSource"]
                assert source == {"kind": "VolumeSnapshot", "name": "s"}
                assert conn.pread(0, 4096) == b"B" * 4096
                conn.disconnect()
    # The restored claim holds the snapshot's data: serve it as the operator would.
    with (
        serve([str(copy), "--name", "disk"], tmp_path) as restored_server,
        client.connect(f"nbd://127.0.0.1:{restored_server.port}/disk") as conn,
    ):
        assert conn.pread(0, 4096) == b"A" * 4096
        conn.disconnect()


async def test_a_volume_from_a_snapshot_may_be_read_only_many(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    vol = await _volume(ctl, "pvc-src")
    snap = (await ctl.call("CreateSnapshot", snap_request("s", vol))).snapshot.snapshot_id
    rox = mount(Mode.MULTI_NODE_READER_ONLY)
    request = _from_snapshot("pvc-readers", snap)
    del request.volume_capabilities[:]
    request.volume_capabilities.append(rox)
    volume = (await ctl.call("CreateVolume", request)).volume
    spec = next(o for o in ctl.exports() if o["metadata"]["name"] == "pvc-readers")["spec"]
    assert (spec["accessMode"], spec["readOnly"]) == ("ReadOnlyMany", True)
    body = {"apiVersion": "nbd.dev/v1alpha1", "kind": "NBDExport", "spec": spec,
            "metadata": {"name": "pvc-readers", "namespace": NS}}  # fmt: skip
    assert admit(body) == []
    check = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id, volume_capabilities=[rox]
    )
    assert (await ctl.call("ValidateVolumeCapabilities", check)).HasField("confirmed")


async def test_list_snapshots_filters_by_id_and_source_and_pages(
    flushes_and_ctl: tuple[Flushes, Controller],
) -> None:
    _, ctl = flushes_and_ctl
    a, b = await _volume(ctl, "pvc-a"), await _volume(ctl, "pvc-b")
    for name, source in (("s1", a), ("s2", a), ("s3", b)):
        await ctl.call("CreateSnapshot", snap_request(name, source))

    async def listed(**fields: Any) -> list[str]:
        resp = await ctl.call("ListSnapshots", pb.ListSnapshotsRequest(**fields))
        return [e.snapshot.snapshot_id for e in resp.entries]

    assert await listed() == [f"{NS}/s1", f"{NS}/s2", f"{NS}/s3"]
    assert await listed(source_volume_id=a) == [f"{NS}/s1", f"{NS}/s2"]
    assert await listed(snapshot_id=f"{NS}/s3") == [f"{NS}/s3"]
    assert await listed(snapshot_id=f"{NS}/nope") == []
    first = await ctl.call("ListSnapshots", pb.ListSnapshotsRequest(max_entries=2))
    assert first.next_token == "2"
    rest = await listed(max_entries=2, starting_token=first.next_token)
    assert rest == [f"{NS}/s3"]
    stale = pb.ListSnapshotsRequest(starting_token="9")
    assert await ctl.code("ListSnapshots", stale) == Code.ABORTED
