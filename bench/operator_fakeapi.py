"""An in-memory Kubernetes API server, fast enough to measure the operator rather than itself.

Why it exists: bench/operator_scale.py runs the real ``nbd-operator`` at hundreds of exports;
kmock (the tests' substitute) takes 15-100 ms per request and grows with the object count.
This keeps objects in dicts keyed by (namespace, name) per resource and one event history per
resource, and serves exactly what kopf and the operator use: discovery, list (label equality
selectors), watch (from a list's resourceVersion, or the current objects), get, create, merge
patch (a resourceVersion in it is a precondition), JSON patch (with kopf's resourceVersion
``test``), the status subresource, generation bumps on spec changes, finalizers and deletion,
Events.

What it must not do: pretend to be Kubernetes in tests (admission, RBAC, defaults, garbage
collection and controllers are absent), or be used outside the benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import time
import uuid
from typing import Any

from aiohttp import web

NS = "bench"
# (group, version, plural, kind, namespaced, has status subresource)
RESOURCES = [
    ("nbd.dev", "v1alpha1", "nbdexports", "NBDExport", True, True),
    ("apps", "v1", "deployments", "Deployment", True, True),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, True),
    ("", "v1", "services", "Service", True, False),
    ("", "v1", "secrets", "Secret", True, False),
    ("", "v1", "nodes", "Node", False, False),
    ("", "v1", "namespaces", "Namespace", False, False),
    ("", "v1", "events", "Event", True, False),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, False),
    ("coordination.k8s.io", "v1", "leases", "Lease", True, False),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        False,
    ),
]
BY_PLURAL = {r[2]: r for r in RESOURCES}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class PatchTestFailed(Exception):
    pass


def json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902: test, add, replace, remove (what kopf sends)."""
    obj = copy.deepcopy(obj)
    for op in ops:
        keys = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent: Any = obj
        for k in keys[:-1]:
            parent = parent[int(k)] if isinstance(parent, list) else parent[k]
        last = keys[-1]
        if op["op"] == "test":
            have = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if have != op.get("value"):
                raise PatchTestFailed(op["path"])
        elif op["op"] in ("add", "replace"):
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
    return obj


