"""The security-relevant parts of the rendered chart, stated exactly.

A privileged node agent is only acceptable if everything around it is narrow: one privileged
container, Bidirectional propagation only where mounts must reach the host, RBAC with exactly
the verbs the code uses. These tests pin those facts so that widening any of them is a visible
change to a test, not a side effect of a template edit.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest
from test_chart_render import EVERYTHING_ON, MINIMAL
from test_chart_support import containers, find, pod_spec, render

Rule = tuple[str, str, tuple[str, ...]]  # (apiGroup, resource, sorted verbs)

# From nbd_operator (kube.Kube calls in reconcile.py, the kopf handlers' watches) and kopf.
OPERATOR_NAMESPACED_RULES: set[Rule] = {
    ("nbd.dev", "nbdexports", ("get", "list", "patch", "watch")),
    ("nbd.dev", "nbdexports/status", ("patch",)),
    ("nbd.dev", "nbdexports/finalizers", ("update",)),
    ("apps", "deployments", ("create", "delete", "get", "list", "patch", "watch")),
    ("", "persistentvolumeclaims", ("create", "delete", "get", "list", "patch", "watch")),
    ("", "services", ("create", "delete", "get", "patch")),
    ("networking.k8s.io", "networkpolicies", ("create", "delete", "get", "patch")),
    ("", "secrets", ("get",)),
    # list/watch: status.attachments; delete: Leases whose holder node no longer exists.
    ("coordination.k8s.io", "leases", ("delete", "list", "watch")),
    ("", "events", ("create",)),
    # An image import: its Job, and the progress lines in its pod's log.
    ("batch", "jobs", ("create", "delete", "get", "list", "patch", "watch")),
    ("", "pods", ("list",)),
    ("", "pods/log", ("get",)),
}
OPERATOR_CLUSTER_RULES: set[Rule] = {
    # get: hostDevice nodes and Lease holders exist; list/watch: a Node deletion frees Leases.
    ("", "nodes", ("get", "list", "watch")),
    ("apiextensions.k8s.io", "customresourcedefinitions", ("list", "watch")),
}
# From nbd_agent.csi.kube.ClusterAccess: GET an export; GET/POST/PATCH/DELETE Leases; POST
# an Event on an export whose data changed under a device.
AGENT_RULES: set[Rule] = {
    ("nbd.dev", "nbdexports", ("get",)),
    ("coordination.k8s.io", "leases", ("create", "delete", "get", "patch")),
    ("", "events", ("create",)),
}


def _rules(role: dict[str, Any]) -> set[Rule]:
    out: set[Rule] = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule or role["kind"] == "Role", rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.add((group, resource, tuple(sorted(rule["verbs"]))))
    return out


def _all_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for o in objects if o["kind"] in {"Role", "ClusterRole"} for r in o["rules"]]


def test_only_the_agent_container_is_privileged() -> None:
    privileged = [
        (o["kind"], c["name"])
        for o in render(EVERYTHING_ON)
        if o["kind"] in {"Deployment", "DaemonSet"}
        for c in containers(o)
        if c.get("securityContext", {}).get("privileged")
    ]
    assert privileged == [("DaemonSet", "agent")]


def test_the_module_loader_gets_sys_module_and_nothing_else() -> None:
    daemonset = find(render(), "DaemonSet")
    (init,) = pod_spec(daemonset)["initContainers"]
    assert init["command"] == ["modprobe", "nbd", "nbds_max=16"]
    sc = init["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["SYS_MODULE"]}
    assert init["volumeMounts"] == [
        {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}
    ]


def test_nbds_max_is_configurable_and_loading_can_be_switched_off() -> None:
    spec = pod_spec(find(render({"agent": {"nbdModule": {"nbdsMax": 128}}}), "DaemonSet"))
    assert spec["initContainers"][0]["command"][-1] == "nbds_max=128"
    spec = pod_spec(find(render({"agent": {"nbdModule": {"load": False}}}), "DaemonSet"))
    assert "initContainers" not in spec


def test_sidecars_drop_every_capability_and_cannot_escalate() -> None:
    for c in pod_spec(find(render(), "DaemonSet"))["containers"]:
        if c["name"] == "agent":
            continue
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True


def test_the_operator_runs_unprivileged_as_the_images_non_root_user() -> None:
    spec = pod_spec(find(render(), "Deployment", "-operator"))
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = spec["containers"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert "hostNetwork" not in spec and not any("hostPath" in v for v in spec["volumes"])


@pytest.mark.parametrize(
    "kubelet_dir", ["/var/lib/kubelet", "/var/snap/microk8s/common/var/lib/kubelet/"]
)
def test_only_the_kubelet_dir_propagates_mounts_back_to_the_host(kubelet_dir: str) -> None:
    daemonset = find(render({"agent": {"kubeletDir": kubelet_dir}}), "DaemonSet")
    expected = kubelet_dir.rstrip("/")
    propagation = {
        (c["name"], m["mountPath"]): m.get("mountPropagation", "None")
        for c in containers(daemonset)
        for m in c.get("volumeMounts", [])
        if m.get("mountPropagation")
    }
    assert propagation == {
        ("agent", expected): "Bidirectional",
        ("agent", "/dev"): "HostToContainer",
    }
    volumes = {v["name"]: v for v in pod_spec(daemonset)["volumes"]}
    assert volumes["kubelet-dir"]["hostPath"]["path"] == expected
    assert volumes["plugin-dir"]["hostPath"]["path"] == f"{expected}/plugins/nbd.dev"
    assert volumes["registration-dir"]["hostPath"]["path"] == f"{expected}/plugins_registry"
    registrar = next(c for c in containers(daemonset) if c["name"] == "node-driver-registrar")
    assert f"--kubelet-registration-path={expected}/plugins/nbd.dev/csi.sock" in registrar["args"]


def test_the_agent_sees_the_host_devices_sysfs_and_modules() -> None:
    daemonset = find(render(), "DaemonSet")
    agent = next(c for c in containers(daemonset) if c["name"] == "agent")
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert {"/dev", "/sys", "/lib/modules", "/csi", "/var/lib/kube-nbd"} <= set(mounts)
    assert mounts["/lib/modules"]["readOnly"] is True
    hostpaths = {v["hostPath"]["path"] for v in pod_spec(daemonset)["volumes"] if "hostPath" in v}
    assert {"/dev", "/sys", "/lib/modules", "/var/lib/kube-nbd"} <= hostpaths


def test_the_agent_tolerates_every_taint_by_default_and_sidecar_images_are_configurable() -> None:
    spec = pod_spec(find(render(), "DaemonSet"))
    assert spec["tolerations"] == [{"operator": "Exists"}]
    custom = render(
        {
            "agent": {
                "registrar": {"image": {"repository": "mirror/registrar", "tag": "v9"}},
                "livenessProbe": {"image": {"repository": "mirror/probe", "tag": "v8"}},
            }
        }
    )
    images = {c["name"]: c["image"] for c in containers(find(custom, "DaemonSet"))}
    assert images["node-driver-registrar"] == "mirror/registrar:v9"
    assert images["liveness-probe"] == "mirror/probe:v8"


def test_host_network_comes_with_cluster_dns_and_can_be_switched_off() -> None:
    spec = pod_spec(find(render(), "DaemonSet"))
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    spec = pod_spec(find(render({"agent": {"hostNetwork": False}}), "DaemonSet"))
    assert "hostNetwork" not in spec and "dnsPolicy" not in spec


def test_operator_rbac_is_exactly_what_the_operator_uses() -> None:
    objects = render()
    role = find(objects, "ClusterRole", "-operator")
    assert _rules(role) == OPERATOR_NAMESPACED_RULES | OPERATOR_CLUSTER_RULES
    binding = find(objects, "ClusterRoleBinding", "-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nbd-kube-nbd-operator", "namespace": "kube-nbd"}
    ]


def test_agent_rbac_reads_exports_and_writes_only_leases() -> None:
    objects = render()
    assert _rules(find(objects, "ClusterRole", "-agent")) == AGENT_RULES
    binding = find(objects, "ClusterRoleBinding", "-agent")
    assert binding["subjects"][0]["name"] == "nbd-kube-nbd-agent"


def test_no_role_uses_wildcards_or_reads_secrets_in_bulk() -> None:
    for rule in _all_rules(render(EVERYTHING_ON)):
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], rule


def test_watching_namespaces_narrows_the_operator_to_roles_in_them() -> None:
    objects = render(EVERYTHING_ON)
    cluster_role = find(objects, "ClusterRole", "-operator")
    namespaces: Rule = ("", "namespaces", ("list", "watch"))
    assert _rules(cluster_role) == OPERATOR_CLUSTER_RULES | {namespaces}
    roles = [
        o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-operator")
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["apps", "db"]
    assert all(_rules(r) == OPERATOR_NAMESPACED_RULES for r in roles)
    bindings = [
        o
        for o in objects
        if o["kind"] == "RoleBinding" and o["metadata"]["name"].endswith("-operator")
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["apps", "db"]
    assert all(b["subjects"][0]["namespace"] == "kube-nbd" for b in bindings)
    args = pod_spec(find(objects, "Deployment", "-operator"))["containers"][0]["args"]
    assert "--namespace=apps" in args and "--namespace=db" in args


def test_several_operators_only_with_leader_election() -> None:
    deployment = find(render(), "Deployment", "-operator")
    assert deployment["spec"]["replicas"] == 1
    # The new pod starts beside the old one and waits for the Lease.
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert (
        find(render({"operator": {"replicas": 3}}), "Deployment", "-operator")["spec"]["replicas"]
        == 3
    )
    assert (
        find(render({"operator": {"replicas": 0}}), "Deployment", "-operator")["spec"]["replicas"]
        == 0
    )
    single = {"operator": {"leaderElection": {"enabled": False}}}
    deployment = find(render(single), "Deployment", "-operator")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in pod_spec(deployment)["containers"][0]["args"]
    assert not [o for o in render(single) if o["metadata"]["name"].endswith("-leader")]
    with pytest.raises(helm.HelmRenderError, match="leaderElection"):
        render({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}})
    with pytest.raises(helm.HelmValuesError, match="replicas"):
        render({"operator": {"replicas": -1}})


def test_the_leader_role_grants_only_its_own_lease() -> None:
    objects = render()
    role = find(objects, "Role", "-operator-leader")
    assert role["metadata"]["namespace"] == "kube-nbd"
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["nbd-kube-nbd-operator"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = find(objects, "RoleBinding", "-operator-leader")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "nbd-kube-nbd-operator"


def test_without_rbac_creation_no_role_or_binding_is_rendered() -> None:
    kinds = {o["kind"] for o in render(MINIMAL)}
    assert not kinds & {
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "ServiceAccount",
    }
    assert (
        pod_spec(find(render(MINIMAL), "Deployment", "-operator"))["serviceAccountName"]
        == "byo-operator"
    )
