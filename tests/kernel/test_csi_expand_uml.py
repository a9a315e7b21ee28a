"""Online expansion through the CSI node plugin in a real kernel (one UML boot,
scenarios_expand.expansion): ext4 and xfs, mounted and under fio --verify, grow after their
export is served larger; a block volume's device grows; the data written before is intact."""

from __future__ import annotations

from typing import Any

import pytest
from nbd_agent.csi._generated import csi_pb2 as pb

from tests.kernel import scenarios_expand
from tests.kernel.uml import assert_steps_ok as ok
from tests.kernel.uml import scenario_results

MiB = 1 << 20


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("expand")
    return scenario_results(
        scenarios_expand.expansion, work, timeout=240, mem="768M", scratch_size="700M"
    )


def test_the_node_advertises_expansion_and_the_scenario_ran_to_the_end(
    run: dict[str, Any],
) -> None:
    assert run["_rc"] == 0, run["_output"]
    assert pb.NodeServiceCapability.RPC.EXPAND_VOLUME in run["node_capabilities"]
    assert run["agent_stop_rc"] == 0
    assert run["devices_at_end"] == []


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_a_mounted_filesystem_grows_online_under_fio_verify(run: dict[str, Any], fs: str) -> None:
    ok(run, f"{fs}_stage", f"{fs}_publish", f"{fs}_write", f"{fs}_expand")
    small, large = scenarios_expand.SIZES[fs]
    assert run[f"{fs}_capacity"] == large
    before, after = run[f"{fs}_fs_bytes_before"], run[f"{fs}_fs_bytes_after"]
    assert before < small and after > before + (large - small) * 9 // 10, (before, after)
    assert run[f"{fs}_fallocate_rc"] == 0
    assert run[f"{fs}_fio_running_during_expand"] is True
    assert run[f"{fs}_fio_rc"] == 0, run[f"{fs}_fio_err"]
    assert run[f"{fs}_fio_error_field"] == "0"
    assert run[f"{fs}_payload_sha_after"] == run[f"{fs}_payload_sha"]
    ok(run, f"{fs}_unpublish", f"{fs}_unstage")


def test_a_block_volume_only_waits_for_its_device_to_grow(run: dict[str, Any]) -> None:
    ok(run, "block_stage", "block_publish", "block_expand", "block_unpublish", "block_unstage")
    assert run["block_capacity"] == scenarios_expand.SIZES["block"][1]
