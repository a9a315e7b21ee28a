"""Runs the real operator (kopf's reactor, our registry) against a stateful API substitute.

Why it exists: no kube-apiserver can run here, so the operator tests talk HTTP to kmock's
``KubernetesEmulator`` (an in-memory API server by kopf's author). This module adds the few
behaviours of a real API server that the operator depends on and the emulator lacks (uid,
creationTimestamp, metadata.generation bumped on spec changes) and a condition variable that
tests wait on instead of sleeping. It also plays the controllers that do not exist here: it
marks Deployments available and claims Bound when a test says so.

What it must not do: reimplement the operator's logic, or pretend to be more than it is.
Everything it cannot prove (admission, CEL, garbage collection, real pods) is covered by the
e2e suite (tests/e2e/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp.test_utils
import aiohttp.web
import kmock
import kopf
from kmock._internal import rendering
from nbd_operator.config import OperatorConfig
from nbd_operator.handlers import build_registry, configure_settings
from nbd_operator.kube import Kube

NS = "storage"

RESOURCES: dict[str, dict[str, Any]] = {
    "nbd.dev/v1alpha1/nbdexports": {
        "kind": "NBDExport",
        "namespaced": True,
        "subresources": {"status"},
        "shortnames": {"nbdx"},
    },
    "apps/v1/deployments": {"kind": "Deployment", "namespaced": True, "subresources": {"status"}},
    "v1/persistentvolumeclaims": {"kind": "PersistentVolumeClaim", "namespaced": True},
    "v1/services": {"kind": "Service", "namespaced": True},
    "v1/secrets": {"kind": "Secret", "namespaced": True},
    "v1/nodes": {"kind": "Node", "namespaced": False},
    # kopf's backbone: it waits for these two to be discoverable before it watches anything.
    "v1/namespaces": {"kind": "Namespace", "namespaced": False},
    "apiextensions.k8s.io/v1/customresourcedefinitions": {
        "kind": "CustomResourceDefinition",
        "namespaced": False,
    },
    "v1/events": {"kind": "Event", "namespaced": True},
    "networking.k8s.io/v1/networkpolicies": {"kind": "NetworkPolicy", "namespaced": True},
    "coordination.k8s.io/v1/leases": {"kind": "Lease", "namespaced": True},
    # An image import's Job, and the pods the Job controller (played by the tests) starts.
    "batch/v1/jobs": {"kind": "Job", "namespaced": True, "subresources": {"status"}},
    "v1/pods": {"kind": "Pod", "namespaced": True, "subresources": {"status", "log"}},
    # What the CSI controller makes for a snapshot (no snapshot controller plays it here).
    "snapshot.storage.k8s.io/v1/volumesnapshots": {"kind": "VolumeSnapshot", "namespaced": True},
}
VERBS = {"get", "list", "watch", "create", "patch", "delete"}


class FakeApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus uid, creationTimestamp, generation, and change notifications."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.changed = asyncio.Condition()
        self._version = 0
        self._failures: dict[tuple[str, str], int] = {}
        self._history: list[tuple[int, Any, dict[str, Any]]] = []
        # What each pod's containers wrote: (namespace, pod, container) -> lines.
        self.pod_logs: dict[tuple[str, str, str], list[str]] = {}
        server = self

        class RecordingBus(kmock.Bus[Any]):
            """Keeps every event with the version it was sent at (for resumed watches)."""

            resource: Any = None

            async def put(self, item: Any) -> None:
                server._history.append((server._version, self.resource, item))
                await super().put(item)

        def bus_for(resource: Any) -> RecordingBus:
            bus = RecordingBus()
            bus.resource = resource
            return bus

        self._buses = _KeyedDefaultDict(bus_for)
        for key, info in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)

    def current(self, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The stored object as the API would return it now, or None."""
        for (res, ns, nm), obj in self.objects.items():
            if res.plural == plural and ns == namespace and nm == name and not obj.deleted:
                return dict(obj.raw)
        return None

    def all(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return [
            dict(obj.raw)
            for (res, ns, _), obj in self.objects.items()
            if res.plural == plural and (namespace is None or ns == namespace) and not obj.deleted
        ]

    def fail(self, method: str, plural: str, times: int = 1) -> None:
        """Make the next ``times`` such requests fail with HTTP 500 (nothing is stored)."""
        self._failures[(method.upper(), plural)] = times

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        key = (str(request.method.value if request.method else ""), "")
        if request.resource is not None:
            key = (key[0], request.resource.plural or "")
        if self._failures.get(key, 0) > 0:
            self._failures[key] -= 1
            raise kmock.KubernetesError(500, "InternalError", "injected by the test")
        if request.resource is not None and request.subresource == "log":
            return self._serve_log(request)
        data = request.data
        if request.resource is not None and isinstance(data, list):
            # A JSON patch (kopf's, with a resourceVersion "test" op). A failed test is HTTP 422
            # on a real server (kopf then re-reads and retries); the emulator would say 500.
            plural = request.resource.plural or ""
            old = self.current(plural, request.namespace, request.name or "") or {}
            have = old.get("metadata", {}).get("resourceVersion")
            rv_tests = [op for op in data if op.get("path") == "/metadata/resourceVersion"]
            if any(op.get("op") == "test" and op.get("value") != have for op in rv_tests):
                raise kmock.KubernetesError(422, "Invalid", "resourceVersion changed")
            self._version += 1
            value = str(self._version)
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": value})
        elif request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.UPDATE and request.subresource is None:
                # A resourceVersion in a patch is a precondition on a real server (409 when
                # the object moved on): what optimistic writers such as leader election rely on.
                wanted = (data.get("metadata") or {}).get("resourceVersion")
                plural = request.resource.plural or ""
                stored = self.current(plural, request.namespace, request.name or "")
                have = (stored or {}).get("metadata", {}).get("resourceVersion")
                if wanted is not None and stored is not None and wanted != have:
                    raise kmock.KubernetesError(409, "Conflict", "the object has been modified")
            if request.action == kmock.action.DELETE:
                self._version += 1
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                self._version += 1
                data.setdefault("metadata", {})["resourceVersion"] = str(self._version)
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                meta.setdefault("uid", str(uuid.uuid4()))
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = meta["generateName"] + meta["uid"][:5]
                now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                meta.setdefault("creationTimestamp", now)
                meta.setdefault("generation", 1)
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
            elif request.action == kmock.action.UPDATE and request.subresource is None:
                # A real API server bumps generation when, and only when, the spec changes.
                plural = request.resource.plural or ""
                before = self.current(plural, request.namespace, request.name or "")
                if (
                    before is not None
                    and "spec" in data
                    and not _contains(before.get("spec"), data["spec"])
                ):
                    generation = int(before.get("metadata", {}).get("generation", 1)) + 1
                    data.setdefault("metadata", {})["generation"] = generation
        try:
            return await super()._handle(request)
        finally:
            async with self.changed:
                self.changed.notify_all()

    def write_log(self, namespace: str, pod: str, container: str, *lines: str) -> None:
        """Play the container runtime: the container writes these lines to its stdout."""
        self.pod_logs.setdefault((namespace, pod, container), []).extend(lines)

    def _serve_log(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        """``GET pods/NAME/log`` as kube-apiserver answers it: plain text, ``tailLines`` and
        ``limitBytes`` (the first that many bytes of what is selected, a line may be cut) honoured;
        404 for a pod that does not exist, 400 for a container that has not started (the
        kubelet's "is waiting to start")."""
        namespace, name = request.namespace or "", request.name or ""
        pod = self.current("pods", namespace, name)
        if pod is None:
            raise kmock.KubernetesError(404, "NotFound", f'pods "{name}" not found')
        containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
        container = request.params.get("container") or (containers[0] if containers else "")
        if container not in containers:
            message = f"container {container} is not valid for pod {name}"
            raise kmock.KubernetesError(400, "BadRequest", message)
        lines = self.pod_logs.get((namespace, name, container))
        if lines is None:
            message = f'container "{container}" in pod "{name}" is waiting to start'
            raise kmock.KubernetesError(400, "BadRequest", message)
        tail = request.params.get("tailLines")
        shown = lines[-int(tail) :] if tail and int(tail) > 0 else ([] if tail else lines)
        body = "".join(f"{line}\n" for line in shown)
        if limit := request.params.get("limitBytes"):
            body = body.encode()[: int(limit)].decode(errors="ignore")
        return aiohttp.web.Response(text=body, content_type="text/plain")

    async def _serve_list(self, request: rendering.Request) -> Any:
        # A list is a consistent snapshot at a resourceVersion that a watch can resume from.
        # Read the version first: the snapshot may then be newer, and the watch resumed from
        # this version repeats an event or two (at least once), but never misses one.
        version = str(self._version)
        result: dict[str, Any] = dict(await super()._serve_list(request))  # type: ignore[arg-type]
        result["metadata"] = {"resourceVersion": version}
        return result

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        # The emulator replays all objects and then streams from the moment it subscribes, so a
        # write between a list and a watch is lost. A real watch resumes from the list's
        # resourceVersion; so does this one, from a history of every event it has sent.
        yield b""
        assert request.resource is not None
        resource, namespace = request.resource, request.namespace
        since = request.params.get("resourceVersion") or ""
        bus = self._buses[resource]

        def wanted(event: dict[str, Any]) -> bool:
            ns = event.get("object", {}).get("metadata", {}).get("namespace")
            return namespace is None or ns == namespace

        async with self._lock:
            mark = await bus.mark()
            if since.isdigit() and int(since) > 0:
                backlog = [e for v, r, e in self._history if r == resource and v > int(since)]
            else:
                backlog = [
                    {"type": "ADDED", "object": dict(obj.raw)}
                    for (res, _, _), obj in self.objects.items()
                    if res == resource and not obj.deleted
                ]
        try:
            for event in backlog:
                if wanted(event):
                    yield event
            async for event in bus.stream(since=mark):
                if wanted(event):
                    yield event
        finally:
            await bus.unmark(mark)

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` is truthy after some request; fail after ``timeout``."""
        async with self.changed:
            return await asyncio.wait_for(self.changed.wait_for(predicate), timeout)


class _KeyedDefaultDict(dict[Any, Any]):
    def __init__(self, factory: Callable[[Any], Any]) -> None:
        super().__init__()
        self._factory = factory

    def __missing__(self, key: Any) -> Any:
        value = self[key] = self._factory(key)
        return value


def _contains(current: Any, patch: Any) -> bool:
    if isinstance(patch, dict):
        return isinstance(current, dict) and all(
            (k not in current) if v is None else (k in current and _contains(current[k], v))
            for k, v in patch.items()
        )
    return bool(current == patch)


@contextlib.asynccontextmanager
async def api_server() -> AsyncIterator[tuple[FakeApiServer, Kube]]:
    """The substitute API server on a free local port, and a client for the test's own acts."""
    # Cancel a server-side handler when its client disconnects (as kube-apiserver ends a watch):
    # otherwise kopf's shutdown waits 5 s for the emulator's abandoned watch streams. (It counts
    # every task started after it as its own, so the test's client keeps no idle connections.)
    http = functools.partial(aiohttp.test_utils.RawTestServer, handler_cancellation=True)
    async with FakeApiServer() as server, kmock.Server(server, server_cls=http):  # type: ignore[arg-type]
        client = Kube(kopf.ConnectionInfo(server=str(server.url).rstrip("/")), keepalive=False)
        try:
            yield server, client
        finally:
            await client.close()


@contextlib.asynccontextmanager
async def running_operator(
    server: FakeApiServer, **config: Any
) -> AsyncIterator[asyncio.Task[None]]:
    """The operator, for real: kopf's reactor with our registry, until the block ends."""
    cfg = OperatorConfig(**{"retry_delay": 0.3, "detach_poll_delay": 0.3, **config})
    info = kopf.ConnectionInfo(server=str(server.url).rstrip("/"))
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    settings.posting.level = 100  # Events come from our own kopf.event calls only
    settings.watching.reconnect_backoff = 0.05
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=build_registry(cfg, info),
            settings=settings,
            clusterwide=True,
            standalone=True,
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


def export(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nbd.dev/v1alpha1",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


async def mark_available(client: Kube, name: str) -> None:
    """Play the Deployment controller and kubelet: one ready replica of the current template."""
    dep = await client.get("Deployment", NS, name)
    assert dep is not None, f"Deployment {name} does not exist"
    gen = dep["metadata"].get("generation", 1)
    status = {
        "observedGeneration": gen,
        "replicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
    }
    await client.patch("Deployment", NS, name, {"status": status}, subresource="status")


async def start_server_pod(server: FakeApiServer, client: Kube, name: str, log: str) -> str:
    """Play the ReplicaSet controller and the kubelet for Deployment ``name``: a Ready pod of its
    template whose nbdserver container wrote ``log`` (its stderr); returns the pod's name."""
    dep = await client.get("Deployment", NS, name)
    assert dep is not None, f"Deployment {name} does not exist"
    template = dep["spec"]["template"]
    pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": NS,
            "labels": dict((template.get("metadata") or {}).get("labels") or {}),
        },
        "spec": template["spec"],
    }
    await client.create(pod)
    server.write_log(NS, pod_name, "nbdserver", *log.splitlines())
    ready = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    await client.patch("Pod", NS, pod_name, {"status": ready}, subresource="status")
    return pod_name


async def add_node(client: Kube, name: str) -> None:
    """A Node object (the operator checks that Lease holders and host-device nodes exist)."""
    await client.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})


async def bind_claim(client: Kube, name: str, capacity: str | None = None) -> None:
    """Play the PV controller: the claim is Bound (with the capacity it asked for)."""
    pvc = await client.get("PersistentVolumeClaim", NS, name)
    assert pvc is not None, f"PersistentVolumeClaim {name} does not exist"
    storage = capacity or pvc["spec"]["resources"]["requests"]["storage"]
    status = {"phase": "Bound", "capacity": {"storage": storage}}
    await client.patch("PersistentVolumeClaim", NS, name, {"status": status}, subresource="status")


def condition(obj: dict[str, Any] | None, ctype: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return dict(cond)
    return {}


class JobController:
    """Plays the Job controller and the kubelet for one Job: starts its pods (labelled and owned
    as the real controller does), lets their container write lines, ends them, and keeps the
    Job's status counters and conditions as the controller writes them."""

    def __init__(self, server: FakeApiServer, client: Kube, name: str) -> None:
        self.server, self.client, self.name = server, client, name
        self.failed = 0
        self.pod: str | None = None

    async def job(self) -> dict[str, Any]:
        job = await self.client.get("Job", NS, self.name)
        assert job is not None, f"Job {self.name} does not exist"
        return job

    async def start_pod(self) -> str:
        """A new attempt: a Running pod of the Job's template (its container not started)."""
        job = await self.job()
        uid = job["metadata"]["uid"]
        template = job["spec"]["template"]
        name = f"{self.name}-{uuid.uuid4().hex[:5]}"
        labels = {
            **(template.get("metadata") or {}).get("labels", {}),
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": self.name,
            "controller-uid": uid,
            "job-name": self.name,
        }
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": self.name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "labels": labels,
                "ownerReferences": [owner],
            },
            "spec": template["spec"],
        }
        await self.client.create(pod)
        await self._pod_phase(name, "Running")
        self.pod = name
        await self._job_status(active=1)
        return name

    def write(self, *lines: str) -> None:
        """The current pod's container writes these lines (its stdout)."""
        assert self.pod is not None
        self.server.write_log(NS, self.pod, "importer", *lines)

    async def pod_failed(self) -> None:
        assert self.pod is not None
        await self._pod_phase(self.pod, "Failed")
        self.failed += 1
        await self._job_status(active=0)

    async def give_up(self, reason: str = "BackoffLimitExceeded") -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {
            "type": "Failed",
            "status": "True",
            "reason": reason,
            "message": "Job has reached the specified backoff limit",
            "lastTransitionTime": now,
        }
        await self._job_status(active=0, conditions=[cond])

    async def succeed(self) -> None:
        assert self.pod is not None
        await self._pod_phase(self.pod, "Succeeded")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        cond = {"type": "Complete", "status": "True", "lastTransitionTime": now}
        await self._job_status(active=0, succeeded=1, conditions=[cond])

    async def _pod_phase(self, name: str, phase: str) -> None:
        await self.client.patch("Pod", NS, name, {"status": {"phase": phase}}, subresource="status")

    async def _job_status(self, **fields: Any) -> None:
        status: dict[str, Any] = {"failed": self.failed, **fields}
        await self.client.patch("Job", NS, self.name, {"status": status}, subresource="status")
