"""The operator's one door to the Kubernetes API (kopf watches through its own).

Why it exists: kopf watches objects and patches the ones it handles, but it does not create or
delete other objects. This small client does, over the same connection kopf logged in with (a
``kopf.ConnectionInfo``: in-cluster service account, kubeconfig, or a test server), so there is
exactly one way the operator authenticates.

Updates are JSON merge patches (RFC 7386). They are understood by every API server, and by the
in-memory API substitute the tests run against; a merge patch replaces lists wholesale, which is
what the operator wants for containers, volumes and tolerations.

What it must not do: decide anything about exports. It maps HTTP failures to ``KubeError``
(``NotFound``, ``Conflict``) and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar
from urllib.parse import quote

import aiohttp
import kopf
from nbd_api import API_VERSION, KIND, PLURAL

# kind -> (API prefix, plural). Only what the operator touches; unknown kinds are a bug.
RESOURCES: dict[str, tuple[str, str]] = {
    KIND: (f"apis/{API_VERSION}", PLURAL),
    "Deployment": ("apis/apps/v1", "deployments"),
    "Service": ("api/v1", "services"),
    "PersistentVolumeClaim": ("api/v1", "persistentvolumeclaims"),
    "Secret": ("api/v1", "secrets"),
    "NetworkPolicy": ("apis/networking.k8s.io/v1", "networkpolicies"),
    "Lease": ("apis/coordination.k8s.io/v1", "leases"),
    "Node": ("api/v1", "nodes"),
    "Job": ("apis/batch/v1", "jobs"),
    "Pod": ("api/v1", "pods"),
}
CLUSTER_SCOPED = {"Node"}
MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    """The API server refused a request."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Kube:
    """A few verbs on namespaced objects, with the operator's credentials."""

    # The kinds this client can address (kind -> (API prefix, plural)) and which of them are
    # cluster-scoped; class attributes so a test client can widen them without copying ``_url``.
    resources: ClassVar[Mapping[str, tuple[str, str]]] = RESOURCES
    cluster_scoped: ClassVar[AbstractSet[str]] = CLUSTER_SCOPED

    def __init__(self, info: kopf.ConnectionInfo, *, keepalive: bool = True) -> None:
        self._server = info.server.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), force_close=not keepalive),
            headers={**info.as_http_headers(), "User-Agent": "nbd-operator"},
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    def _url(
        self, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None
    ) -> str:
        prefix, plural = self.resources[kind]
        parts = [self._server, prefix]
        if kind not in self.cluster_scoped:
            assert namespace, f"{kind} is namespaced"
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(plural)
        if name is not None:
            parts.append(quote(name, safe=""))
        if sub is not None:
            parts.append(sub)
        return "/".join(parts)

    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(
            method, url, data=data, headers=headers, params=params
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    payload = json.loads(text)
                except ValueError:
                    payload = {}
                reason = str(payload.get("reason") or resp.reason or "")
                message = str(payload.get("message") or text[:200])
                cls = {404: NotFound, 409: Conflict}.get(resp.status, KubeError)
                raise cls(resp.status, reason, message)
            return json.loads(text) if text else {}

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self._request("GET", self._url(kind, namespace, name))
        except NotFound:
            return None
        return result

    async def log(
        self,
        namespace: str,
        pod: str,
        container: str,
        *,
        tail_lines: int | None = None,
        limit_bytes: int | None = None,
    ) -> str:
        """What a pod's container wrote (``pods/log``, plain text): its last ``tail_lines``
        lines, or without them the start, up to ``limit_bytes``."""
        url = self._url("Pod", namespace, pod, "log")
        params = {"container": container}
        if tail_lines is not None:
            params["tailLines"] = str(tail_lines)
        if limit_bytes is not None:
            params["limitBytes"] = str(limit_bytes)
        async with self._session.get(url, params=params) as resp:
            text = await resp.text()
            if resp.status >= 400:
                # A container not started yet is HTTP 400 ("is waiting to start").
                cls = {404: NotFound, 409: Conflict}.get(resp.status, KubeError)
                raise cls(resp.status, str(resp.reason or ""), text[:200])
            return text

    async def list(
        self, kind: str, namespace: str, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        params = {}
        if labels:
            params["labelSelector"] = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        result = await self._request("GET", self._url(kind, namespace), params=params)
        items = list(result.get("items") or [])
        if labels:
            # Not every server honours labelSelector (the test substitute does not): filter again.
            items = [
                i
                for i in items
                if all(
                    (i.get("metadata", {}).get("labels") or {}).get(k) == v
                    for k, v in labels.items()
                )
            ]
        return items

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        url = self._url(obj["kind"], meta.get("namespace"))
        result: dict[str, Any] = await self._request("POST", url, body=obj)
        return result

    async def patch(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        url = self._url(kind, namespace, name, subresource)
        result: dict[str, Any] = await self._request(
            "PATCH", url, body=patch, content_type=MERGE_PATCH
        )
        return result

    async def delete(
        self, kind: str, namespace: str | None, name: str, *, uid: str | None = None
    ) -> bool:
        """Delete (background for owned dependants); False when it was already gone, or when
        ``uid`` is given and the object of that name is now another one (a precondition)."""
        body: dict[str, Any] = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
        }
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            await self._request("DELETE", self._url(kind, namespace, name), body=body)
        except NotFound:
            return False
        except Conflict:
            if uid is None:
                raise
            return False
        return True

    async def ensure(
        self, obj: Mapping[str, Any], *, prune: tuple[tuple[str, ...], ...] = ()
    ) -> tuple[dict[str, Any], str]:
        """Create the object or bring it to the desired state: "created", "updated" or "unchanged".

        ``prune`` names maps whose keys the desired object may drop (a merge patch only adds
        and overwrites keys; dropped ones are sent as null so they go away).
        """
        meta = obj["metadata"]
        current = await self.get(obj["kind"], meta.get("namespace"), meta["name"])
        if current is None:
            try:
                return await self.create(obj), "created"
            except Conflict:  # created concurrently (another handler): fall through and patch
                current = await self.get(obj["kind"], meta.get("namespace"), meta["name"]) or {}
        patch: dict[str, Any] = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        for path in prune:
            stale = _dig(current, path)
            wanted = _dig(obj, path)
            drop = {k: None for k in stale if k not in wanted}
            if drop:
                _put(patch, path, {**wanted, **drop})
        if contains(current, patch):
            return current, "unchanged"
        updated = await self.patch(obj["kind"], meta.get("namespace"), meta["name"], patch)
        return updated, "updated"


def _dig(obj: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, Mapping) else None
    return dict(node) if isinstance(node, Mapping) else {}


def _put(obj: dict[str, Any], path: tuple[str, ...], value: dict[str, Any]) -> None:
    node = obj
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def contains(current: Any, desired: Any) -> bool:
    """True when ``current`` already holds everything ``desired`` says (server defaults aside).

    A null in ``desired`` means "absent". Lists must match item by item (a merge patch would
    replace them), maps only on the keys ``desired`` names.
    """
    if isinstance(desired, Mapping):
        if not isinstance(current, Mapping):
            return False
        return all(
            (k not in current) if v is None else (k in current and contains(current[k], v))
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(current) == len(desired)
            and all(contains(c, d) for c, d in zip(current, desired, strict=True))
        )
    return bool(current == desired)
