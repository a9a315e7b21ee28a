"""CSI Node and Identity services over gRPC on a real unix socket: every RPC, its argument
errors and its idempotency, with real mounts (kernel attach replaced by image files, see
csi_harness.py; the kernel path is tests/kernel/test_csi_uml.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from nbd_agent.csi import mounter
from nbd_agent.csi._generated import csi_pb2 as pb

from tests.interop.csi_harness import CsiHarness, block_cap, mount_cap

Mode = pb.VolumeCapability.AccessMode
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")


@pytest.fixture
def csi(tmp_path: Path) -> Iterator[CsiHarness]:
    harness = CsiHarness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def code_of(call, request) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code()


def stage(csi: CsiHarness, vol: str, uri: str, cap=None, path: str = "") -> None:
    csi.node_stub.NodeStageVolume(
        pb.NodeStageVolumeRequest(
            volume_id=vol,
            staging_target_path=path or csi.path("staging", vol),
            volume_capability=cap or mount_cap(),
            volume_context={"uri": uri},
        )
    )


def publish(csi: CsiHarness, vol: str, target: str, cap=None, readonly: bool = False) -> None:
    csi.node_stub.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol,
            staging_target_path=csi.path("staging", vol),
            target_path=target,
            volume_capability=cap or mount_cap(),
            readonly=readonly,
            volume_context={},
        )
    )


def unpublish(csi: CsiHarness, vol: str, target: str) -> None:
    csi.node_stub.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=vol, target_path=target)
    )


def unstage(csi: CsiHarness, vol: str) -> None:
    csi.node_stub.NodeUnstageVolume(
        pb.NodeUnstageVolumeRequest(volume_id=vol, staging_target_path=csi.path("staging", vol))
    )


# ---- Identity ----


def test_plugin_info_names_the_driver_nbd_dev(csi: CsiHarness) -> None:
    info = csi.identity_stub.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "nbd.dev"
    assert info.vendor_version


def test_plugin_capabilities_offer_no_controller_service(csi: CsiHarness) -> None:
    caps = csi.identity_stub.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert [c.service.type for c in caps.capabilities] == []


def test_probe_is_not_ready_while_the_nbd_family_is_missing(csi: CsiHarness) -> None:
    assert csi.identity_stub.Probe(pb.ProbeRequest()).ready.value is True
    csi.attacher.ready_reason = "generic netlink family 'nbd' not found"
    probe = csi.identity_stub.Probe(pb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value is False


# ---- Node information ----


def test_node_info_gives_node_id_and_device_count(csi: CsiHarness) -> None:
    info = csi.node_stub.NodeGetInfo(pb.NodeGetInfoRequest())
    assert (info.node_id, info.max_volumes_per_node) == ("node-a", 16)
    # The node's own segment: host-device placement and capacity are expressed in it.
    assert dict(info.accessible_topology.segments) == {"topology.nbd.dev/node": "node-a"}


def test_node_capabilities_are_stage_stats_condition_and_expansion(csi: CsiHarness) -> None:
    caps = csi.node_stub.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    rpc = pb.NodeServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.VOLUME_CONDITION,
        rpc.EXPAND_VOLUME,
    }


# ---- argument errors ----

STAGE = "NodeStageVolume"
BAD_REQUESTS = [
    (STAGE, pb.NodeStageVolumeRequest(staging_target_path="/x", volume_capability=mount_cap())),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", volume_capability=mount_cap())),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="rel/x",
                                      volume_capability=mount_cap())),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x")),
    (STAGE, pb.NodeStageVolumeRequest(
        volume_id="v", staging_target_path="/x",
        volume_capability=pb.VolumeCapability(access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)))),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x",
                                      volume_capability=mount_cap(mode=Mode.UNKNOWN))),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x",
                                      volume_capability=mount_cap(fs_type="ntfs"))),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x",
                                      volume_capability=mount_cap(),
                                      volume_context={"uri": "http://example/x"})),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="no-slash", staging_target_path="/x",
                                      volume_capability=mount_cap())),
    (STAGE, pb.NodeStageVolumeRequest(volume_id="v", staging_target_path="/x",
                                      volume_capability=mount_cap(),
                                      volume_context={"uri": "nbd://h/e", "connections": "99"})),
    ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(staging_target_path="/x")),
    ("NodeUnstageVolume", pb.NodeUnstageVolumeRequest(volume_id="v")),
    ("NodePublishVolume", pb.NodePublishVolumeRequest(
        target_path="/t", staging_target_path="/x", volume_capability=mount_cap())),
    ("NodePublishVolume", pb.NodePublishVolumeRequest(
        volume_id="v", staging_target_path="/x", volume_capability=mount_cap())),
    ("NodePublishVolume", pb.NodePublishVolumeRequest(
        volume_id="v", target_path="/t", staging_target_path="/x")),
    ("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(target_path="/t")),
    ("NodeUnpublishVolume", pb.NodeUnpublishVolumeRequest(volume_id="v")),
    ("NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_path="/t")),
    ("NodeGetVolumeStats", pb.NodeGetVolumeStatsRequest(volume_id="v")),
]  # fmt: skip


@pytest.mark.parametrize(("method", "request_"), BAD_REQUESTS)
def test_malformed_requests_are_invalid_argument(csi: CsiHarness, method: str, request_) -> None:
    assert code_of(getattr(csi.node_stub, method), request_) == grpc.StatusCode.INVALID_ARGUMENT
    assert csi.attacher.attach_calls == []


def test_export_handle_without_kubernetes_access_is_unavailable(csi: CsiHarness) -> None:
    request = pb.NodeStageVolumeRequest(
        volume_id="default/data", staging_target_path="/x", volume_capability=mount_cap()
    )
    assert code_of(csi.node_stub.NodeStageVolume, request) == grpc.StatusCode.UNAVAILABLE


def test_unknown_export_is_not_found_and_leaves_nothing(csi: CsiHarness) -> None:
    request = pb.NodeStageVolumeRequest(
        volume_id="v",
        staging_target_path=csi.path("staging", "v"),
        volume_capability=mount_cap(),
        volume_context={"uri": "nbd://files/missing"},
    )
    assert code_of(csi.node_stub.NodeStageVolume, request) == grpc.StatusCode.NOT_FOUND
    assert csi.node.state.volumes == {}


def test_publish_without_staging_path_or_stage_is_failed_precondition(csi: CsiHarness) -> None:
    no_staging = pb.NodePublishVolumeRequest(
        volume_id="v", target_path=csi.path("t"), volume_capability=mount_cap()
    )
    assert code_of(csi.node_stub.NodePublishVolume, no_staging) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    with pytest.raises(grpc.RpcError) as info:
        publish(csi, "v", csi.path("t"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_stats_of_unknown_volume_is_not_found(csi: CsiHarness) -> None:
    request = pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=csi.path("t"))
    assert code_of(csi.node_stub.NodeGetVolumeStats, request) == grpc.StatusCode.NOT_FOUND


def expand_request(vol: str, path: str, required: int) -> pb.NodeExpandVolumeRequest:
    return pb.NodeExpandVolumeRequest(
        volume_id=vol, volume_path=path, capacity_range=pb.CapacityRange(required_bytes=required)
    )


def test_expand_of_unknown_volume_or_path_is_not_found_and_no_path_invalid(
    csi: CsiHarness,
) -> None:
    expand = csi.node_stub.NodeExpandVolume
    assert code_of(expand, expand_request("v", csi.path("t"), 1)) == grpc.StatusCode.NOT_FOUND
    assert code_of(expand, expand_request("v", "", 1)) == grpc.StatusCode.INVALID_ARGUMENT
    stage(csi, "b", csi.image("raw", size=4 * 2**20), cap=block_cap())
    elsewhere = expand_request("b", csi.path("elsewhere"), 1)
    assert code_of(expand, elsewhere) == grpc.StatusCode.NOT_FOUND
    unstage(csi, "b")


def test_expand_is_unavailable_until_the_device_has_grown(csi: CsiHarness) -> None:
    stage(csi, "b", csi.image("raw", size=4 * 2**20), cap=block_cap())
    target = csi.path("pods", "p", "dev")
    publish(csi, "b", target, cap=block_cap())
    request = expand_request("b", target, 8 * 2**20)
    assert code_of(csi.node_stub.NodeExpandVolume, request) == grpc.StatusCode.UNAVAILABLE
    os.truncate(csi.path("devices", "raw.img"), 8 * 2**20)  # the reattached, larger export
    assert csi.node_stub.NodeExpandVolume(request).capacity_bytes == 8 * 2**20
    unpublish(csi, "b", target)
    unstage(csi, "b")


# ---- filesystem lifecycle and idempotency ----


def test_filesystem_volume_lifecycle_is_idempotent_and_keeps_data(csi: CsiHarness) -> None:
    uri = csi.image("fs1")
    target, staging = csi.path("pods", "p1", "vol"), csi.path("staging", "v1")
    stage(csi, "v1", uri)
    stage(csi, "v1", uri)  # idempotent: same arguments, success, no second attach
    assert csi.attacher.attach_calls == [uri]
    assert mounter.probe(csi.path("devices", "fs1.img")).fs_type == "ext4"
    assert mounter.is_mounted(staging)

    publish(csi, "v1", target)
    publish(csi, "v1", target)
    Path(target, "hello.txt").write_text("kept")
    assert Path(staging, "hello.txt").read_text() == "kept"

    stats = csi.node_stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v1", volume_path=target)
    )
    units = {u.unit: u for u in stats.usage}
    assert units[pb.VolumeUsage.BYTES].total > 50 * 2**20
    assert units[pb.VolumeUsage.INODES].used > 0
    assert stats.volume_condition.abnormal is False

    unpublish(csi, "v1", target)
    unpublish(csi, "v1", target)
    assert not os.path.exists(target)
    unstage(csi, "v1")
    unstage(csi, "v1")
    assert not mounter.is_mounted(staging)
    assert csi.attacher.attached == {}
    assert csi.node.state.volumes == {}

    stage(csi, "v1", uri)  # restage: the filesystem is found, not recreated
    publish(csi, "v1", target)
    assert Path(target, "hello.txt").read_text() == "kept"


def test_dead_link_reports_an_abnormal_volume_condition(csi: CsiHarness) -> None:
    uri = csi.image("dead")
    stage(csi, "v", uri)
    publish(csi, "v", csi.path("t"))
    csi.attacher.dead.add(csi.path("devices", "dead.img"))
    stats = csi.node_stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=csi.path("t"))
    )
    assert stats.volume_condition.abnormal is True
    assert "down" in stats.volume_condition.message


def test_incompatible_repeats_are_already_exists(csi: CsiHarness) -> None:
    uri = csi.image("inc")
    stage(csi, "v", uri)
    with pytest.raises(grpc.RpcError) as other_path:
        stage(csi, "v", uri, path=csi.path("elsewhere"))
    assert other_path.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as as_block:
        stage(csi, "v", uri, cap=block_cap())
    assert as_block.value.code() == grpc.StatusCode.ALREADY_EXISTS
    publish(csi, "v", csi.path("t"))
    with pytest.raises(grpc.RpcError) as read_only_now:
        publish(csi, "v", csi.path("t"), readonly=True)
    assert read_only_now.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_unstage_while_published_is_refused(csi: CsiHarness) -> None:
    stage(csi, "v", csi.image("busy"))
    publish(csi, "v", csi.path("t"))
    with pytest.raises(grpc.RpcError) as info:
        unstage(csi, "v")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mounter.is_mounted(csi.path("t"))


def test_device_with_unknown_data_is_never_formatted(csi: CsiHarness) -> None:
    uri = csi.image("dirty")
    image = Path(csi.path("devices", "dirty.img"))
    with open(image, "r+b") as img:
        img.seek(8192)
        img.write(b"precious bytes, no filesystem")
    before = image.read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        stage(csi, "v", uri)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to format" in (info.value.details() or "")
    assert image.read_bytes() == before
    assert csi.attacher.attached == {}  # rolled back
    assert csi.node.state.volumes == {}


def test_existing_filesystem_of_another_type_is_not_reformatted(csi: CsiHarness) -> None:
    uri = csi.image("xfs", size=320 * 2**20)
    stage(csi, "v", uri, cap=mount_cap(fs_type="xfs"))
    unstage(csi, "v")
    with pytest.raises(grpc.RpcError) as info:
        stage(csi, "v", uri, cap=mount_cap(fs_type="ext4"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mounter.probe(csi.path("devices", "xfs.img")).fs_type == "xfs"


# ---- block and read-only ----


def test_block_volume_publishes_the_device_itself(csi: CsiHarness) -> None:
    uri = csi.image("raw", size=4 * 2**20)
    stage(csi, "b", uri, cap=block_cap())
    target = csi.path("pods", "p", "dev")
    publish(csi, "b", target, cap=block_cap())
    with open(target, "r+b") as dev:
        dev.seek(4096)
        dev.write(b"through the bind")
    with open(csi.path("devices", "raw.img"), "rb") as img:
        img.seek(4096)
        assert img.read(16) == b"through the bind"
    assert mounter.probe(csi.path("devices", "raw.img")).dirty  # never formatted
    stats = csi.node_stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="b", volume_path=target)
    )
    assert [(u.unit, u.total) for u in stats.usage] == [(pb.VolumeUsage.BYTES, 4 * 2**20)]
    unpublish(csi, "b", target)
    assert not os.path.exists(target)
    unstage(csi, "b")
    assert csi.attacher.attached == {}


def test_reader_only_access_attaches_and_mounts_read_only(csi: CsiHarness) -> None:
    uri = csi.image("ro")
    stage(csi, "w", uri)  # give it a filesystem first
    unstage(csi, "w")
    cap = mount_cap(mode=Mode.MULTI_NODE_READER_ONLY)
    stage(csi, "r", uri, cap=cap)
    assert list(csi.attacher.read_only.values())[-1] is True
    publish(csi, "r", csi.path("t"), cap=cap)
    assert mounter.is_read_only_mount(csi.path("t"))
    with pytest.raises(OSError):
        Path(csi.path("t"), "x").write_text("no")


def test_blank_read_only_device_cannot_be_formatted(csi: CsiHarness) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stage(csi, "r", csi.image("blankro"), cap=mount_cap(mode=Mode.SINGLE_NODE_READER_ONLY))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert mounter.probe(csi.path("devices", "blankro.img")).blank


# ---- ephemeral inline volumes ----


def test_ephemeral_volume_is_attached_on_publish_and_gone_after_unpublish(
    csi: CsiHarness,
) -> None:
    uri = csi.image("eph")
    target = csi.path("pods", "e", "vol")
    request = pb.NodePublishVolumeRequest(
        volume_id="csi-abc123",
        target_path=target,
        volume_capability=mount_cap(),
        volume_context={"uri": uri, "csi.storage.k8s.io/ephemeral": "true"},
    )
    csi.node_stub.NodePublishVolume(request)
    csi.node_stub.NodePublishVolume(request)
    Path(target, "f").write_text("x")
    record = csi.node.state.get("csi-abc123")
    assert record is not None and mounter.is_mounted(record.staging_path)
    unpublish(csi, "csi-abc123", target)
    assert not os.path.exists(record.staging_path)
    assert csi.attacher.attached == {}
    assert csi.node.state.volumes == {}
    assert not os.path.exists(target)


# ---- concurrency ----


def test_calls_for_one_volume_are_serialised_per_volume_not_globally(csi: CsiHarness) -> None:
    slow, fast = csi.image("slow"), csi.image("fast")
    csi.attacher.gates[slow] = threading.Event()
    csi.attacher.entered[slow] = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            stage(csi, "s", slow)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert csi.attacher.entered[slow].wait(10)
        with pytest.raises(grpc.RpcError) as info:
            stage(csi, "s", slow)
        assert info.value.code() == grpc.StatusCode.ABORTED
        stage(csi, "f", fast)  # another volume is not blocked by the slow one
    finally:
        csi.attacher.gates[slow].set()
        thread.join(30)
    assert errors == []
    assert set(csi.node.state.volumes) == {"s", "f"}


# ---- restart ----


def test_restarted_plugin_adopts_its_volumes_and_can_finish_them(csi: CsiHarness) -> None:
    uri = csi.image("r1")
    stage(csi, "v", uri)
    publish(csi, "v", csi.path("t"))
    device = csi.path("devices", "r1.img")
    csi.restart()
    assert csi.attacher.adopted == [device]
    publish(csi, "v", csi.path("t"))  # idempotent across the restart
    unpublish(csi, "v", csi.path("t"))
    unstage(csi, "v")
    assert csi.attacher.attached == {}


def test_restart_tears_down_what_kubelet_no_longer_wants(csi: CsiHarness) -> None:
    stage(csi, "v", csi.image("gone"))
    csi.stop()
    mounter.unmount(csi.path("staging", "v"))
    os.rmdir(csi.path("staging", "v"))  # kubelet removed the staging dir
    csi.start()
    assert csi.last_reconcile is not None and csi.last_reconcile.torn_down == ["v"]
    assert csi.attacher.attached == {}


# ---- logging ----


def test_every_call_is_logged_once_with_secrets_stripped(
    csi: CsiHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="nbd_agent.csi.server")
    request = pb.NodeStageVolumeRequest(
        volume_id="v",
        staging_target_path=csi.path("staging", "v"),
        volume_capability=mount_cap(),
        volume_context={"uri": csi.image("sec")},
        secrets={"password": "hunter2"},
    )
    csi.node_stub.NodeStageVolume(request)
    text = caplog.text
    assert "hunter2" not in text
    assert "***stripped***" in text
    assert text.count("call /csi.v1.Node/NodeStageVolume") == 1
    assert "done /csi.v1.Node/NodeStageVolume: OK" in text


def test_device_left_by_a_crash_before_the_state_write_is_taken_over(
    csi: CsiHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = csi.image("crash")
    real_put = csi.node.state.put

    def crash_once(record) -> None:
        monkeypatch.setattr(csi.node.state, "put", real_put)
        raise OSError("agent died here")

    monkeypatch.setattr(csi.node.state, "put", crash_once)
    with pytest.raises(grpc.RpcError):
        stage(csi, "v", uri)
    assert len(csi.attacher.attached) == 1  # the "kernel" kept the device
    stage(csi, "v", uri)
    assert csi.attacher.attach_calls == [uri]  # taken over, not attached twice
    assert csi.attacher.adopted == [csi.path("devices", "crash.img")]
    unstage(csi, "v")
    assert csi.attacher.attached == {}


def test_unpublish_of_another_volumes_target_is_not_found_and_unmounts_nothing(
    csi: CsiHarness,
) -> None:
    stage(csi, "mine", csi.image("mine"))
    publish(csi, "mine", csi.path("t"))
    with pytest.raises(grpc.RpcError) as info:
        unpublish(csi, "someone-else", csi.path("t"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert mounter.is_mounted(csi.path("t"))


def test_restaging_from_another_uri_is_already_exists(csi: CsiHarness) -> None:
    stage(csi, "v", csi.image("one"))
    with pytest.raises(grpc.RpcError) as info:
        stage(csi, "v", csi.image("two"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_one_export_twice_on_a_node_only_when_everyone_reads(csi: CsiHarness) -> None:
    uri = csi.image("shared")
    stage(csi, "w1", uri)
    with pytest.raises(grpc.RpcError) as info:
        stage(csi, "w2", uri)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "w1" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as reader:
        stage(csi, "r1", uri, cap=mount_cap(mode=Mode.MULTI_NODE_READER_ONLY))
    assert reader.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    unstage(csi, "w1")
    stage(csi, "r1", uri, cap=mount_cap(mode=Mode.MULTI_NODE_READER_ONLY))
    stage(csi, "r2", uri, cap=mount_cap(mode=Mode.MULTI_NODE_READER_ONLY))
