"""Dynamic provisioning, online expansion, snapshot and restore against a real cluster: a claim
of an ``nbd.dev`` StorageClass is provisioned by the CSI controller (an NBDExport the operator
serves), a pod writes to it, the claim is grown while the pod runs and the pod sees the larger
filesystem with its data intact; a VolumeSnapshot of the claim becomes ready, and a claim
restored from it holds the same data.

What this proves that no other tier can: external-provisioner and external-resizer call the
controller over the chart's socket with the chart's RBAC, kubelet calls NodeExpandVolume, and
the whole chain (claim -> export -> server restart -> reattach -> resize2fs) works on a real
node. Steps: tests/e2e/README.md ("Provisioning and expansion"). Skipped without a cluster.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

import pytest

from tests.e2e.e2e_support import (
    NO_CLUSTER_REASON,
    E2EKube,
    Made,
    eventually,
    kubeconfig_present,
    pod_manifest,
    run_to_completion,
    running_pod,
)

pytestmark = pytest.mark.e2e

if not kubeconfig_present():
    pytest.skip(NO_CLUSTER_REASON, allow_module_level=True)

# The backing claims' class must allow expansion and snapshots (the README uses
# csi-driver-host-path); its VolumeSnapshotClass makes the backing snapshots.
BACKING_CLASS = os.environ.get("NBD_E2E_BACKING_CLASS", "csi-hostpath-sc")
BACKING_SNAPSHOT_CLASS = os.environ.get("NBD_E2E_BACKING_SNAPSHOT_CLASS", "csi-hostpath-snapclass")
SCRIPT = (
    "dd if=/dev/urandom of=/data/payload bs=1M count=4 && md5sum /data/payload > /data/sum && "
    "while true; do md5sum -c /data/sum >/dev/null && echo SUM-OK; "
    "df -k /data | tail -1; sleep 2; done"
)


def _storage_class(name: str) -> dict[str, Any]:
    parameters = {"storageClass": BACKING_CLASS} if BACKING_CLASS else {}
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "nbd.dev",
        "allowVolumeExpansion": True,
        "reclaimPolicy": "Delete",
        "parameters": parameters,
    }


def _claim(
    name: str, namespace: str, size: str, storage_class: str, snapshot: str = ""
) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": size}},
        },
    }
    if snapshot:
        claim["spec"]["dataSource"] = {
            "apiGroup": "snapshot.storage.k8s.io",
            "kind": "VolumeSnapshot",
            "name": snapshot,
        }
    return claim


def _snapshot_class(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {"name": name},
        "driver": "nbd.dev",
        "deletionPolicy": "Delete",
        "parameters": {"snapshotClass": BACKING_SNAPSHOT_CLASS},
    }


def _snapshot(name: str, namespace: str, claim: str, snapshot_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "volumeSnapshotClassName": snapshot_class,
            "source": {"persistentVolumeClaimName": claim},
        },
    }


def _pod(name: str, namespace: str, claim: str) -> dict[str, Any]:
    return pod_manifest(name, namespace, SCRIPT, {"persistentVolumeClaim": {"claimName": claim}})


def _df_totals(log: str) -> list[int]:
    """The 1K-blocks column of every `df -k` line in the log."""
    return [int(m.group(1)) for m in re.finditer(r"^\S+\s+(\d+)\s+\d+\s+\d+", log, re.M)]


async def test_a_claim_is_provisioned_grown_online_snapshotted_and_restored(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    suffix = uuid.uuid4().hex[:6]
    sc, claim, pod = f"e2e-nbd-{suffix}", f"e2e-claim-{suffix}", f"e2e-grow-{suffix}"
    await made.create(_storage_class(sc))
    await made.create(_claim(claim, namespace, "128Mi", sc))
    await running_pod(kube, made, _pod(pod, namespace, claim))

    async def bound() -> Any:
        obj = await kube.get("PersistentVolumeClaim", namespace, claim)
        return obj if (obj or {}).get("status", {}).get("phase") == "Bound" else None

    pvc = await eventually(bound, f"claim {claim} to be Bound")
    pv = await kube.get("PersistentVolume", None, pvc["spec"]["volumeName"])
    assert pv is not None and pv["spec"]["csi"]["driver"] == "nbd.dev"
    export_ns, export = pv["spec"]["csi"]["volumeHandle"].split("/")
    assert await kube.get("NBDExport", export_ns, export) is not None

    async def first_df() -> int:
        totals = _df_totals(await kube.pod_log(namespace, pod))
        return totals[-1] if totals else 0

    before = await eventually(first_df, "the pod's first df line")
    await kube.patch(
        "PersistentVolumeClaim",
        namespace,
        claim,
        {"spec": {"resources": {"requests": {"storage": "256Mi"}}}},
    )

    async def grown() -> Any:
        log = await kube.pod_log(namespace, pod)
        totals = _df_totals(log)
        return log if totals and totals[-1] > before + 100 * 1024 else None

    log = await eventually(grown, "the mounted filesystem to grow")
    # The data written before the growth still reads back: the last check before the last df.
    assert log.rstrip().splitlines()[-2] == "SUM-OK", log[-2000:]

    async def resized() -> Any:
        obj = await kube.get("PersistentVolumeClaim", namespace, claim)
        capacity = (obj or {}).get("status", {}).get("capacity", {}).get("storage")
        return capacity == "256Mi"

    await eventually(resized, f"claim {claim} to report 256Mi")

    # Snapshot the grown claim while the pod still uses it, then restore it into a new claim.
    snap_class, snap = f"e2e-nbd-snap-{suffix}", f"e2e-snap-{suffix}"
    await made.create(_snapshot_class(snap_class))
    await made.create(_snapshot(snap, namespace, claim, snap_class))

    async def snapshot_ready() -> Any:
        obj = await kube.get("VolumeSnapshot", namespace, snap)
        return (obj or {}).get("status", {}).get("readyToUse") is True

    await eventually(snapshot_ready, f"VolumeSnapshot {snap} to be ready")
    restored = f"e2e-restored-{suffix}"
    await made.create(_claim(restored, namespace, "256Mi", sc, snapshot=snap))
    check = pod_manifest(
        f"e2e-check-{suffix}",
        namespace,
        "md5sum -c /data/sum && df -k /data | tail -1",
        {"persistentVolumeClaim": {"claimName": restored}},
    )
    log = await run_to_completion(kube, made, check)
    assert "/data/payload: OK" in log, log
    assert _df_totals(log)[-1] > before + 100 * 1024, log
    # made.cleanup deletes pods first, then claims (reclaim Delete: the exports go with them),
    # the snapshot and the classes.
