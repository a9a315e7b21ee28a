"""The kopf registry: which events run which reconciliation, and how failures map to kopf.

Why it exists: kopf decides when to act; this module wires its triggers (an export created,
changed, resumed or deleted; a server Deployment, a claim or an attachment Lease changed) to the
``reconcile`` functions, and is the one place where our errors become kopf's Temporary/Permanent
errors. Handlers are built on a fresh ``OperatorRegistry`` per call, so tests and the command
line run the same wiring without module-level state.

What it must not do: build manifests, compute status or call the API itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf
from nbd_api import FINALIZER, GROUP, KIND, LABEL_EXPORT, PLURAL, VERSION

from nbd_operator import lease_gc, login, reconcile
from nbd_operator.config import OperatorConfig
from nbd_operator.kube import Kube, KubeError
from nbd_operator.spec import MANAGED_BY

LOG = logging.getLogger("nbd_operator")


def configure_settings(settings: kopf.OperatorSettings) -> None:
    """Our own finalizer and annotation prefix (nbd.dev), and progress kept out of status.

    The CRD's status schema has no room for kopf's bookkeeping (the API server would prune it,
    and kopf would then redo finished work), so progress and the diff base live in annotations.
    """
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.reporting_component = "nbd-operator"
    settings.posting.event_name_prefix = "nbd-operator-"


class Runtime:
    """The per-process state the handlers share: settings, the API client, per-export locks."""

    def __init__(self, config: OperatorConfig, connection: kopf.ConnectionInfo | None) -> None:
        self.config = config
        self.connection = connection
        self.kube: Kube | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Per export: how many attachment-Lease events the watch has delivered. A deletion
        # waiting for nodes to detach waits for this to move instead of on a retry timer.
        self._lease_events: dict[tuple[str, str], int] = {}
        self._lease_moved = asyncio.Condition()

    def ctx(self) -> reconcile.Ctx:
        if self.kube is None:
            raise kopf.TemporaryError("not logged in yet", delay=1)
        return reconcile.Ctx(self.kube, self.config)

    @contextlib.asynccontextmanager
    async def locked(self, namespace: str, name: str) -> AsyncIterator[reconcile.Ctx]:
        """One reconciliation per export at a time: a child's refresh must not interleave
        with a sync and write an older view of the children last."""
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        async with lock:
            yield self.ctx()

    def lease_mark(self, namespace: str, name: str) -> int:
        return self._lease_events.get((namespace, name), 0)

    async def lease_event(self, namespace: str, name: str) -> None:
        async with self._lease_moved:
            key = (namespace, name)
            self._lease_events[key] = self._lease_events.get(key, 0) + 1
            self._lease_moved.notify_all()

    async def wait_lease_event(self, namespace: str, name: str, mark: int, timeout: float) -> bool:
        """True once a Lease event for the export arrived after ``mark``; False on timeout."""
        key = (namespace, name)
        async with self._lease_moved:
            try:
                await asyncio.wait_for(
                    self._lease_moved.wait_for(lambda: self._lease_events.get(key, 0) != mark),
                    timeout,
                )
            except TimeoutError:
                return False
        return True

    async def login(self, info: kopf.ConnectionInfo) -> None:
        old, self.kube = self.kube, Kube(info)
        if old is not None:
            await old.close()

    async def close(self) -> None:
        if self.kube is not None:
            await self.kube.close()
            self.kube = None


def _to_kopf(exc: Exception, config: OperatorConfig) -> Exception:
    """The one mapping of our failures to kopf's retry semantics."""
    if isinstance(exc, reconcile.InvalidSpec):
        return kopf.PermanentError(exc.message)
    if isinstance(exc, reconcile.InputMissing):
        return kopf.TemporaryError(exc.message, delay=config.retry_delay)
    if isinstance(exc, KubeError):
        return kopf.TemporaryError(f"Kubernetes API: {exc}", delay=config.retry_delay)
    return exc


def _reraise(exc: Exception, config: OperatorConfig) -> None:
    mapped = _to_kopf(exc, config)
    if mapped is exc:
        raise exc
    raise mapped from exc


def importing(spec: Mapping[str, Any], status: Mapping[str, Any], **_: Any) -> bool:
    """An image import that has neither succeeded nor given up: its progress is worth reading."""
    image = (spec.get("source") or {}).get("image")
    if not image or image.get("mode", "import") != "import":
        return False
    return ((status or {}).get("import") or {}).get("phase") not in ("Succeeded", "Failed")