class FastApi:
    """Objects by plural -> {(namespace, name): object}; a history per plural for watches."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = {
            r[2]: {} for r in RESOURCES
        }
        self.history: dict[str, list[tuple[int, str | None, bytes]]] = {r[2]: [] for r in RESOURCES}
        self.version = 0
        self.changed = asyncio.Condition()
        self.requests = 0
        self.watching: set[str] = set()
        self.provisioning_at: dict[str, float] = {}  # export name -> monotonic time
        self.created_at: dict[str, float] = {}

    # ------------------------------------------------------------------ the store
    def _emit(self, plural: str, kind: str, obj: dict[str, Any]) -> None:
        event = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
        self.history[plural].append((self.version, obj["metadata"].get("namespace"), event))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def create(self, plural: str, ns: str | None, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if ns is not None:
            meta["namespace"] = ns
        key = (ns, meta["name"])
        if key in self.objects[plural]:
            raise web.HTTPConflict(
                text=json.dumps({"reason": "AlreadyExists", "message": "exists"})
            )
        self.version += 1
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(self.version), generation=1)
        meta["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.objects[plural][key] = obj
        self._emit(plural, "ADDED", obj)
        if plural == "nbdexports":
            self.created_at[meta["name"]] = time.monotonic()
        return obj

    def write(self, plural: str, key: tuple[str | None, str], new: dict[str, Any], sub: str | None):
        old = self.objects[plural][key]
        if BY_PLURAL[plural][5]:  # the status subresource separates status from the rest
            if sub == "status":
                new = {**old, "status": new.get("status")}
            else:
                new = {**new, "status": old.get("status")}
        new = {k: v for k, v in new.items() if v is not None}
        meta = new["metadata"] = dict(new["metadata"])
        if new.get("spec") != old.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del self.objects[plural][key]
            self._emit(plural, "DELETED", new)
            return new
        self.objects[plural][key] = new
        self._emit(plural, "MODIFIED", new)
        if plural == "nbdexports" and sub == "status":
            phase = (new.get("status") or {}).get("phase")
            if phase == "Provisioning" and key[1] not in self.provisioning_at:
                self.provisioning_at[key[1]] = time.monotonic()
        return new

    def delete(self, plural: str, key: tuple[str | None, str]) -> dict[str, Any]:
        obj = self.objects[plural][key]
        if obj["metadata"].get("finalizers"):
            stamped = merge_patch(obj, {"metadata": {"deletionTimestamp": "now"}})
            return self.write(plural, key, stamped, None)
        self.version += 1
        del self.objects[plural][key]
        self._emit(plural, "DELETED", obj)
        return obj

    # ------------------------------------------------------------------ HTTP
    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        parts = [p for p in request.path.split("/") if p]
        if parts == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            groups = sorted({(g, v) for g, v, *_ in RESOURCES if g})
            return web.json_response(
                {
                    "kind": "APIGroupList",
                    "groups": [
                        {
                            "name": g,
                            "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                            "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                        }
                        for g, v in groups
                    ],
                }
            )
        group, version, rest = (
            ("", parts[1], parts[2:]) if parts[0] == "api" else (parts[1], parts[2], parts[3:])
        )
        if not rest:
            listed = [r for r in RESOURCES if (r[0], r[1]) == (group, version)]
            resources = [
                {
                    "name": p + sub,
                    "singularName": "",
                    "namespaced": n,
                    "kind": k,
                    "verbs": ["get", "list", "watch", "create", "patch", "delete"],
                }
                for _, _, p, k, n, s in listed
                for sub in ("", "/status")[: 1 + s]
            ]
            return web.json_response(
                {
                    "kind": "APIResourceList",
                    "groupVersion": f"{group}/{version}".lstrip("/"),
                    "resources": resources,
                }
            )
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        try:
            return await self._resource(request, plural, ns, name, sub)
        except KeyError:
            return web.json_response({"reason": "NotFound", "message": "not found"}, status=404)
        except PatchTestFailed:
            return web.json_response({"reason": "Invalid", "message": "test failed"}, status=422)

    async def _resource(
        self, request: web.Request, plural: str, ns: str | None, name: str | None, sub: str | None
    ) -> web.StreamResponse:
        kind = BY_PLURAL[plural][3]
        if name is None and request.method == "GET":
            if request.query.get("watch") in ("true", "1"):
                return await self._watch(request, plural, ns)
            items = [o for (n, _), o in self.objects[plural].items() if ns is None or n == ns]
            items = [o for o in items if _selects(request.query.get("labelSelector"), o)]
            return web.json_response(
                {
                    "kind": f"{kind}List",
                    "apiVersion": "v1",
                    "items": items,
                    "metadata": {"resourceVersion": str(self.version)},
                }
            )
        if request.method == "POST":
            obj = self.create(plural, ns, await request.json())
            await self._notify()
            return web.json_response(obj, status=201)
        key = (ns, str(name))
        if request.method == "GET":
            return web.json_response(self.objects[plural][key])
        if request.method == "DELETE":
            obj = self.delete(plural, key)
            await self._notify()
            return web.json_response(obj)
        body = await request.json()
        old = self.objects[plural][key]
        if request.content_type == "application/json-patch+json":
            new = json_patch(old, body)
        else:
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
                return web.json_response({"reason": "Conflict", "message": "moved"}, status=409)
            new = merge_patch(old, body)
        obj = self.write(plural, key, new, sub)
        await self._notify()
        return web.json_response(obj)

    async def _watch(self, request: web.Request, plural: str, ns: str | None) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        self.watching.add(plural)
        await self._notify()
        since = int(request.query.get("resourceVersion") or 0)
        history = self.history[plural]
        start = len(history)
        if since == 0:  # no version: the current objects, as a real watch does
            for (obj_ns, _), obj in list(self.objects[plural].items()):
                if ns is None or obj_ns == ns:
                    await resp.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
        # Resume after ``since`` (scanning back from the end: a resume is from a recent list).
        while since and start > 0 and history[start - 1][0] > since:
            start -= 1
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds") or 3600)
        with contextlib.suppress(ConnectionResetError):  # the client went away
            await self._stream(resp, history, start, ns, deadline)
        return resp

    async def _stream(
        self,
        resp: web.StreamResponse,
        history: list[tuple[int, str | None, bytes]],
        start: int,
        ns: str | None,
        deadline: float,
    ) -> None:
        while time.monotonic() < deadline:
            for _, obj_ns, event in history[start:]:
                if ns is None or obj_ns == ns:
                    await resp.write(event)
            start = len(history)
            async with self.changed:
                try:
                    await asyncio.wait_for(
                        self.changed.wait_for(lambda n=start: len(history) > n),  # type: ignore[misc]
                        max(0.0, deadline - time.monotonic()),
                    )
                except TimeoutError:
                    break


def _selects(selector: str | None, obj: dict[str, Any]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if (k not in labels) if not v else labels.get(k) != v:
            return False
    return True


def app(api: FastApi) -> web.Application:
    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", api.handle)
    return application
