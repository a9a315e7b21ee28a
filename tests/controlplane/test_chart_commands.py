"""The command lines and environment the chart gives each container are what the code accepts.

A flag the program does not know crashes the pod at start (argparse exits 2): a class of bug no
schema catches. So the rendered args are fed to the real argument parsers of nbd-operator and
nbd-agent, and the operator's environment to its real configuration reader.
"""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from nbd_operator.cli import parse_args as operator_args
from nbd_operator.config import OperatorConfig
from test_chart_render import EVERYTHING_ON
from test_chart_support import ROOT, containers, find, render


def _container(values: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
    return next(c for c in containers(find(render(values), kind)) if c["name"] == name)


def test_every_command_is_a_console_script_of_the_image() -> None:
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    commands = {
        c["command"][0]
        for o in render()
        if o["kind"] in {"Deployment", "DaemonSet"}
        for c in containers(o)
        if c["image"].startswith("ghcr.io/kube-nbd/")
    }
    assert commands == {"nbd-operator", "nbd-agent", "modprobe"}
    assert commands - {"modprobe"} <= scripts


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_the_operator_accepts_its_rendered_arguments(values: dict[str, Any]) -> None:
    container = _container(values, "Deployment", "operator")
    assert container["command"] == ["nbd-operator"]
    args = operator_args(container["args"])
    watched = values.get("operator", {}).get("watchNamespaces", [])
    assert args.namespace == watched
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    port = container["livenessProbe"]["httpGet"]["port"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}[port] == 8080
    assert args.verbose is bool(values.get("operator", {}).get("verbose"))


def test_the_operator_reads_the_server_image_and_pull_policy_the_chart_sets() -> None:
    values = {"image": {"pullPolicy": "Never", "tag": "dev"}}
    container = _container(values, "Deployment", "operator")
    env = {e["name"]: e["value"] for e in container["env"]}
    config = OperatorConfig.from_env(env)
    assert config.server_image == "ghcr.io/kube-nbd/kube-nbd:dev"
    assert config.image_pull_policy == "Never"
    container = _container({"operator": {"serverImage": "mirror/nbd:1"}}, "Deployment", "operator")
    env = {e["name"]: e["value"] for e in container["env"]}
    assert OperatorConfig.from_env(env).server_image == "mirror/nbd:1"