def build_registry(
    config: OperatorConfig,
    connection: kopf.ConnectionInfo | None = None,
    source: login.LoginSource | None = None,
) -> kopf.OperatorRegistry:
    """All handlers on a new registry. Logs in from ``source`` (default: ``login``'s order);
    ``connection`` overrides the login (tests)."""
    registry = kopf.OperatorRegistry()
    rt = Runtime(config, connection)
    owned: dict[str, Any] = {"app.kubernetes.io/managed-by": MANAGED_BY}

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_settings(settings)

    @kopf.on.login(registry=registry)
    async def log_in(**_: Any) -> kopf.ConnectionInfo:
        info = rt.connection
        if info is None:
            info = await login.connection_info(source or login.default_source())
        await rt.login(info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await rt.close()

    @kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)
    async def reconcile_export(
        body: kopf.Body, namespace: str | None, name: str | None, **_: Any
    ) -> None:
        async with rt.locked(str(namespace), str(name)) as ctx:
            try:
                await reconcile.sync(ctx, body)
            except Exception as exc:
                _reraise(exc, config)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    async def delete_export(
        body: kopf.Body, namespace: str | None, name: str | None, **_: Any
    ) -> None:
        ns, export_name = str(namespace), str(name)
        current: Mapping[str, Any] = body
        while True:
            mark = rt.lease_mark(ns, export_name)
            async with rt.locked(ns, export_name) as ctx:
                try:
                    await reconcile.finalize(ctx, current)
                    return
                except reconcile.DetachPending as exc:
                    pending = exc
                except Exception as exc:
                    _reraise(exc, config)
            # Nodes still attached: wait (outside the lock) for the Lease watch to report a
            # change, so a detach finishes the deletion at once. A lost watch event is caught
            # by the timeout: then kopf retries the handler shortly (the slow fallback).
            if not await rt.wait_lease_event(ns, export_name, mark, config.detach_poll_delay):
                raise kopf.TemporaryError(pending.message, delay=min(1.0, config.detach_poll_delay))
            fresh = await rt.ctx().kube.get(KIND, ns, export_name)
            if fresh is None:
                return
            current = fresh

    async def owner_changed(namespace: str, export_name: str, *, resync: bool) -> None:
        """A child or a Lease changed: recompute the owner's status (re-create on drift)."""
        async with rt.locked(namespace, export_name) as ctx:
            body = await ctx.kube.get(KIND, namespace, export_name)
            if body is None:
                return
            deleting = bool(body.get("metadata", {}).get("deletionTimestamp"))
            try:
                if resync and not deleting:
                    await reconcile.sync(ctx, body)
                else:
                    await reconcile.refresh(ctx, body)
            except reconcile.ExportError as exc:
                # Reported in status already; the export's own handler retries.
                LOG.info("export %s/%s: %s", namespace, export_name, exc)
            except KubeError as exc:
                # Typically the export vanished between the read and the status write (its
                # deletion just finished); its own handler owns any real failure.
                LOG.info("export %s/%s: status not refreshed: %s", namespace, export_name, exc)

    async def child_changed(
        labels: Mapping[str, str], namespace: str | None, *, resync: bool = False
    ) -> None:
        if (export_name := labels.get(LABEL_EXPORT)) is not None and namespace is not None:
            await owner_changed(namespace, export_name, resync=resync)

    @kopf.on.event("apps", "v1", "deployments", labels=owned, registry=registry)
    async def server_changed(
        type: str, labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        # A deleted server Deployment is drift: put it back (unless the export is going away).
        await child_changed(labels, namespace, resync=type == "DELETED")

    @kopf.on.event("batch", "v1", "jobs", labels=owned, registry=registry)
    async def import_job_changed(
        labels: Mapping[str, str], namespace: str | None, **_: Any
    ) -> None:
        # An import that finished starts the server now, not at the next progress reading; a
        # failed Job deleted by hand is started again.
        await child_changed(labels, namespace, resync=True)

    @kopf.timer(
        GROUP,
        VERSION,
        PLURAL,
        interval=config.import_poll_interval,
        when=importing,
        registry=registry,
    )
    async def import_progress(
        body: kopf.Body, namespace: str | None, name: str | None, **_: Any
    ) -> None:
        """Reads the importer's progress into status.import while an import runs (pod logs
        have no watch; this timer is the one poll of the operator)."""
        if body.get("metadata", {}).get("deletionTimestamp"):
            return
        await owner_changed(str(namespace), str(name), resync=True)

    @kopf.on.event("", "v1", "persistentvolumeclaims", labels=owned, registry=registry)
    async def claim_changed(labels: Mapping[str, str], namespace: str | None, **_: Any) -> None:
        await child_changed(labels, namespace)

    ours: dict[str, Any] = {LABEL_EXPORT: kopf.PRESENT}

    leases = lease_gc.LeaseIndex()

    @kopf.on.event("coordination.k8s.io", "v1", "leases", labels=ours, registry=registry)
    async def lease_changed(
        type: str,
        body: kopf.Body,
        labels: Mapping[str, str],
        namespace: str | None,
        **_: Any,
    ) -> None:
        leases.seen(type, body)
        if (export_name := labels.get(LABEL_EXPORT)) is not None and namespace is not None:
            await rt.lease_event(namespace, export_name)  # wakes a waiting deletion first
        if type != "DELETED" and await _collect(body):
            return  # its DELETED event follows and refreshes the export
        await child_changed(labels, namespace)

    @kopf.on.event("", "v1", "nodes", registry=registry)
    async def node_changed(type: str, name: str | None, **_: Any) -> None:
        # A node left the cluster: the Leases it held can never be released by its agent.
        if type == "DELETED" and name:
            for lease in leases.held_by(name):
                await _collect(lease)

    async def _collect(lease: Mapping[str, Any]) -> bool:
        try:
            return await lease_gc.collect(rt.ctx().kube, lease)
        except KubeError as exc:  # the next Lease or Node event tries again
            LOG.info("stale Lease check failed: %s", exc)
            return False

    return registry
