"""Never reattach a consumer to different data, in a real kernel (one UML boot,
scenarios_identity.identity): a restarted memory export under a mounted ext4 is refused and the
device fails its reads instead of reading zeros; a persistent clone's writes survive its
server's restart; a grown export grows the attached device; the CSI volume condition turns
abnormal. (A file export restarted under fio --verify with zero errors is
test_agent_reconnect.py's first test, identity checked.)
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.kernel import scenarios_identity
from tests.kernel.guest import load_results
from tests.kernel.uml import run_in_uml


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = run_in_uml(
        scenarios_identity.identity, timeout=180, nbds_max=2, workdir=tmp_path_factory.mktemp("id")
    )
    data = load_results(result.workdir)
    data["_uml"] = result
    return data


def _get(data: dict[str, Any], key: str) -> Any:
    assert key in data, data["_uml"].check() or f"{key} missing"
    return data[key]


def test_a_restarted_memory_export_under_ext4_fails_reads_and_never_reads_zeros(
    run: dict[str, Any],
) -> None:
    mem = _get(run, "memory")
    assert mem["mkfs_rc"] == 0 and mem["mount_rc"] == 0 and mem["block"]
    assert "identity changed from mem-" in mem["log"] and "not reattaching" in mem["log"]
    assert mem["cat_rc"] != 0 and not mem["cat_read_zeros"] and not mem["cat_read_data"]
    assert mem["dd_rc"] != 0 and not mem["dd_read_zeros"]
    assert "Input/output error" in mem["dd_stderr"]
    assert mem["agent_rc"] == 0


def test_a_persistent_clone_keeps_its_writes_across_a_server_restart(run: dict[str, Any]) -> None:
    clone = _get(run, "clone")
    assert clone["write_rc"] == 0 and clone["read_rc"] == 0
    assert clone["writes_still_there"] and clone["base_untouched"]
    assert "reconnected after" in clone["log"] and "not reattaching" not in clone["log"]
    assert clone["detach_rc"] == 0


def test_a_grown_export_grows_the_attached_device(run: dict[str, Any]) -> None:
    grown = _get(run, "grown")
    assert grown["size_before"] == 32 << 20 and grown["size_after"] == 48 << 20
    assert "device resized" in grown["log"]
    assert grown["tail_write_rc"] == 0 and grown["tail_in_image"]
    assert grown["detach_rc"] == 0


def test_the_csi_volume_condition_turns_abnormal_with_the_reason(run: dict[str, Any]) -> None:
    csi = _get(run, "csi")
    assert csi["identity"].startswith("mem-")
    assert csi["before"]["abnormal"] is False
    assert csi["after"]["abnormal"] is True
    assert "not reattached" in csi["after"]["message"]
    assert "identity changed" in csi["after"]["message"]
    assert [device for device, _ in csi["reported"]] == ["/dev/nbd0"]
    assert csi["dd_rc"] != 0 or csi["dd_bytes"] == 0  # fails, or (nothing holds it) is gone


def test_the_guest_scenario_itself_succeeded(run: dict[str, Any]) -> None:
    run["_uml"].check()
