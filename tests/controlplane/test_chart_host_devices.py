"""The chart's host-device switch: off by default (nothing on a node is offered, RBAC and the
CSIDriver as before); on, the node plugins get exactly the allowlist and publish it, the
controller gets --host-devices, the provisioner topology and capacity tracking with the RBAC
and environment they need, and every flag is one the real command lines accept."""

from __future__ import annotations

import argparse
from typing import Any

import helm_python as helm
import pytest
from nbd_agent.csi import cli as node_cli
from nbd_agent.csi import controller_cli
from test_chart_controller import CONTROLLER_CLUSTER, CONTROLLER_NAMESPACED
from test_chart_security import _rules
from test_chart_support import (
    KUBE_VERSIONS,
    containers,
    find,
    k8s_errors,
    render,
    validate_values,
)

PATHS = ["/dev/disk/by-id/nvme-Acme_*", "/dev/sd[b-d]"]
ON = {"hostDevices": {"enabled": True, "paths": PATHS}}
TOPOLOGY_CLUSTER = {
    ("", "nodes", ("get", "list", "watch")),
    ("storage.k8s.io", "csinodes", ("get", "list", "watch")),
}
CLAIMS = ("coordination.k8s.io", "leases", ("create", "delete", "get", "list", "patch"))
CAPACITY_NAMESPACED = {
    (
        "storage.k8s.io",
        "csistoragecapacities",
        ("create", "delete", "get", "list", "patch", "update", "watch"),
    ),
    ("apps", "replicasets", ("get",)),
}


def container(objects: list[dict[str, Any]], kind: str, suffix: str, name: str) -> dict[str, Any]:
    return next(c for c in containers(find(objects, kind, suffix)) if c["name"] == name)


def env_names(c: dict[str, Any]) -> set[str]:
    return {e["name"] for e in c.get("env", [])}


def parse(add_arguments: Any, args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(args)


def test_off_by_default_nothing_is_offered_and_nothing_more_is_granted() -> None:
    objects = render()
    agent = container(objects, "DaemonSet", "-agent", "agent")
    assert not any(a.startswith("--host-device") for a in agent["args"])
    assert (
        "--host-devices"
        not in container(objects, "Deployment", "-controller", "controller")["args"]
    )
    provisioner = container(objects, "Deployment", "-controller", "csi-provisioner")
    assert "--enable-capacity" not in provisioner["args"]
    assert find(objects, "CSIDriver")["spec"]["storageCapacity"] is False


def test_on_the_agent_publishes_exactly_the_allowlist() -> None:
    agent = container(render(ON), "DaemonSet", "-agent", "agent")
    assert "POD_NAMESPACE" in env_names(agent)
    args = parse(node_cli.add_arguments, agent["args"][1:])  # args[0] is the subcommand
    assert args.host_device == PATHS
    assert args.host_device_interval == 30


def test_on_the_controller_gets_host_devices_topology_and_capacity_tracking() -> None:
    objects = render(ON)
    controller = container(objects, "Deployment", "-controller", "controller")
    assert parse(controller_cli.add_arguments, controller["args"][1:]).host_devices is True
    provisioner = container(objects, "Deployment", "-controller", "csi-provisioner")
    for flag in (
        "--feature-gates=Topology=true",
        "--enable-capacity",
        "--capacity-ownerref-level=2",
    ):
        assert flag in provisioner["args"]
    assert {"NAMESPACE", "POD_NAME"} <= env_names(provisioner)
    assert find(objects, "CSIDriver")["spec"]["storageCapacity"] is True
    cluster = _rules(find(objects, "ClusterRole", "-controller"))
    assert cluster == CONTROLLER_CLUSTER | TOPOLOGY_CLUSTER
    role = _rules(find(objects, "Role", "-controller"))
    assert role == CONTROLLER_NAMESPACED | {CLAIMS} | CAPACITY_NAMESPACED
    for version in KUBE_VERSIONS:
        for obj in objects:
            if obj["kind"] not in {"VolumeSnapshotClass", "PodMonitor"}:
                assert k8s_errors(obj, version) == []


def test_capacity_tracking_can_be_left_off_and_gates_combine() -> None:
    values = {
        "hostDevices": {"enabled": True, "paths": PATHS, "capacityTracking": False},
        "controller": {"volumeAttributesClass": {"enabled": True}},
    }
    objects = render(values)
    provisioner = container(objects, "Deployment", "-controller", "csi-provisioner")
    assert "--feature-gates=Topology=true,VolumeAttributesClass=true" in provisioner["args"]
    assert "--enable-capacity" not in provisioner["args"]
    assert not {"NAMESPACE", "POD_NAME"} & env_names(provisioner)
    resizer = container(objects, "Deployment", "-controller", "csi-resizer")
    assert "--feature-gates=VolumeAttributesClass=true" in resizer["args"]
    assert find(objects, "CSIDriver")["spec"]["storageCapacity"] is False
    assert _rules(find(objects, "Role", "-controller")) == CONTROLLER_NAMESPACED | {CLAIMS}


def test_an_empty_allowlist_or_no_controller_is_refused() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"hostDevices\.paths"):
        render({"hostDevices": {"enabled": True}})
    with pytest.raises(helm.HelmRenderError, match=r"controller\.enabled"):
        render({**ON, "controller": {"enabled": False}})


@pytest.mark.parametrize("path", ["/etc/*", "sdb", "/dev/sd b", "/dev/$(x)"])
def test_the_schema_takes_device_globs_under_dev_only(path: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="paths"):
        render({"hostDevices": {"enabled": True, "paths": [path]}})
    validate_values(ON)
