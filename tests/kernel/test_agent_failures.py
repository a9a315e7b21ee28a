"""Every attach failure is one clear error and leaves no device configured (owner: agent
engineer). Two UML boots: one with nbd.ko and two devices, one without the module."""

from __future__ import annotations

import pytest

from tests.kernel import scenarios_agent
from tests.kernel.guest import load_results
from tests.kernel.uml import run_in_uml


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    result = run_in_uml(
        scenarios_agent.failures, timeout=120, nbds_max=2, workdir=tmp_path_factory.mktemp("f")
    )
    data = load_results(result.workdir)
    data["_uml"] = result
    return data


@pytest.fixture(scope="module")
def no_module(tmp_path_factory):
    result = run_in_uml(
        scenarios_agent.no_module, timeout=60, load_nbd=False, workdir=tmp_path_factory.mktemp("m")
    )
    data = load_results(result.workdir)
    data["_uml"] = result
    return data


def _case(data, key):
    assert key in data, data["_uml"].check() or f"{key} missing"
    return data[key]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unreachable", "cannot reach 127.0.0.1:"),
        ("unknown_export", "export 'nope': the server has no such export"),
        ("no_such_device", "/dev/nbd7 does not exist"),
        ("bad_uri", "not a usable NBD URI"),
        ("multi_conn_refused", "does not advertise NBD_FLAG_CAN_MULTI_CONN"),
    ],
)
def test_failed_attach_is_a_clear_error_and_configures_nothing(failures, case, message):
    out = _case(failures, case)
    assert out["rc"] == 1
    assert out["stdout"] == ""  # no device is printed
    assert out["stderr"].startswith("nbd-agent: ") and message in out["stderr"], out["stderr"]
    assert "Traceback" not in out["stderr"]
    assert out["configured"] == []


def test_a_busy_device_is_refused_and_left_untouched(failures):
    assert _case(failures, "first")["rc"] == 0
    out = _case(failures, "device_busy")
    assert out["rc"] == 1 and "/dev/nbd0 is already in use" in out["stderr"]
    assert out["configured"] == [0]  # only the first attachment
    assert failures["busy_device_still_works"] is True


def test_no_free_device_is_refused_without_touching_the_others(failures):
    assert _case(failures, "second")["dev"] == "/dev/nbd1"
    out = _case(failures, "no_free_device")
    assert out["rc"] == 1 and "no free nbd device" in out["stderr"]
    assert out["configured"] == [0, 1]


def test_detach_refuses_a_mounted_device_then_works_after_umount(failures):
    out = _case(failures, "detach_mounted")
    assert out["rc"] == 1 and "mounted on" in out["stderr"]
    assert failures["detach_after_umount_rc"] == 0
    assert failures["detach_second_rc"] == 0
    assert "is not attached" in failures["detach_again"]
    assert failures["configured_at_end"] == []


def test_missing_module_is_named_and_nothing_is_left_behind(no_module):
    out = _case(no_module, "attach")
    assert out["rc"] == 1 and out["stdout"] == ""
    assert "no 'nbd' generic netlink family" in out["stderr"]
    assert "modprobe nbd" in out["stderr"]
    assert _case(no_module, "list")["rc"] == 1
    assert no_module["nbd_in_sys_block"] == []
    assert no_module["server_connections"] == 0


def test_the_guest_scenarios_themselves_succeeded(failures, no_module):
    failures["_uml"].check()
    no_module["_uml"].check()
