"""Every manifest under examples/ is one the cluster would accept and the product would serve.

Built-in kinds are validated against the Kubernetes OpenAPI schemas (strict), NBDExports
against the CRD's openAPIV3Schema and its CEL rules. Then the references between objects are
followed the way the cluster follows them: a PV's volumeHandle and an inline volume's
attributes are resolved with the agent's own parser to an NBDExport of the same file, claims
and volumes pre-bind to each other, a TLS export's Secret has the keys the operator checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from nbd_agent.csi.mounter import SUPPORTED_FS
from nbd_agent.csi.sources import ATTR_POD_NAMESPACE, export_ref
from nbd_api import CSI_DRIVER, KIND
from nbd_operator.spec import server_name
from test_chart_support import (
    EXAMPLES_DIR,
    KUBE_VERSIONS,
    api_server_errors,
    crd_cel_errors,
    crd_errors,
    k8s_errors,
    pod_spec,
)

# Helm values files live next to the manifests; the chart tests render them.
MANIFESTS = sorted(p for p in EXAMPLES_DIR.glob("*.yaml") if not p.name.startswith("values-"))
MINE = ["pod-inline-volume.yaml", "pv-block.yaml", "pv-filesystem.yaml", "tls-export.yaml"]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _exports(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (d["metadata"].get("namespace", "default"), d["metadata"]["name"])
        for d in _by_kind(docs, KIND)
    }


def test_the_promised_examples_exist() -> None:
    names = {p.name for p in MANIFESTS}
    assert set(MINE) <= names
    assert {"values-kind.yaml", "values-k3d.yaml"} <= {p.name for p in EXAMPLES_DIR.iterdir()}


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_every_example_object_is_valid(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no objects"
    errors: list[str] = []
    for doc in docs:
        if doc.get("apiVersion", "").startswith("nbd.dev/"):
            assert doc["kind"] == KIND
            errors += crd_errors(doc) + crd_cel_errors(doc)
        else:
            for version in KUBE_VERSIONS:
                errors += k8s_errors(doc, version)
            errors += api_server_errors(doc)
    assert errors == []


def test_the_validators_reject_what_the_cluster_would_reject() -> None:
    # A guard against a validator that accepts everything.
    (export,) = _by_kind(_docs(EXAMPLES_DIR / "pod-inline-volume.yaml"), KIND)
    export["spec"]["sizee"] = export["spec"].pop("size")
    assert crd_errors(export)  # unknown field
    assert crd_cel_errors(export)  # memory without size
    (pod,) = _by_kind(_docs(EXAMPLES_DIR / "pod-inline-volume.yaml"), "Pod")
    pod["spec"]["containers"][0]["volumeMount"] = []
    assert k8s_errors(pod, KUBE_VERSIONS[0])


@pytest.mark.parametrize("name", MINE)
def test_csi_volumes_resolve_to_an_export_of_the_same_file(name: str) -> None:
    docs = _docs(EXAMPLES_DIR / name)
    exports = _exports(docs)
    resolved = []
    for pv in _by_kind(docs, "PersistentVolume"):
        csi = pv["spec"]["csi"]
        assert csi["driver"] == CSI_DRIVER
        assert csi.get("fsType", "ext4") in SUPPORTED_FS
        resolved.append(export_ref(csi["volumeHandle"], csi.get("volumeAttributes", {})))
    for pod in _by_kind(docs, "Pod"):
        for volume in pod_spec(pod)["volumes"]:
            if "csi" not in volume:
                continue
            csi = volume["csi"]
            assert csi["driver"] == CSI_DRIVER
            assert csi.get("fsType", "ext4") in SUPPORTED_FS
            # What the kubelet passes for an inline volume (podInfoOnMount): the pod's namespace.
            context = {**csi["volumeAttributes"], ATTR_POD_NAMESPACE: pod["metadata"]["namespace"]}
            resolved.append(export_ref("csi-inline-volume-id", context))
    assert resolved, f"{name} consumes no NBD volume"
    assert set(resolved) <= exports


@pytest.mark.parametrize("name", ["pv-block.yaml", "pv-filesystem.yaml"])
def test_static_volumes_and_claims_bind_only_to_each_other(name: str) -> None:
    docs = _docs(EXAMPLES_DIR / name)
    (pv,) = _by_kind(docs, "PersistentVolume")
    (pvc,) = _by_kind(docs, "PersistentVolumeClaim")
    (export,) = _by_kind(docs, KIND)
    assert pv["spec"]["claimRef"] == {
        "namespace": pvc["metadata"]["namespace"],
        "name": pvc["metadata"]["name"],
    }
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    for key in ("volumeMode", "storageClassName", "accessModes"):
        assert pv["spec"][key] == pvc["spec"][key], key
    assert pv["spec"]["capacity"]["storage"] == pvc["spec"]["resources"]["requests"]["storage"]
    assert pv["spec"]["capacity"]["storage"] == export["spec"]["size"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["spec"]["accessModes"] == [export["spec"].get("accessMode", "ReadWriteOnce")]


@pytest.mark.parametrize(
    ("name", "mode"), [("pv-block.yaml", "Block"), ("pv-filesystem.yaml", "Filesystem")]
)
def test_pods_use_block_claims_as_devices_and_filesystem_claims_as_mounts(
    name: str, mode: str
) -> None:
    docs = _docs(EXAMPLES_DIR / name)
    (pvc,) = _by_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["volumeMode"] == mode
    (pod,) = _by_kind(docs, "Pod")
    spec = pod_spec(pod)
    claim_volume = next(
        v["name"]
        for v in spec["volumes"]
        if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    )
    (container,) = spec["containers"]
    devices = {d["name"] for d in container.get("volumeDevices", [])}
    mounts = {m["name"] for m in container.get("volumeMounts", [])}
    if mode == "Block":
        assert claim_volume in devices and claim_volume not in mounts
    else:
        assert claim_volume in mounts and claim_volume not in devices


def test_every_example_pod_runs_without_privileges() -> None:
    for name in MINE:
        for pod in _by_kind(_docs(EXAMPLES_DIR / name), "Pod"):
            for container in pod_spec(pod)["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert not sc.get("privileged")


_CREATE_SECRET = re.compile(r"kubectl(?: -n (\S+))? create secret (\S+) (\S+)")


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_no_example_overwrites_a_secret_it_tells_the_user_to_create(path: Path) -> None:
    told = {(ns or "default", name) for ns, _, name in _CREATE_SECRET.findall(path.read_text())}
    shipped = {
        (s["metadata"].get("namespace", "default"), s["metadata"]["name"])
        for s in _by_kind(_docs(path), "Secret")
    }
    assert not told & shipped, f"kubectl apply -f {path.name} would overwrite {told & shipped}"


def test_the_tls_export_tells_how_to_create_the_secret_it_names() -> None:
    text = (EXAMPLES_DIR / "tls-export.yaml").read_text()
    (export,) = _by_kind(_docs(EXAMPLES_DIR / "tls-export.yaml"), KIND)
    tls, namespace = export["spec"]["tls"], export["metadata"]["namespace"]
    # A kubernetes.io/tls Secret holds tls.crt and tls.key, the keys the operator checks; a
    # client-certificate requirement would need ca.crt too, which that command does not add.
    assert (namespace, "tls", tls["secretName"]) in _CREATE_SECRET.findall(text)
    assert not tls.get("requireClientCertificate")
    # The certificate must name the Service the operator puts in front of the server.
    service = f"{server_name(export['metadata']['name'])}.{namespace}.svc"
    assert f"DNS:{service}" in text
