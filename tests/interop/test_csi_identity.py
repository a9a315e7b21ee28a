"""The CSI node plugin and export identities: it records the identity at stage, a restage that
finds another identity fails (FAILED_PRECONDITION, nothing attached), and NodeGetVolumeStats
reports the volume abnormal, with the reason, once the keeper refused to reattach its device.

The attacher is the harness's file stand-in; the kernel side of a refusal is
tests/unit/test_agent_reconnect_identity.py and tests/kernel/test_export_identity_uml.py.
"""

from __future__ import annotations

import os

import grpc
import pytest
from nbd_agent.csi._generated import csi_pb2 as pb

from tests.interop.csi_harness import CsiHarness, block_cap
from tests.interop.test_csi_grpc_node import csi, publish, stage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount needs root")
__all__ = ["csi"]  # the harness fixture, shared with test_csi_grpc_node.py


def test_stage_records_the_identity_and_a_restage_refuses_another_one(csi: CsiHarness) -> None:
    uri = csi.image("data")
    csi.attacher.identities[uri] = "file-1"
    stage(csi, "v", uri, cap=block_cap())
    record = csi.node.state.get("v")
    assert record is not None and record.identity == "file-1"
    device = record.device
    csi.attacher.attached.pop(device)  # the node rebooted: the device is gone
    csi.attacher.identities[uri] = "mem-2"  # ... and the server came back empty
    with pytest.raises(grpc.RpcError) as err:
        stage(csi, "v", uri, cap=block_cap())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "identity changed from file-1" in str(err.value.details())
    assert device not in csi.attacher.attached
    csi.attacher.identities[uri] = "file-1"  # the same data again: restage works
    stage(csi, "v", uri, cap=block_cap())
    assert device in csi.attacher.attached


def test_a_refused_device_is_abnormal_with_its_reason_and_still_reports_usage(
    csi: CsiHarness,
) -> None:
    uri = csi.image("gone")
    stage(csi, "v", uri)
    publish(csi, "v", csi.path("t"))
    record = csi.node.state.get("v")
    assert record is not None
    stats = csi.node_stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=csi.path("t"))
    )
    assert stats.volume_condition.abnormal is False
    csi.attacher.refused[record.device] = "the export's identity changed from mem-1 to mem-2"
    stats = csi.node_stub.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=csi.path("t"))
    )
    assert stats.volume_condition.abnormal is True
    assert "not reattached: the export's identity changed" in stats.volume_condition.message
    assert any(u.unit == pb.VolumeUsage.Unit.BYTES and u.total > 0 for u in stats.usage)


class EventLog:
    """The Leases side of the plugin, reduced to the Events it records."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, str]] = []

    def record_event(self, namespace: str, export: str, reason: str, message: str) -> None:
        self.events.append((namespace, export, reason, message))


def test_a_refusal_becomes_an_event_on_the_volumes_export(csi: CsiHarness) -> None:
    uri = csi.image("ev")
    stage(csi, "v", uri, cap=block_cap())
    record = csi.node.state.get("v")
    assert record is not None
    record.export = "team/db"
    log = EventLog()
    csi.node.volumes.leases = log  # type: ignore[assignment]
    csi.node.volumes.report_refused(record.device, "the export shrank")
    csi.node.volumes.report_refused("/dev/nbd9", "not a volume of this node")
    assert log.events == [("team", "db", "DataChanged", f"{record.device}: the export shrank")]
