"""Fixtures of the node-side e2e tests (test_csi_e2e.py, test_csi_provisioning_e2e.py): the
namespace, a client that skips unless the chart's CSIDriver is installed, and the tracker that
deletes what a test made."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

import kopf
import nbd_api
import pytest
from nbd_operator.kube import KubeError

from tests.e2e.e2e_support import E2EKube, Made


@pytest.fixture
def namespace() -> str:
    return os.environ.get("NBD_E2E_NAMESPACE", "default")


@pytest.fixture
async def kube(namespace: str) -> AsyncIterator[E2EKube]:
    settings = kopf.OperatorSettings()
    info = await kopf.login_via_async_client(logger=logging.getLogger("e2e"), settings=settings)
    if info is None:
        pytest.skip("kubeconfig present but unusable (kubernetes_asyncio could not load it)")
    client = E2EKube(info)
    try:
        try:
            await client.list("NBDExport", namespace)  # 404 when the CRD is not installed
            driver = await client.get("CSIDriver", None, nbd_api.CSI_DRIVER)
        except (KubeError, OSError) as exc:
            pytest.skip(f"cluster not reachable or the NBDExport CRD is not installed: {exc}")
        if driver is None:
            pytest.skip(
                f"CSIDriver {nbd_api.CSI_DRIVER} not installed: install the chart "
                "(tests/e2e/README.md) for the node-side tests"
            )
        yield client
    finally:
        await client.close()


@pytest.fixture
async def made(kube: E2EKube) -> AsyncIterator[Made]:
    tracker = Made(kube)
    try:
        yield tracker
    finally:
        await tracker.cleanup()
