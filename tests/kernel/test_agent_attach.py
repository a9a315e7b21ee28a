"""nbd-agent attaches real servers' exports to a real kernel's /dev/nbdX (owner: agent engineer).

One UML boot (scenarios_agent.attach_matrix) runs every check; the tests below read its record.
"""

from __future__ import annotations

import pytest

from tests.kernel import scenarios_agent
from tests.kernel.guest import load_results
from tests.kernel.uml import run_in_uml


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    result = run_in_uml(
        scenarios_agent.attach_matrix, timeout=150, workdir=tmp_path_factory.mktemp("matrix")
    )
    data = load_results(result.workdir)
    data["_uml"] = result
    return data


def _ok(matrix, key):
    assert key in matrix, matrix["_uml"].check() or f"{key} missing from the record"
    return matrix[key]


@pytest.mark.parametrize("kind", scenarios_agent.SERVER_KINDS)
def test_ext4_on_the_attached_device_lands_in_the_servers_image(matrix, kind):
    out = _ok(matrix, kind)
    assert out["attach_rc"] == 0, out["attach_err"]
    assert out["device"].startswith("/dev/nbd")
    assert out["size"] == 64 << 20  # blockdev --getsize64 is the export's size
    assert (out["mkfs.ext4_rc"], out["mount_rc"], out["umount_rc"]) == (0, 0, 0), out
    assert out["detach_rc"] == 0, out["detach_err"]
    assert out["configured_after_detach"] == []
    # The file written through the kernel is in the image, read back by debugfs on the host side
    # of the protocol (the image file itself), not through the device.
    assert out["image_sha256"] == out["sha256"]


def test_multi_connection_attach_uses_every_connection(matrix):
    out = _ok(matrix, "multi_conn")
    assert out["rc"] == 0, out["err"]
    assert out["established"] == 4  # four TCP connections to the server, held by the kernel
    assert (out["dd_rc"], out["cmp_rc"]) == (0, 0)  # data written through them is in the image
    assert out["detach_rc"] == 0
    assert out["configured_after"] == []


def test_read_only_attach_refuses_writes_and_allows_reads(matrix):
    out = _ok(matrix, "read_only")
    assert out["rc"] == 0, out["err"]
    assert out["getro"] == "1"
    assert out["write_rc"] != 0 and "Operation not permitted" in out["write_err"]
    assert out["read_rc"] == 0
    assert out["detach_rc"] == 0


def test_a_read_only_export_gives_a_read_only_device(matrix):
    out = _ok(matrix, "server_read_only")
    assert (out["rc"], out["getro"], out["detach_rc"]) == (0, "1", 0)


def test_an_export_of_odd_size_attaches_with_the_size_rounded_down(matrix):
    out = _ok(matrix, "odd_size")
    assert out["rc"] == 0, out["err"]
    assert out["export_size"] - 4096 < out["device_size"] <= out["export_size"]
    assert out["device_size"] % 512 == 0
    assert out["detach_rc"] == 0


def test_nbd_unix_uri_attaches_over_a_unix_socket(matrix):
    out = _ok(matrix, "unix_socket")
    assert out["rc"] == 0, out["err"]
    assert (out["dd_rc"], out["cmp_rc"], out["detach_rc"]) == (0, 0, 0)


def test_the_guest_scenario_itself_succeeded(matrix):
    matrix["_uml"].check()
