"""Helpers shared by the e2e tests (test_operator_e2e.py and test_csi_e2e.py).

Why it exists: the CSI scenarios need objects the operator's ``Kube`` client does not know
(Pods, PersistentVolumes, Events, CSIDrivers, CSINodes) and two reads that are not JSON objects
by name (a pod's log, the events about one object). This module widens that client for tests
only, and holds the skip decision and the deadline poll in one place.

What it must not do: decide anything about exports, or be imported by product code; it does not
change ``nbd_operator.kube``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar

import pytest
from nbd_operator.kube import CLUSTER_SCOPED, RESOURCES, Kube, KubeError

TIMEOUT = float(os.environ.get("NBD_E2E_TIMEOUT", "180"))
# A busybox-like image with sh, dd, cmp, cat, blockdev and sleep; any the nodes can pull.
TEST_IMAGE = os.environ.get("E2E_TEST_IMAGE", "busybox:1.36")
NO_CLUSTER_REASON = (
    "no kubeconfig (KUBECONFIG or ~/.kube/config) and not in a cluster: "
    "the e2e suite needs a real cluster, see tests/e2e/README.md"
)

# What the node-side tests touch beyond the operator's kinds: kind -> (API prefix, plural).
EXTRA_RESOURCES: dict[str, tuple[str, str]] = {
    "Pod": ("api/v1", "pods"),
    "PersistentVolume": ("api/v1", "persistentvolumes"),
    "Event": ("api/v1", "events"),
    "CSIDriver": ("apis/storage.k8s.io/v1", "csidrivers"),
    "CSINode": ("apis/storage.k8s.io/v1", "csinodes"),
    "StorageClass": ("apis/storage.k8s.io/v1", "storageclasses"),
    "VolumeSnapshot": ("apis/snapshot.storage.k8s.io/v1", "volumesnapshots"),
    "VolumeSnapshotClass": ("apis/snapshot.storage.k8s.io/v1", "volumesnapshotclasses"),
}
EXTRA_CLUSTER_SCOPED = {
    "PersistentVolume",
    "CSIDriver",
    "CSINode",
    "StorageClass",
    "VolumeSnapshotClass",
}


def kubeconfig_present() -> bool:
    """A kubeconfig file or an in-cluster service account token exists (reachability aside)."""
    paths = os.environ.get("KUBECONFIG", str(pathlib.Path.home() / ".kube" / "config"))
    in_cluster = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    return in_cluster or any(pathlib.Path(p).exists() for p in paths.split(os.pathsep) if p)


class E2EKube(Kube):
    """The operator's client, with the kinds and reads the node-side scenarios need."""

    resources: ClassVar[Mapping[str, tuple[str, str]]] = {**RESOURCES, **EXTRA_RESOURCES}
    cluster_scoped: ClassVar[AbstractSet[str]] = CLUSTER_SCOPED | EXTRA_CLUSTER_SCOPED

    async def events_about(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """Events whose involvedObject is ``name`` (any kind) in ``namespace``."""
        params: Mapping[str, str] = {"fieldSelector": f"involvedObject.name={name}"}
        result = await self._request("GET", self._url("Event", namespace), params=params)
        items = list(result.get("items") or [])
        # Filter again: the selector is a request, the assertion must not depend on it.
        return [i for i in items if (i.get("involvedObject") or {}).get("name") == name]

    async def pod_log(self, namespace: str, name: str) -> str:
        """The pod's log as text ("" when it has none yet); plain text, not JSON."""
        url = self._url("Pod", namespace, name, "log")
        async with self._session.get(url) as resp:
            text = await resp.text()
            return text if resp.status < 400 else ""


async def eventually(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll the real API until ``check`` returns something truthy, or fail after TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out after {TIMEOUT}s waiting for {what}")
        # A poll interval against a real cluster, inside a deadline; not a synchronisation.
        await asyncio.sleep(2)


def export_manifest(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nbd.dev/v1alpha1",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def pod_manifest(
    name: str,
    namespace: str,
    script: str,
    volume: dict[str, Any],
    *,
    block_path: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """A one-container busybox pod running ``script`` with ``volume`` named ``data``: mounted
    at /data, or (``block_path``) handed over as a raw device at that path."""
    container: dict[str, Any] = {
        "name": "main",
        "image": TEST_IMAGE,
        "command": ["sh", "-c", script],
        # Root in the container to open a device node or write the filesystem's root folder,
        # but nothing beyond that.
        "securityContext": {"allowPrivilegeEscalation": False, "runAsUser": 0},
    }
    if block_path is None:
        container["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    else:
        container["volumeDevices"] = [{"name": "data", "devicePath": block_path}]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # busybox sh as PID 1 ignores SIGTERM: do not wait the default 30 s on every delete.
        "terminationGracePeriodSeconds": 1,
        "containers": [container],
        "volumes": [{"name": "data", **volume}],
    }
    if node is not None:
        # Bypass the scheduler on purpose: the test needs the pod on exactly this node.
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "nbd-e2e"}},
        "spec": spec,
    }


