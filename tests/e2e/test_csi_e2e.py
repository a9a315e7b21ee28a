"""The node side against a real cluster: the kubelet, the CSI node plugin and the kernel together.

What this proves that no other tier can: the kubelet finds the plugin the chart registers, calls
it for inline and persistent volumes, mount propagation carries the agent's mounts into pods,
``/dev/nbdX`` inside a node serves a pod's reads and writes, the writer Lease refuses a second
node with an event a user can read, and the operator's finalizer waits for a real detach.
Steps to run it: tests/e2e/README.md ("The CSI node plugin"). Skipped (with the reason) when no
cluster is reachable, when the chart (CSIDriver ``nbd.dev``) is not installed, and the
two-node scenario on a one-node cluster.

Every object a test creates carries a uuid suffix and is deleted by the ``made`` fixture, pods
first (that detaches the devices), exports last.
"""

from __future__ import annotations

import uuid
from typing import Any

import nbd_api
import pytest

from tests.e2e.e2e_support import (
    NO_CLUSTER_REASON,
    E2EKube,
    Made,
    eventually,
    export_manifest,
    inline_volume,
    kubeconfig_present,
    pod_manifest,
    run_to_completion,
    running_pod,
    static_pv_and_claim,
)

pytestmark = pytest.mark.e2e

if not kubeconfig_present():
    pytest.skip(NO_CLUSTER_REASON, allow_module_level=True)

EXPORT_SIZE = "64Mi"


def _name(prefix: str) -> str:
    return f"e2e-{prefix}-{uuid.uuid4().hex[:6]}"


async def _ready_export(kube: E2EKube, made: Made, namespace: str, spec: dict[str, Any]) -> Any:
    name = _name("csi")
    await made.create(export_manifest(name, namespace, spec))

    async def ready() -> Any:
        obj = await kube.get("NBDExport", namespace, name)
        return obj if (obj or {}).get("status", {}).get("phase") == "Ready" else None

    return await eventually(ready, f"NBDExport {name} to be Ready")


async def _attachment_leases(kube: E2EKube, namespace: str, export: str) -> list[dict[str, Any]]:
    leases = await kube.list("Lease", namespace, {nbd_api.LABEL_EXPORT: export})
    role = nbd_api.ROLE_ATTACHMENT
    return [
        lease
        for lease in leases
        if (lease["metadata"].get("labels") or {}).get(nbd_api.LABEL_ROLE) == role
    ]


async def _plugin_nodes(kube: E2EKube) -> list[str]:
    """Ready, uncordoned nodes whose kubelet has registered the nbd.dev plugin."""
    names = []
    for node in await kube.list("Node", ""):
        name = node["metadata"]["name"]
        conditions = node.get("status", {}).get("conditions") or []
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        if not ready or node.get("spec", {}).get("unschedulable"):
            continue
        csinode = await kube.get("CSINode", None, name)
        drivers = ((csinode or {}).get("spec") or {}).get("drivers") or []
        if any(d.get("name") == nbd_api.CSI_DRIVER for d in drivers):
            names.append(name)
    return names


