"""Host-device provisioning against a real cluster: a claim of a ``backing: hostDevice`` class
gets a whole allowlisted device of a node (an NBDExport with ``source.hostDevice`` of the size
the node plugin published), a pod writes and reads it over NBD, and deleting the claim gives
the device back (its claim Lease is gone, the node's inventory offers it again).

What this proves that no other tier can: the node plugins' allowlist scan and inventory Leases
on real nodes with the chart's RBAC, external-provisioner's topology (WaitForFirstConsumer passes
the pod's node) and capacity tracking, and the operator serving a host device. Steps:
tests/e2e/README.md ("Host devices"). Skipped without a cluster, and without
NBD_E2E_HOST_DEVICES=1 (the chart installed with hostDevices and at least one free device).
"""

from __future__ import annotations

import json
import os
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
)

pytestmark = pytest.mark.e2e

if not kubeconfig_present():
    pytest.skip(NO_CLUSTER_REASON, allow_module_level=True)
if os.environ.get("NBD_E2E_HOST_DEVICES") != "1":
    pytest.skip(
        "NBD_E2E_HOST_DEVICES=1 not set (install the chart with hostDevices.enabled and paths)",
        allow_module_level=True,
    )

RELEASE_NAMESPACE = os.environ.get("NBD_E2E_RELEASE_NAMESPACE", "kube-nbd")
INVENTORY = {"nbd.dev/host-device-inventory": "true"}
CLAIMS = {"nbd.dev/host-device-claim": "true"}


def _bytes(quantity: str) -> int:
    """A PV capacity as external-provisioner writes it (bytes in binary SI form)."""
    for power, suffix in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1):
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * 1024**power
    return int(quantity)


def _offered(leases: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    out = set()
    for lease in leases:
        node = lease["spec"]["holderIdentity"]
        for d in json.loads(lease["metadata"]["annotations"]["nbd.dev/host-devices"]):
            out.add((node, d["path"], d["sizeBytes"]))
    return out


async def test_a_host_device_claim_gets_a_whole_device_and_gives_it_back(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    offered = _offered(await kube.list("Lease", RELEASE_NAMESPACE, INVENTORY))
    assert offered, f"no node publishes host devices in {RELEASE_NAMESPACE}"
    suffix = uuid.uuid4().hex[:6]
    sc, claim = f"e2e-nbd-disk-{suffix}", f"e2e-disk-{suffix}"
    await made.create(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": sc},
            "provisioner": "nbd.dev",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete",
            "parameters": {"backing": "hostDevice"},
        }
    )
    await made.create(
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": sc,
                "resources": {"requests": {"storage": "1Mi"}},
            },
        }
    )
    pod = pod_manifest(
        f"e2e-disk-{suffix}",
        namespace,
        "dd if=/dev/urandom of=/data/payload bs=1M count=4 && md5sum /data/payload > /data/sum"
        " && sync && md5sum -c /data/sum",
        {"persistentVolumeClaim": {"claimName": claim}},
    )
    log = await run_to_completion(kube, made, pod)
    assert "/data/payload: OK" in log, log

    pvc = await kube.get("PersistentVolumeClaim", namespace, claim)
    assert pvc is not None
    pv = await kube.get("PersistentVolume", None, pvc["spec"]["volumeName"])
    assert pv is not None
    export_ns, export = pv["spec"]["csi"]["volumeHandle"].split("/")
    obj = await kube.get("NBDExport", export_ns, export)
    assert obj is not None
    device = obj["spec"]["source"]["hostDevice"]
    sizes = {
        size for node, path, size in offered if (node, path) == (device["nodeName"], device["path"])
    }
    assert len(sizes) == 1, (device, offered)
    # The volume is the whole device: the PV has the device's size, not the 1Mi asked.
    assert _bytes(pv["spec"]["capacity"]["storage"]) == sizes.pop()

    await made.delete_and_wait("Pod", namespace, pod["metadata"]["name"])
    await made.delete_and_wait("PersistentVolumeClaim", namespace, claim)

    async def device_free() -> bool:
        leases = await kube.list("Lease", RELEASE_NAMESPACE, CLAIMS)
        return all(lease["spec"].get("holderIdentity") != export for lease in leases)

    await eventually(device_free, f"the device claim of {export} to be given back")
