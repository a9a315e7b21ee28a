"""The operator's scenarios against a real cluster (kind, k3d, any kubeconfig).

What this proves that the control-plane tests cannot: the API server really applies the CRD's
defaults and CEL rules, the status subresource really separates status from spec, the garbage
collector and finalizers really behave, and the server pod really starts and passes its
readiness probe. Steps to run it: tests/e2e/README.md. Skipped (with the reason) when no
cluster is reachable.

Expects: the CRD and the operator installed (the chart, or ``kubectl apply -f crds/`` plus
``nbd-operator`` running locally), and the server image pullable by the nodes.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest
from nbd_operator.kube import Kube, KubeError

from tests.e2e.e2e_support import (
    NO_CLUSTER_REASON,
    eventually,
    export_manifest,
    kubeconfig_present,
)

pytestmark = pytest.mark.e2e

if not kubeconfig_present():
    pytest.skip(NO_CLUSTER_REASON, allow_module_level=True)


@pytest.fixture
def namespace() -> str:
    return os.environ.get("NBD_E2E_NAMESPACE", "default")


@pytest.fixture
async def kube(namespace: str) -> AsyncIterator[Kube]:
    settings = kopf.OperatorSettings()
    logger = logging.getLogger("e2e")
    info = await kopf.login_via_async_client(logger=logger, settings=settings)
    if info is None:
        pytest.skip("kubeconfig present but unusable (kubernetes_asyncio could not load it)")
    client = Kube(info)
    try:
        try:
            await client.list("NBDExport", namespace)  # 404 when the CRD is not installed
        except (KubeError, OSError) as exc:
            pytest.skip(f"cluster not reachable or the NBDExport CRD is not installed: {exc}")
        yield client
    finally:
        await client.close()


async def test_the_api_server_rejects_what_the_crd_forbids(kube: Kube, namespace: str) -> None:
    name = "e2e-bad-" + uuid.uuid4().hex[:6]
    with pytest.raises(KubeError) as info:
        await kube.create(export_manifest(name, namespace, {"source": {"memory": {}}}))
    assert info.value.status == 422
    assert "size is required" in info.value.message
    with pytest.raises(KubeError) as info:
        spec = {"source": {"memory": {}}, "size": "1Gi", "accessMode": "ReadWriteMany"}
        await kube.create(export_manifest(name, namespace, spec))
    assert "clusterFilesystemAcknowledged" in info.value.message
    # Exactly one source: minProperties/maxProperties, not CEL (docs/operator.md says why).
    for source in ({}, {"memory": {}, "export": {"name": "base"}}):
        with pytest.raises(KubeError) as info:
            spec = {"source": source, "size": "1Gi"}
            await kube.create(export_manifest(name, namespace, spec))
        assert info.value.status == 422
        assert "spec.source" in info.value.message


async def test_a_memory_export_is_served_then_deleted(kube: Kube, namespace: str) -> None:
    name = "e2e-mem-" + uuid.uuid4().hex[:6]
    created = await kube.create(
        export_manifest(name, namespace, {"source": {"memory": {}}, "size": "64Mi"})
    )
    # Defaults come from the API server, not from the operator.
    assert created["spec"]["accessMode"] == "ReadWriteOnce"
    try:

        async def ready() -> Any:
            obj = await kube.get("NBDExport", namespace, name)
            return obj if (obj or {}).get("status", {}).get("phase") == "Ready" else None

        obj = await eventually(ready, f"NBDExport {name} to be Ready")
        assert obj["status"]["uri"] == f"nbd://{name}-nbd.{namespace}.svc:10809/{name}"
        assert obj["status"]["sizeBytes"] == 64 * 2**20  # kept by the schema: the Size column
        assert "reason" not in obj["status"]  # the Reason column is empty when Ready

        # The source is immutable: the API server's CEL transition rule says so.
        with pytest.raises(KubeError) as info:
            host = {"nodeName": "x", "path": "/dev/x"}
            change = {"spec": {"source": {"memory": None, "hostDevice": host}}}
            await kube.patch("NBDExport", namespace, name, change)
        assert info.value.status == 422
    finally:
        await kube.delete("NBDExport", namespace, name)

    async def gone() -> bool:
        dep = await kube.get("Deployment", namespace, f"{name}-nbd")
        return dep is None and await kube.get("NBDExport", namespace, name) is None

    await eventually(gone, f"NBDExport {name} and its Deployment to be gone")


async def test_deletion_waits_for_an_attachment_lease(kube: Kube, namespace: str) -> None:
    import nbd_api

    name = "e2e-att-" + uuid.uuid4().hex[:6]
    # A real node: the operator removes Leases whose holder has no Node object.
    node = (await kube.list("Node", ""))[0]["metadata"]["name"]
    await kube.create(export_manifest(name, namespace, {"source": {"memory": {}}, "size": "64Mi"}))
    lease = nbd_api.attachment_lease(namespace, name, node, "/dev/nbd9", "ReadWrite")
    await kube.create(lease)
    await kube.delete("NBDExport", namespace, name)

    async def blocked() -> Any:
        obj = await kube.get("NBDExport", namespace, name)
        return obj if (obj or {}).get("status", {}).get("phase") == "Terminating" else None

    obj = await eventually(blocked, "deletion to be blocked by the attachment")
    assert node in obj["status"]["message"]
    await kube.delete("Lease", namespace, lease["metadata"]["name"])

    async def gone() -> bool:
        return await kube.get("NBDExport", namespace, name) is None

    await eventually(gone, f"NBDExport {name} to be deleted after detach")


async def test_a_lease_of_a_node_that_does_not_exist_is_removed(kube: Kube, namespace: str) -> None:
    import nbd_api

    name = "e2e-gc-" + uuid.uuid4().hex[:6]
    await kube.create(export_manifest(name, namespace, {"source": {"memory": {}}, "size": "64Mi"}))
    lease = nbd_api.writer_lease(namespace, name, "e2e-no-such-node-" + uuid.uuid4().hex[:6])
    await kube.create(lease)

    async def lease_gone() -> bool:
        return await kube.get("Lease", namespace, lease["metadata"]["name"]) is None

    try:
        await eventually(lease_gone, "the operator to delete the vanished node's Lease")
    finally:
        await kube.delete("Lease", namespace, lease["metadata"]["name"])
        await kube.delete("NBDExport", namespace, name)
