"""The chart's CSI controller: a Deployment with the pinned external-provisioner and
external-resizer sidecars, RBAC that is exactly what the three containers use (NBDExports only
in the release namespace), and a StorageClass that provisions through it."""

from __future__ import annotations

import re
from typing import Any

import helm_python as helm
import pytest
from nbd_agent.csi import provision
from test_chart_render import EVERYTHING_ON
from test_chart_security import _rules
from test_chart_support import containers, find, pod_spec, render, render_manifests

from tests.controlplane.controller_harness import create_request

# nbd_agent.csi.kube.ExportStore's verbs, and client-go leader election's.
CONTROLLER_NAMESPACED = {
    ("nbd.dev", "nbdexports", ("create", "delete", "get", "list", "patch")),
    ("coordination.k8s.io", "leases", ("create", "get", "update")),
}
# external-provisioner (PVs, claims, classes, attachments, events) and external-resizer
# (PV capacity, claim status, pods for "in use", events).
CONTROLLER_CLUSTER = {
    ("", "persistentvolumes", ("create", "delete", "get", "list", "patch", "watch")),
    ("", "persistentvolumeclaims", ("get", "list", "update", "watch")),
    ("", "persistentvolumeclaims/status", ("patch",)),
    ("storage.k8s.io", "storageclasses", ("get", "list", "watch")),
    ("storage.k8s.io", "volumeattachments", ("get", "list", "watch")),
    ("", "pods", ("get", "list", "watch")),
    ("", "events", ("create", "list", "patch", "update", "watch")),
}


def test_the_controller_rbac_is_exactly_what_it_and_its_sidecars_use() -> None:
    objects = render()
    assert _rules(find(objects, "ClusterRole", "-controller")) == CONTROLLER_CLUSTER
    role = find(objects, "Role", "-controller")
    assert role["metadata"]["namespace"] == "kube-nbd"
    assert _rules(role) == CONTROLLER_NAMESPACED
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = find(objects, kind, "-controller")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "nbd-kube-nbd-controller", "namespace": "kube-nbd"}
        ]
    no_election = render({"controller": {"leaderElection": {"enabled": False}}})
    assert _rules(find(no_election, "Role", "-controller")) == {
        r for r in CONTROLLER_NAMESPACED if r[1] != "leases"
    }


def test_the_controller_pod_runs_unprivileged_with_pinned_sidecars() -> None:
    deployment = find(render(), "Deployment", "-controller")
    spec = pod_spec(deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["serviceAccountName"] == "nbd-kube-nbd-controller"
    for c in containers(deployment):
        sc = c["securityContext"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        if c["name"] != "controller":
            assert re.fullmatch(r"registry\.k8s\.io/sig-storage/csi-\w+:v\d+\.\d+\.\d+", c["image"])
    assert spec["volumes"] == [{"name": "socket-dir", "emptyDir": {}}]


def test_the_controller_is_optional_and_more_replicas_need_leader_election() -> None:
    off = render({"controller": {"enabled": False}})
    assert not [o for o in off if o["metadata"]["name"].endswith("-controller")]
    three = find(render({"controller": {"replicas": 3}}), "Deployment", "-controller")
    assert three["spec"]["replicas"] == 3
    with pytest.raises(helm.HelmRenderError, match="leaderElection"):
        render({"controller": {"replicas": 2, "leaderElection": {"enabled": False}}})


def test_the_storage_class_provisions_through_the_controller_and_lets_claims_grow() -> None:
    parameters = {"storageClass": "fast", "volumeMode": "Block", "connections": "4"}
    values: dict[str, Any] = {"storageClass": {"create": True, "parameters": parameters}}
    sc = find(render(values), "StorageClass")
    assert sc["provisioner"] == "nbd.dev"
    assert sc["allowVolumeExpansion"] is True
    assert sc["reclaimPolicy"] == "Delete"
    assert sc["parameters"] == parameters
    # What the class says is what the controller accepts.
    provision.plan(create_request("pvc-1", **sc["parameters"]), "kube-nbd")
    static = {"storageClass": {"create": True, "provisioner": "kubernetes.io/no-provisioner"}}
    assert find(render(static), "StorageClass")["allowVolumeExpansion"] is False
    everything = find(render(EVERYTHING_ON), "StorageClass")
    assert everything["provisioner"] == "nbd.dev"


SNAPSHOTTER_CLUSTER = {
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", ("get", "list", "watch")),
    (
        "snapshot.storage.k8s.io",
        "volumesnapshotcontents",
        ("get", "list", "patch", "update", "watch"),
    ),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents/status", ("patch", "update")),
}
# nbd_agent.csi.kube.SnapshotStore: a volume's snapshot is a VolumeSnapshot of its data claim.
SNAPSHOT_NAMESPACED = {
    ("snapshot.storage.k8s.io", "volumesnapshots", ("create", "delete", "get", "list")),
}


def test_snapshots_are_opt_in_with_their_sidecar_rbac_and_class() -> None:
    values: dict[str, Any] = {
        "controller": {"snapshotter": {"enabled": True}},
        "volumeSnapshotClass": {"create": True, "parameters": {"snapshotClass": "backing"}},
    }
    objects = render(values)
    assert _rules(find(objects, "ClusterRole", "-controller")) == (
        CONTROLLER_CLUSTER | SNAPSHOTTER_CLUSTER
    )
    assert _rules(find(objects, "Role", "-controller")) == (
        CONTROLLER_NAMESPACED | SNAPSHOT_NAMESPACED
    )
    names = [c["name"] for c in containers(find(objects, "Deployment", "-controller"))]
    assert names == ["controller", "csi-provisioner", "csi-resizer", "csi-snapshotter"]
    klass = find(objects, "VolumeSnapshotClass")
    assert klass["driver"] == "nbd.dev" and klass["deletionPolicy"] == "Delete"
    assert klass["parameters"] == {"snapshotClass": "backing"}
    defaults = render()
    assert "csi-snapshotter" not in [
        c["name"] for c in containers(find(defaults, "Deployment", "-controller"))
    ]
    assert not [o for o in defaults if o["kind"] == "VolumeSnapshotClass"]
    with pytest.raises(helm.HelmRenderError, match="snapshotter"):
        render({"volumeSnapshotClass": {"create": True}})


def test_volume_attributes_classes_are_opt_in_with_their_feature_gate_and_rbac() -> None:
    objects = render({"controller": {"volumeAttributesClass": {"enabled": True}}})
    deployment = find(objects, "Deployment", "-controller")
    for c in containers(deployment):
        if c["name"] in ("csi-provisioner", "csi-resizer"):
            assert "--feature-gates=VolumeAttributesClass=true" in c["args"], c["name"]
    vac = ("storage.k8s.io", "volumeattributesclasses", ("get", "list", "watch"))
    assert _rules(find(objects, "ClusterRole", "-controller")) == CONTROLLER_CLUSTER | {vac}
    for c in containers(find(render(), "Deployment", "-controller")):
        assert not any(a.startswith("--feature-gates") for a in c.get("args", [])), c["name"]


def test_the_notes_warn_when_the_operator_would_not_see_the_controllers_exports() -> None:
    notes = "kube-nbd/templates/NOTES.txt"
    elsewhere = render_manifests({"operator": {"watchNamespaces": ["apps"]}})[notes]
    assert 'creates its NBDExports in "kube-nbd"' in elsewhere
    included = render_manifests({"operator": {"watchNamespaces": ["apps", "kube-nbd"]}})[notes]
    assert "WARNING" not in included
    assert "WARNING" not in render_manifests()[notes]