def inline_volume(export: str) -> dict[str, Any]:
    return {"csi": {"driver": "nbd.dev", "fsType": "ext4", "volumeAttributes": {"export": export}}}


def static_pv_and_claim(
    name: str, namespace: str, export: str, size: str, mode: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PV naming ``namespace/export`` and the PVC bound to it explicitly (both ways), with no
    StorageClass so no provisioner can step in."""
    pv: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": mode,
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": name},
            "csi": {"driver": "nbd.dev", "volumeHandle": f"{namespace}/{export}"},
        },
    }
    if mode == "Filesystem":
        pv["spec"]["csi"]["fsType"] = "ext4"
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": mode,
            "storageClassName": "",
            "volumeName": name,
            "resources": {"requests": {"storage": size}},
        },
    }
    return pv, claim


class Made:
    """What a test created, deleted in reverse order at the end (each waited until gone)."""

    def __init__(self, kube: E2EKube) -> None:
        self.kube = kube
        self.objects: list[tuple[str, str | None, str]] = []

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        created = await self.kube.create(obj)
        meta = obj["metadata"]
        self.objects.append((obj["kind"], meta.get("namespace"), meta["name"]))
        return created

    async def delete_and_wait(self, kind: str, namespace: str | None, name: str) -> None:
        await self.kube.delete(kind, namespace, name)

        async def gone() -> bool:
            return await self.kube.get(kind, namespace, name) is None

        await eventually(gone, f"{kind} {name} to be gone")

    async def cleanup(self) -> None:
        # Ask for every deletion first, then wait: one stuck object must not leave the others
        # behind. The order still holds where it matters, because the API server and the
        # operator enforce it (a claim and an export stay until the pods using them are gone).
        remaining = list(reversed(self.objects))
        for kind, namespace, name in remaining:
            try:
                await self.kube.delete(kind, namespace, name)
            except KubeError as exc:
                logging.getLogger("e2e").warning("deleting %s %s: %s", kind, name, exc)

        async def all_gone() -> bool:
            for kind, namespace, name in remaining:
                if await self.kube.get(kind, namespace, name) is not None:
                    return False
            return True

        await eventually(all_gone, f"{', '.join(n for _, _, n in remaining)} to be gone")


async def diagnosis(kube: E2EKube, namespace: str, pod: str) -> str:
    events = await kube.events_about(namespace, pod)
    lines = [f"{e.get('reason')}: {e.get('message')}" for e in events]
    return "log:\n" + await kube.pod_log(namespace, pod) + "\nevents:\n" + "\n".join(lines)


async def running_pod(kube: E2EKube, made: Made, pod: dict[str, Any]) -> dict[str, Any]:
    namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    await made.create(pod)

    async def running() -> Any:
        obj = await kube.get("Pod", namespace, name)
        phase = (obj or {}).get("status", {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            pytest.fail(f"pod {name} exited early; {await diagnosis(kube, namespace, name)}")
        return obj if phase == "Running" else None

    result: dict[str, Any] = await eventually(running, f"pod {name} to be Running")
    return result


async def run_to_completion(kube: E2EKube, made: Made, pod: dict[str, Any]) -> str:
    """Create the pod, wait until it has exited, require exit 0; returns its log."""
    namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    await made.create(pod)

    async def finished() -> Any:
        obj = await kube.get("Pod", namespace, name)
        phase = (obj or {}).get("status", {}).get("phase")
        return obj if phase in ("Succeeded", "Failed") else None

    obj = await eventually(finished, f"pod {name} to exit")
    log = await kube.pod_log(namespace, name)
    if obj["status"]["phase"] != "Succeeded":
        pytest.fail(f"pod {name} failed; {await diagnosis(kube, namespace, name)}")
    return log
