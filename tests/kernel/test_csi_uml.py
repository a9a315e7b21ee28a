"""The CSI node plugin on a real kernel (UML, nbd.ko) against a real nbdserver, driven over its
unix socket like kubelet; the scenario is tests/kernel/csi_scenarios.py:lifecycle (one boot)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.kernel import csi_scenarios
from tests.kernel.uml import assert_steps_ok as ok
from tests.kernel.uml import scenario_results


@pytest.fixture(scope="module")
def csi_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("csi-uml")
    return scenario_results(
        csi_scenarios.lifecycle, work, timeout=150, mem="512M", scratch_size="200M"
    )


def test_scenario_ran_to_the_end(csi_run: dict[str, Any]) -> None:
    assert csi_run["_rc"] == 0, csi_run["_output"]
    assert csi_run["probe_ready"] is True
    assert csi_run["agent_stop_rc"] == 0
    assert csi_run["devices_at_end"] == []


def test_stage_publish_write_unpublish_unstage_detaches(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "stage1", "stage1_again", "publish1", "write", "unpublish1", "unstage1")
    assert len(csi_run["devices_after_stage"]) == 1
    assert csi_run["condition_healthy"]["value"][0] is False
    assert csi_run["devices_after_unstage"] == []
    assert csi_run["target_exists_after_unpublish"] is False


def test_restage_after_agent_restart_keeps_the_data(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "stage2", "publish2_after_restart", "sha_after_restage")
    assert csi_run["sha_after_restage"]["value"] == csi_run["payload_sha"]


def test_server_restart_while_published_causes_no_io_error(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "condition_while_down", "condition_after_return", "read_after_server_restart")
    abnormal, message = csi_run["condition_while_down"]["value"]
    assert abnormal is True and "down" in message
    assert csi_run["writer_running_while_down"] is True
    assert csi_run["writer_rc"] == 0, csi_run["writer_err"]
    assert csi_run["during_sha_after"]["value"] == csi_run["during_sha"]
    assert csi_run["read_after_server_restart"]["value"] == csi_run["payload_sha"]
    assert "I/O error" not in csi_run["_console"]
    ok(csi_run, "unpublish2", "unstage2")


def test_reader_only_volume_is_read_only_all_the_way_down(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "ro_stage", "ro_publish", "ro_read", "ro_unpublish", "ro_unstage")
    assert csi_run["ro_device_flags"] == ["1"]
    assert csi_run["ro_read"]["value"] == csi_run["payload_sha"]
    assert csi_run["ro_write"]["ok"] is False
    assert "Read-only" in csi_run["ro_write"]["error"]


def test_block_volume_publishes_the_raw_device(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "blk_stage", "blk_publish", "blk_write", "blk_unpublish", "blk_unstage")
    assert csi_run["blk_write"]["value"] is True  # the target is a block device node
    ok(csi_run, "blk_publish_ro", "blk_unpublish_ro", "blk_publish_rw_again")
    assert csi_run["blk_write_ro"]["ok"] is False, "a readonly block publish took a write"
    assert csi_run["blk_ro_write_absent"] is True
    ok(csi_run, "blk_write_rw_again", "blk_unpublish_rw_again")
    assert csi_run["blk_pattern_in_image"] is True
    assert "TYPE=" not in csi_run["blk_blkid"]


def test_dirty_device_is_never_formatted_and_not_left_attached(csi_run: dict[str, Any]) -> None:
    assert csi_run["dirty_stage"]["ok"] is False
    assert csi_run["dirty_stage"]["code"] == "FAILED_PRECONDITION"
    assert "refusing to format" in csi_run["dirty_stage"]["details"]
    assert csi_run["dirty_unchanged"] is True
    assert csi_run["devices_after_dirty"] == []


def test_tls_export_is_staged_through_the_userspace_bridge(csi_run: dict[str, Any]) -> None:
    ok(csi_run, "tls_stage", "tls_publish", "tls_write", "tls_unpublish", "tls_unstage")
    ok(csi_run, "tls_restage", "tls_republish", "tls_read", "tls_unpublish2", "tls_unstage2")
    assert csi_run["tls_data_back"] is True