async def test_an_inline_volume_keeps_its_data_from_one_pod_to_the_next(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    export = await _ready_export(
        kube, made, namespace, {"source": {"memory": {}}, "size": EXPORT_SIZE}
    )
    name = export["metadata"]["name"]
    token = uuid.uuid4().hex
    writer = pod_manifest(
        _name("writer"),
        namespace,
        f"echo {token} > /data/proof && sync && cat /data/proof",
        inline_volume(name),
    )
    assert token in await run_to_completion(kube, made, writer)
    await made.delete_and_wait("Pod", namespace, writer["metadata"]["name"])

    # Unpublish of an ephemeral volume detaches it: no node may still record an attachment, so
    # the reader's volume is a fresh attach (handshake, no format: the filesystem is there).
    async def detached() -> bool:
        return not await _attachment_leases(kube, namespace, name)

    await eventually(detached, f"the writer's node to detach {name}")
    reader = pod_manifest(_name("reader"), namespace, "cat /data/proof", inline_volume(name))
    assert (await run_to_completion(kube, made, reader)).strip() == token


async def test_a_block_volume_is_a_device_of_the_exports_size(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    export = await _ready_export(
        kube, made, namespace, {"source": {"memory": {}}, "size": EXPORT_SIZE}
    )
    name = export["metadata"]["name"]
    size = export["status"]["sizeBytes"]
    pv, claim = static_pv_and_claim(name, namespace, name, EXPORT_SIZE, "Block")
    await made.create(pv)
    await made.create(claim)
    volume = {"persistentVolumeClaim": {"claimName": name}}
    script = "test -b /dev/xvda && blockdev --getsize64 /dev/xvda"
    pod = pod_manifest(_name("block"), namespace, script, volume, block_path="/dev/xvda")
    assert (await run_to_completion(kube, made, pod)).strip() == str(size)


async def test_a_second_node_is_refused_a_readwriteonce_export_naming_the_holder(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    nodes = await _plugin_nodes(kube)
    if len(nodes) < 2:
        pytest.skip(f"needs two schedulable nodes with the nbd.dev plugin, the cluster has {nodes}")
    node_a, node_b = nodes[:2]
    spec = {"source": {"memory": {}}, "size": EXPORT_SIZE, "accessMode": "ReadWriteOnce"}
    export = await _ready_export(kube, made, namespace, spec)
    name = export["metadata"]["name"]
    pv, claim = static_pv_and_claim(name, namespace, name, EXPORT_SIZE, "Filesystem")
    await made.create(pv)
    await made.create(claim)
    volume = {"persistentVolumeClaim": {"claimName": name}}
    holder_pod = pod_manifest(_name("holder"), namespace, "exec sleep 3600", volume, node=node_a)
    await running_pod(kube, made, holder_pod)
    lease = await kube.get("Lease", namespace, nbd_api.writer_lease_name(name))
    assert lease is not None and lease["spec"]["holderIdentity"] == node_a

    refused = pod_manifest(_name("refused"), namespace, "true", volume, node=node_b)
    await made.create(refused)
    refused_name = refused["metadata"]["name"]

    async def failed_mount() -> Any:
        events = await kube.events_about(namespace, refused_name)
        return [
            e
            for e in events
            # The agent quotes the holder (repr), so worker1 never matches worker10's event.
            if e.get("reason") == "FailedMount" and repr(node_a) in str(e.get("message"))
        ]

    events = await eventually(
        failed_mount, f"a FailedMount event on {refused_name} naming {node_a}"
    )
    assert "ReadWriteOnce" in events[0]["message"]
    pod = await kube.get("Pod", namespace, refused_name)
    assert pod is not None and pod["status"]["phase"] == "Pending"


async def test_deleting_an_export_in_use_waits_for_the_pod(
    kube: E2EKube, made: Made, namespace: str
) -> None:
    export = await _ready_export(
        kube, made, namespace, {"source": {"memory": {}}, "size": EXPORT_SIZE}
    )
    name = export["metadata"]["name"]
    pod = pod_manifest(_name("user"), namespace, "exec sleep 3600", inline_volume(name))
    running = await running_pod(kube, made, pod)
    node = running["spec"]["nodeName"]

    async def attached() -> Any:
        return await _attachment_leases(kube, namespace, name)

    await eventually(attached, f"node {node} to record its attachment of {name}")
    await kube.delete("NBDExport", namespace, name)

    async def waiting() -> Any:
        obj = await kube.get("NBDExport", namespace, name)
        status = (obj or {}).get("status") or {}
        ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
        blocked = ready and ready[0].get("reason") == "DetachPending"
        return obj if status.get("phase") == "Terminating" and blocked else None

    obj = await eventually(waiting, f"NBDExport {name} to wait for the detach")
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert node in ready["message"]
    # The finalizer holds it while the pod runs: the pod's volume is still served.
    assert await kube.get("NBDExport", namespace, name) is not None

    await made.delete_and_wait("Pod", namespace, pod["metadata"]["name"])

    async def gone() -> bool:
        return await kube.get("NBDExport", namespace, name) is None

    await eventually(gone, f"NBDExport {name} to be deleted after the pod went")
