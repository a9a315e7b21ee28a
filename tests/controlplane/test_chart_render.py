"""The chart renders, with Helm's own engine, into objects a Kubernetes API server would accept.

Each value set below is a way people really install the chart; every object it renders is
checked against the OpenAPI schemas of the oldest supported and the newest Kubernetes release
(strict: unknown fields fail), against the API-server rules OpenAPI cannot express, and for the
labels and names the chart promises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from nbd_agent.csi.identity import DRIVER_NAME
from nbd_api import CSI_DRIVER
from nbd_operator.spec import child_labels
from test_chart_support import (
    CHART_DIR,
    CLUSTER_SCOPED,
    EXAMPLES_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    api_server_errors,
    find,
    k8s_errors,
    render,
    render_manifests,
    validate_values,
)

EVERYTHING_ON: dict[str, Any] = {
    "commonLabels": {"team": "storage"},
    "imagePullSecrets": [{"name": "regcred"}],
    "image": {"digest": "sha256:" + "a" * 64},
    "operator": {
        "verbose": True,
        "watchNamespaces": ["apps", "db"],
        "extraArgs": ["--verbose"],
        "extraEnv": [{"name": "EXTRA", "value": "1"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "storage"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"a": "b"},
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
            }
        ],
        "serviceAccount": {"annotations": {"iam.example/role": "x"}},
    },
    "agent": {
        "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet/",
        "hostNetwork": False,
        "nbdModule": {"nbdsMax": 128},
        "extraArgs": ["--verbose"],
        "podLabels": {"x": "y"},
    },
    "storageClass": {"create": True, "default": True, "mountOptions": ["noatime"]},
    "controller": {"snapshotter": {"enabled": True}, "volumeAttributesClass": {"enabled": True}},
    "volumeSnapshotClass": {"create": True, "parameters": {"snapshotClass": "csi-hostpath"}},
    "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "hostDevices": {"enabled": True, "paths": ["/dev/disk/by-id/nvme-*", "/dev/sd[b-d]"]},
}

MINIMAL: dict[str, Any] = {
    "crds": {"enabled": False},
    "controller": {"enabled": False},
    "csiDriver": {"enabled": False},
    "agent": {"enabled": False},
    "operator": {
        "serviceAccount": {"create": False, "name": "byo-operator"},
        "rbac": {"create": False},
    },
}


def _values_file(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES_DIR / name).read_text()))


VALUE_SETS: dict[str, Any] = {
    "defaults": lambda: {},
    "everything-on": lambda: EVERYTHING_ON,
    "minimal": lambda: MINIMAL,
    "kind": lambda: _values_file("values-kind.yaml"),
    "k3d": lambda: _values_file("values-k3d.yaml"),
}
# Objects from CRDs the API server does not know without their operators.
NOT_BUILTIN = {"PodMonitor", "VolumeSnapshotClass"}


@pytest.fixture(params=sorted(VALUE_SETS), ids=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> dict[str, Any]:
    return dict(VALUE_SETS[request.param]())


def test_every_value_set_passes_the_charts_own_schema(value_set: dict[str, Any]) -> None:
    validate_values(value_set)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_object_is_valid_for_kubernetes(
    value_set: dict[str, Any], version: str
) -> None:
    objects = render(value_set)
    assert objects
    errors = []
    for obj in objects:
        if obj["kind"] not in NOT_BUILTIN:
            errors += k8s_errors(obj, version)
        errors += api_server_errors(obj)
    assert errors == []


def test_every_object_carries_the_recommended_labels(value_set: dict[str, Any]) -> None:
    for obj in render(value_set):
        labels = obj["metadata"]["labels"]
        for key in ("name", "instance", "part-of", "component", "version", "managed-by"):
            assert labels.get(f"app.kubernetes.io/{key}"), (obj["kind"], key)
        assert labels["app.kubernetes.io/part-of"] == "kube-nbd"
        for key, value in value_set.get("commonLabels", {}).items():
            assert labels[key] == value
        if obj["kind"] in {"Deployment", "DaemonSet"}:
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert pod_labels["app.kubernetes.io/version"] == labels["app.kubernetes.io/version"]


def test_namespaced_objects_land_in_the_release_namespace(value_set: dict[str, Any]) -> None:
    watched = value_set.get("operator", {}).get("watchNamespaces", [])
    for obj in render(value_set):
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], obj["kind"]
        elif obj["kind"] in {"Role", "RoleBinding"} and obj["metadata"]["namespace"] in watched:
            continue
        else:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]


def test_object_names_are_unique_per_kind_and_namespace(value_set: dict[str, Any]) -> None:
    keys = [
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in render(value_set)
    ]
    assert len(keys) == len(set(keys))


def test_default_install_renders_the_whole_product() -> None:
    kinds = sorted(o["kind"] for o in render())
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "CSIDriver",
            "ServiceAccount",
            "ServiceAccount",
            "ServiceAccount",  # the CSI controller's
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Role",  # the operator's leader election Lease
            "RoleBinding",
            "Role",  # the CSI controller's NBDExports and its sidecars' Leases
            "RoleBinding",
            "Deployment",  # the operator
            "Deployment",  # the CSI controller
            "DaemonSet",
        ]
    )


def test_optional_objects_appear_only_when_asked_for() -> None:
    defaults = {o["kind"] for o in render()}
    assert not defaults & {"StorageClass", "Service", "PodMonitor"}
    on = render(EVERYTHING_ON)
    assert find(on, "StorageClass")["metadata"]["annotations"] == {
        "storageclass.kubernetes.io/is-default-class": "true"
    }
    monitor = find(on, "PodMonitor", "-servers")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert {o["kind"] for o in render(MINIMAL)} == {"Deployment"}


def test_the_server_pod_monitor_selects_the_operators_server_pods() -> None:
    monitor = find(render(EVERYTHING_ON), "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    labels = child_labels("any-export")
    assert {k: labels[k] for k in selector} == selector


def test_csidriver_matches_what_the_agent_implements() -> None:
    driver = find(render(), "CSIDriver")
    assert driver["metadata"]["name"] == CSI_DRIVER == DRIVER_NAME
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["podInfoOnMount"] is True
    assert driver["spec"]["volumeLifecycleModes"] == ["Persistent", "Ephemeral"]
    assert driver["spec"]["fsGroupPolicy"] == "File"


def test_image_reference_prefers_digest_and_defaults_to_app_version() -> None:
    app_version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["appVersion"]
    image = find(render(), "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    assert image == f"ghcr.io/kube-nbd/kube-nbd:{app_version}"
    pinned = find(render(EVERYTHING_ON), "Deployment", "-operator")
    assert pinned["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        "@sha256:" + "a" * 64
    )


def test_a_release_named_like_the_chart_does_not_repeat_the_name() -> None:
    names = {o["metadata"]["name"] for o in render(name="kube-nbd")}
    assert "kube-nbd-operator" in names
    assert not any("kube-nbd-kube-nbd" in n for n in names)


def test_long_release_names_still_give_valid_service_names() -> None:
    long_name = "a" * 53
    objects = render(EVERYTHING_ON, name=long_name)
    assert all(api_server_errors(o) == [] for o in objects)


def test_bringing_your_own_service_account_requires_its_name() -> None:
    with pytest.raises(helm.HelmRenderError, match=r"operator\.serviceAccount\.name is required"):
        render({"operator": {"serviceAccount": {"create": False}}})


def test_notes_tell_the_next_steps_and_follow_the_values() -> None:
    notes = render_manifests()["kube-nbd/templates/NOTES.txt"]
    assert "kubectl get nbdexports" in notes
    assert "driver: nbd.dev" in notes
    assert "kubectl delete crd nbdexports.nbd.dev" in notes
    no_crds = render_manifests({"crds": {"enabled": False, "keep": False}})
    assert "install the NBDExport CRD yourself" in no_crds["kube-nbd/templates/NOTES.txt"]


def test_helm_lint_is_clean_for_the_oldest_supported_kubernetes() -> None:
    report = helm.lint(str(CHART_DIR), strict=True, kube_version="v1.29.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_the_chart_declares_the_kubernetes_versions_it_is_tested_against() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"
    assert chart["apiVersion"] == "v2"
    assert Path(CHART_DIR / "templates" / "NOTES.txt").exists()


def test_the_packaged_chart_renders_the_same_objects(tmp_path: Path) -> None:
    # `helm package` applies .helmignore; a file it drops (or a stray one it keeps) shows here.
    archive = helm.package(str(CHART_DIR), destination=str(tmp_path))
    with helm.Chart.load(archive) as packaged:
        assert packaged.schema is not None  # the archive still validates values
        rendered = packaged.render({}, name="nbd", namespace=NAMESPACE)
    assert rendered == render_manifests()
