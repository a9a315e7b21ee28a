"""Per-volume locks (ABORTED on a busy volume, never a global lock) and the interceptor's secret
stripping, which reads the proto's csi_secret option rather than a list of field names."""

from __future__ import annotations

import pytest
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.errors import Aborted
from nbd_agent.csi.locks import VolumeLocks
from nbd_agent.csi.server import REDACTED, strip_secrets


def test_a_busy_volume_aborts_a_second_call_and_other_volumes_proceed() -> None:
    locks = VolumeLocks()
    with locks.hold("vol-a"):
        with pytest.raises(Aborted, match="vol-a"), locks.hold("vol-a"):
            pass
        with locks.hold("vol-b"):
            assert list(locks.busy()) == ["vol-a", "vol-b"]
    assert list(locks.busy()) == []
    with locks.hold("vol-a"):  # released on exit, also after the Aborted above
        pass


def test_taking_several_keys_is_all_or_nothing() -> None:
    locks = VolumeLocks()
    with locks.hold("b"):
        with pytest.raises(Aborted), locks.hold("a", "b"):
            pass
        assert list(locks.busy()) == ["b"]


def test_secret_maps_are_redacted_everywhere_and_the_original_is_untouched() -> None:
    stage = pb.NodeStageVolumeRequest(
        volume_id="v", secrets={"password": "hunter2", "key": "k"}, volume_context={"a": "b"}
    )
    clean = strip_secrets(stage)
    assert dict(clean.secrets) == {"password": REDACTED, "key": REDACTED}
    assert dict(clean.volume_context) == {"a": "b"} and clean.volume_id == "v"
    assert stage.secrets["password"] == "hunter2"
    for message in (
        pb.NodePublishVolumeRequest(secrets={"s": "x"}),
        pb.NodeExpandVolumeRequest(secrets={"s": "x"}),
    ):
        assert "x" not in str(strip_secrets(message)).replace(REDACTED, "")
