"""Devices survive server crashes and agent restarts without the consumer seeing an error
(owner: agent engineer). One UML boot (scenarios_agent_reconnect.reconnect) against nbdserver:

1. ``nbd-agent attach --persist`` + fio randwrite with crc32c verify; the server is SIGKILLed
   mid-workload and restarted: fio ends with zero errors and verified data.
2. The agent is SIGKILLed; ``nbd-agent watch`` adopts the device (by its backend identifier);
   the server is killed again under a verifying randrw fio: zero errors again.
3. An nbds:// export (nbdserver --tls require) through the agent's TLS bridge: data written,
   server killed and restarted, data read back through a new TLS session; then the agent is
   killed (its bridge with it) and a new one adopts the device through a new bridge.
4. A four-connection device whose server dies: all four links are replaced.
"""

from __future__ import annotations

import pytest

from tests.kernel import scenarios_agent_reconnect
from tests.kernel.guest import load_results
from tests.kernel.uml import run_in_uml


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    result = run_in_uml(
        scenarios_agent_reconnect.reconnect,
        timeout=180,
        nbds_max=2,
        workdir=tmp_path_factory.mktemp("r"),
    )
    data = load_results(result.workdir)
    data["_uml"] = result
    return data


def _get(data, key):
    assert key in data, data["_uml"].check() or f"{key} missing"
    return data[key]


def test_fio_with_verify_survives_a_server_crash(rec):
    assert _get(rec, "killed_at_written") > 4 << 20  # the crash really hit a running workload
    assert rec["fio1_rc"] == 0
    assert rec["fio1"]["error"] == 0
    assert rec["fio1"]["write_ios"] == rec["fio1"]["read_ios"] > 0  # every block verified
    assert "link dead" in rec["agent1_log"] and "reconnected after" in rec["agent1_log"]
    # The file export told its identity; the reconnect checked it and found the same data.
    assert "&id=file-" in rec["backend"]
    assert "tells no export identity" not in rec["agent1_log"]
    # From the server accepting again to a read completing on the device.
    assert rec["phase1_io_flow_s"] < 5.0


def test_the_device_outlives_the_agent_and_a_new_agent_adopts_it(rec):
    assert _get(rec, "configured_after_agent_death") == [0]
    assert "adopted /dev/nbd0" in rec["agent2_log"]


def test_an_adopted_device_survives_the_next_server_crash(rec):
    assert _get(rec, "fio2_rc") == 0
    assert rec["fio2"]["error"] == 0 and rec["fio2"]["read_ios"] > 0
    assert rec["agent2_log"].count("reconnected after") >= 2  # adoption check + the crash
    assert rec["phase2_io_flow_s"] < 5.0
    assert rec["agent2_rc"] == 0  # SIGTERM ends the daemon cleanly ...
    assert rec["detach_rc"] == 0  # ... and leaves the device attached until detach
    assert rec["configured_at_end"] == []


def test_tls_export_goes_through_the_userspace_bridge_and_survives_a_crash(rec):
    out = _get(rec, "tls")
    assert out["plain_refused"]["rc"] == 1  # the server requires TLS
    assert out["no_persist"]["rc"] == 1 and "--persist" in out["no_persist"]["stderr"]
    assert out["device"].startswith("/dev/nbd")
    assert out["write_rc"] == 0
    assert "reconnected after" in out["log"]
    assert out["read_back_rc"] == 0  # read through a new TLS session after the crash
    # After the agent (and with it the bridge) died, a new agent adopted it with a new bridge.
    assert "adopted /dev/nbd" in out["adoption_log"]
    assert out["read_after_adoption_rc"] == 0
    assert out["detach_rc"] == 0
    assert out["in_image"] is True
    assert out["io_flow_s"] < 5.0


def test_all_connections_of_a_multi_connection_device_come_back(rec):
    out = _get(rec, "multi_conn_reconnect")
    assert out["established_before"] == 4
    assert out["established_after"] == 4
    assert out["write_rc"] == 0 and out["in_image"] is True
    assert out["detach_rc"] == 0
    assert out["io_flow_s"] < 5.0


def test_the_guest_scenario_itself_succeeded(rec):
    rec["_uml"].check()
