"""The committed CSI gRPC code is exactly what grpcio-tools makes of proto/csi.proto, and the
proto keeps the CSI specification's names and field numbers (wire compatibility with kubelet)."""

from __future__ import annotations

import filecmp
from pathlib import Path

from nbd_agent.csi import generate
from nbd_agent.csi._generated import csi_pb2 as pb


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    for name in generate.FILES:
        assert filecmp.cmp(tmp_path / name, generate.GENERATED / name, shallow=False), (
            f"{name} is stale: run `make proto` (python -m nbd_agent.csi.generate)"
        )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    (tmp_path / "csi_pb2.py").write_text("# edited by hand\n")
    assert generate.stale_files(tmp_path) == ["csi_pb2.py"]
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1


def test_package_and_services_are_the_spec_ones() -> None:
    assert pb.DESCRIPTOR.package == "csi.v1"
    services = {
        s.name: [m.name for m in s.methods] for s in pb.DESCRIPTOR.services_by_name.values()
    }
    assert services["Identity"] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert set(services["Controller"]) >= {
        "CreateVolume",
        "DeleteVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ControllerExpandVolume",
    }
    assert set(services["Node"]) >= {
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeGetCapabilities",
        "NodeGetInfo",
    }


# Field numbers from the CSI specification (spec.md), message by message.
SPEC_FIELDS = {
    "NodeStageVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3,
        "volume_capability": 4, "secrets": 5, "volume_context": 6,
    },
    "NodePublishVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8,
    },
    "NodeUnstageVolumeRequest": {"volume_id": 1, "staging_target_path": 2},
    "NodeUnpublishVolumeRequest": {"volume_id": 1, "target_path": 2},
    "NodeGetVolumeStatsRequest": {"volume_id": 1, "volume_path": 2, "staging_target_path": 3},
    "NodeGetVolumeStatsResponse": {"usage": 1, "volume_condition": 2},
    "VolumeUsage": {"available": 1, "total": 2, "used": 3, "unit": 4},
    "VolumeCondition": {"abnormal": 1, "message": 2},
    "NodeGetInfoResponse": {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3},
    "VolumeCapability": {"block": 1, "mount": 2, "access_mode": 3},
    "GetPluginInfoResponse": {"name": 1, "vendor_version": 2, "manifest": 3},
    "ProbeResponse": {"ready": 1},
    "CreateVolumeRequest": {
        "name": 1, "capacity_range": 2, "volume_capabilities": 3, "parameters": 4,
        "secrets": 5, "volume_content_source": 6, "accessibility_requirements": 7,
        "mutable_parameters": 8,
    },
    "Volume": {
        "capacity_bytes": 1, "volume_id": 2, "volume_context": 3, "content_source": 4,
        "accessible_topology": 5,
    },
    "DeleteVolumeRequest": {"volume_id": 1, "secrets": 2},
    "ControllerExpandVolumeRequest": {
        "volume_id": 1, "capacity_range": 2, "secrets": 3, "volume_capability": 4,
    },
    "ControllerExpandVolumeResponse": {"capacity_bytes": 1, "node_expansion_required": 2},
    "CreateSnapshotRequest": {"source_volume_id": 1, "name": 2, "secrets": 3, "parameters": 4},
    "Snapshot": {
        "size_bytes": 1, "snapshot_id": 2, "source_volume_id": 3, "creation_time": 4,
        "ready_to_use": 5, "group_snapshot_id": 6,
    },
    "ListVolumesRequest": {"max_entries": 1, "starting_token": 2},
}  # fmt: skip


def test_field_numbers_are_the_spec_ones() -> None:
    for message, fields in SPEC_FIELDS.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        assert {f.name: f.number for f in descriptor.fields} == fields, message


def test_secret_fields_carry_the_csi_secret_option() -> None:
    for message in (
        "NodeStageVolumeRequest",
        "NodePublishVolumeRequest",
        "CreateVolumeRequest",
        "DeleteVolumeRequest",
        "CreateSnapshotRequest",
        "ControllerExpandVolumeRequest",
    ):
        field = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name["secrets"]
        assert field.GetOptions().Extensions[pb.csi_secret] is True
