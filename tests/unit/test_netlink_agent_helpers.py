"""Pure helpers around the agent's netlink use: backend identifiers, device names, what the
kernel is told about an export, and the CLI's dispatch (owner: agent engineer)."""

from __future__ import annotations

import pytest
from nbd_agent import attach, cli, devices, handshake
from nbd_agent.devices import Backend
from nbd_agent.errors import DataChanged, DeviceNotFound, ExportChanged, UsageError
from nbd_agent.handshake import ExportInfo

from nbdserver.protocol.constants import TransmissionFlag as TF


@pytest.mark.parametrize(
    "backend",
    [
        Backend("nbd://server.ns.svc:10809/disk", 1, False),
        Backend("nbd+unix:///e%2Fx?socket=/run/a&b.sock", 4, True),
        Backend("nbds://h/e?tls-certificates=/etc/x&tls-verify-peer=0", 2, False),
    ],
)
def test_backend_identifier_round_trips(backend):
    ident = backend.identifier()
    assert ident.startswith("kube-nbd:")
    assert "\n" not in ident and "\0" not in ident
    assert Backend.parse(ident) == backend


@pytest.mark.parametrize("foreign", ["", "qemu:/img", "kube-nbd:", "kube-nbd:c=x&ro=0&uri=a"])
def test_identifiers_of_others_are_not_adopted(foreign):
    assert Backend.parse(foreign) is None


@pytest.mark.parametrize(("name", "index"), [("/dev/nbd3", 3), ("nbd12", 12), ("0", 0)])
def test_device_names(name, index):
    assert devices.device_index(name) == index


@pytest.mark.parametrize("name", ["/dev/sda", "/dev/nbd", "nbd-1", "/dev/nbd0p1"])
def test_other_devices_are_refused(name):
    with pytest.raises(DeviceNotFound):
        devices.device_index(name)


@pytest.mark.parametrize(
    ("preferred", "kernel"), [(512, 512), (4096, 4096), (1, None), (65536, None), (3000, None)]
)
def test_only_block_sizes_the_kernel_accepts_are_passed(preferred, kernel):
    assert handshake.kernel_block_size(preferred) == kernel


def test_kernel_flags_add_read_only_when_asked():
    info = ExportInfo(
        size=1 << 20, flags=TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_FLUSH, block_size=None
    )
    assert attach.kernel_flags(info, False) == TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_FLUSH
    assert attach.kernel_flags(info, True) & TF.NBD_FLAG_READ_ONLY


def test_a_reconnect_refuses_an_export_that_shrank_or_became_read_only_and_accepts_growth():
    target = handshake.parse_uri("nbd://h/e")
    before = ExportInfo(size=10 << 20, flags=0, block_size=None)
    attach.check_unchanged(before, ExportInfo(10 << 20, TF.NBD_FLAG_SEND_FLUSH, 512), target)
    grown = ExportInfo(11 << 20, 0, None)
    attach.check_unchanged(before, grown, target)
    assert attach.grew(before, grown) and not attach.grew(before, before)
    with pytest.raises(DataChanged, match="shrank"):
        attach.check_unchanged(before, ExportInfo(9 << 20, 0, None), target)
    with pytest.raises(ExportChanged, match="read-only"):
        attach.check_unchanged(before, ExportInfo(10 << 20, TF.NBD_FLAG_READ_ONLY, None), target)


def test_a_reconnect_refuses_a_server_that_lost_a_command_the_kernel_sends():
    target = handshake.parse_uri("nbd://h/e")
    before = ExportInfo(1 << 20, TF.NBD_FLAG_SEND_FLUSH | TF.NBD_FLAG_SEND_TRIM, None)
    with pytest.raises(ExportChanged, match="NBD_FLAG_SEND_TRIM"):
        attach.check_unchanged(before, ExportInfo(1 << 20, TF.NBD_FLAG_SEND_FLUSH, None), target)


def test_adopted_sizes_compare_with_the_kernels_rounding():
    # sysfs shows whole sectors (older kernels: whole blocks); the server tells bytes.
    target = handshake.parse_uri("nbd://h/e")
    adopted = ExportInfo(1 << 20, 0, None, from_sysfs=True)
    same = ExportInfo((1 << 20) + 1000, 0, None)
    attach.check_unchanged(adopted, same, target)
    assert not attach.grew(adopted, same)
    assert attach.grew(adopted, ExportInfo((1 << 20) + 8192, 0, None))
    with pytest.raises(DataChanged):
        attach.check_unchanged(adopted, ExportInfo((1 << 20) - 512, 0, None), target)


@pytest.mark.parametrize("uri", ["http://h/e", "nbd:///e", "nbd+unix:///e", "nbd://h/e?x=1"])
def test_bad_uris_are_usage_errors(uri):
    with pytest.raises(UsageError):
        handshake.parse_uri(uri)


def test_cli_has_every_subcommand_and_attach_options():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            *("attach", "nbd://h/e", "--device", "/dev/nbd2", "--connections", "4"),
            *("--read-only", "--timeout", "30", "--dead-conn-timeout", "60", "--persist"),
        ]
    )
    assert (args.device, args.connections, args.read_only) == ("/dev/nbd2", 4, True)
    assert (args.timeout, args.dead_conn_timeout, args.persist) == (30, 60, True)
    for command in ("detach /dev/nbd0", "list", "watch"):
        assert parser.parse_args(command.split()).func


def test_cli_reports_bad_input_in_one_line_without_touching_the_kernel(capsys):
    assert cli.main(["attach", "http://example/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nbd-agent: not a usable NBD URI") and "Traceback" not in err


def test_a_subcommand_whose_module_is_missing_does_not_break_the_others(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "csi", "nbd_agent.no_such_module:add_parser")
    parser = cli.build_parser()
    assert parser.parse_args(["list"]).func
    assert cli.main(["csi"]) == 2
    assert "unavailable" in capsys.readouterr().err


def test_a_plain_command_does_not_import_the_csi_plugin():
    # Start-up time of `nbd-agent attach` matters (measured in bench/agent_attach.py).
    import subprocess
    import sys

    code = (
        "import sys; from nbd_agent import cli; cli.build_parser(only='attach'); "
        "print(any(m.startswith(('grpc', 'nbd_agent.csi')) for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
