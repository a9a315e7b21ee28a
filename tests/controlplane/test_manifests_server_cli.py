"""The operator's contract with nbdserver is its command line: every command line the manifest
builders produce must be accepted by nbdserver's own parser and give the intended settings.

(The operator itself never imports nbdserver; this test does, to hold both sides together.)
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest
from nbd_operator import manifests
from nbd_operator.config import OperatorConfig
from nbd_operator.spec import parse_spec

from nbdserver.config import ServerConfig, assemble
from nbdserver.config.flags import build_parser, read_layer

CASES: dict[str, dict[str, Any]] = {
    "memory": {"source": {"memory": {}}, "size": "1Gi"},
    "claim-ro": {
        "source": {"persistentVolumeClaim": {"claimName": "c"}},
        "size": "2Gi",
        "readOnly": True,
        "accessMode": "ReadOnlyMany",
    },
    "block-cow": {
        "source": {"persistentVolumeClaim": {"claimName": "c", "volumeMode": "Block"}},
        "copyOnWrite": True,
    },
    "qcow2": {
        "source": {"persistentVolumeClaim": {"claimName": "c"}},
        "size": "2Gi",
        "format": "qcow2",
    },
    "xz-cow": {
        "source": {"hostDevice": {"nodeName": "n", "path": "/dev/sdb"}},
        "format": "xz",
        "copyOnWrite": True,
    },
    "everything": {
        "source": {"volumeClaimTemplate": {}},
        "size": "4Gi",
        "allowedClients": ["10.0.0.0/8", "fd00::/8"],
        "connections": 8,
        "qos": {
            "readBytesPerSecond": 1000,
            "writeBytesPerSecond": 2000,
            "readIOPS": 3,
            "writeIOPS": 4,
        },
        "tls": {"secretName": "t", "mode": "Optional", "requireClientCertificate": True},
    },
}


def command_line(spec: dict[str, Any], config: OperatorConfig | None = None) -> list[str]:
    body = {"metadata": {"name": "disk", "namespace": "ns", "uid": "u"}, "spec": spec}
    dep = manifests.deployment(parse_spec(body), config or OperatorConfig())
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["nbdserver"]
    return list(container["args"])


@pytest.mark.parametrize("case", CASES)
def test_nbdserver_accepts_every_command_line_the_operator_builds(case: str) -> None:
    args = build_parser().parse_args(command_line(CASES[case]))
    assert args.command == "serve"
    assert args.name == "disk"
    assert args.port == 10809


def test_the_settings_arrive_as_intended() -> None:
    args = build_parser().parse_args(command_line(CASES["everything"]))
    assert args.image == ["/data/disk.img"]
    for case in CASES.values():  # a volume's content never decides how it is served
        wanted = case.get("format", "raw")
        assert build_parser().parse_args(command_line(case)).format == wanted
    assert args.size == str(4 * 2**30)
    assert args.allow == ["10.0.0.0/8", "fd00::/8"]
    assert args.connections == 8
    assert (args.qos_read_bps, args.qos_write_bps, args.qos_read_iops, args.qos_write_iops) == (
        1000,
        2000,
        3,
        4,
    )
    assert (args.tls, args.tls_cert, args.tls_key, args.tls_ca) == (
        "on",
        "/etc/nbd/tls/tls.crt",
        "/etc/nbd/tls/tls.key",
        "/etc/nbd/tls/ca.crt",
    )
    assert args.single_writer is True
    ro = build_parser().parse_args(command_line(CASES["claim-ro"]))
    assert ro.read_only is True and not ro.single_writer and ro.size is None
    cow = build_parser().parse_args(command_line(CASES["block-cow"]))
    assert cow.copy_on_write == "shared" and cow.cow_dir == "/cow"
    assert cow.image == ["/dev/nbd-backing"]


def _assembled(args: argparse.Namespace) -> ServerConfig:
    return assemble(read_layer(args), None)


@pytest.mark.parametrize("case", ["memory", "claim-ro", "block-cow", "qcow2", "xz-cow"])
def test_nbdserver_builds_a_configuration_from_it(case: str) -> None:
    config = _assembled(build_parser().parse_args(command_line(CASES[case])))
    assert config is not None


@pytest.mark.parametrize("case", CASES)
def test_the_metrics_endpoint_arrives_as_intended(case: str) -> None:
    config = OperatorConfig(server_metrics_port=9100, server_metrics_bind="::")
    args = build_parser().parse_args(command_line(CASES[case], config))
    assert (args.metrics_port, args.metrics_bind) == (9100, "::")
    assert _assembled(args) is not None
    plain = build_parser().parse_args(command_line(CASES[case]))
    assert plain.metrics_port is None
