"""The CSI plugin's only conversation with the Kubernetes API: NBDExports and writer Leases.

Why it exists: two things on the node need the cluster. Resolving a volume needs the NBDExport's
status (``sources.ExportLookup``). Attaching a ReadWriteOnce export read-write needs a race-free
"one writer node" lock, which is a ``coordination.k8s.io/v1`` Lease per export, taken by *create*
(the API server lets exactly one create of a name succeed; everyone else gets 409 Conflict) and
given back by delete on unstage. The Lease's names and shape come from ``nbd_api.attachments``,
which the operator reads to show attachments.

The controller (``controller.py``) creates, lists, patches and deletes NBDExports through
``ExportStore`` (VolumeSnapshots through ``SnapshotStore``): a create is the API server's atomic
"first one wins", which is what makes two racing CreateVolume calls for one name end with one
export.

It is a small blocking HTTP client (stdlib ``urllib``): the node service runs in gRPC's thread
pool, the calls are few, and the in-cluster credentials are a token file and a CA file.

What it must not do: retry in loops (kubelet retries the CSI call with backoff), decide CSI
policy beyond mapping HTTP answers to CSI errors, or log tokens.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from nbd_api import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ExportStatus,
    attachment_lease,
    attachment_lease_name,
    writer_lease,
    writer_lease_name,
)

from nbd_agent.csi.errors import CsiError, FailedPrecondition, Internal, Unavailable

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"


class KubeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeApi:
    """Just enough of a Kubernetes REST client: JSON in, JSON out, one bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        ca_file: str | None = None,
        timeout: float = 10,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        """The pod's service account (what the agent's DaemonSet runs with)."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise RuntimeError("not in a cluster: KUBERNETES_SERVICE_HOST is unset")
        with open(f"{SA_DIR}/token") as token:
            bearer = token.read().strip()
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token=bearer, ca_file=f"{SA_DIR}/ca.crt")

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, merge: bool = False
    ) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            ctype = "application/merge-patch+json" if merge else "application/json"
            req.add_header("Content-Type", ctype)
        if self._token:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._ssl) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("message", exc.reason)
            except ValueError:
                message = str(exc.reason)
            raise KubeApiError(exc.code, str(message)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise Unavailable(f"Kubernetes API unreachable at {self.base_url}: {exc}") from None


def _as_csi(exc: KubeApiError, what: str) -> CsiError:
    if exc.status in (401, 403):
        return Internal(f"{what}: the agent's service account may not do this ({exc})")
    if exc.status >= 500 or exc.status == 429:
        return Unavailable(f"{what}: {exc}")
    return Internal(f"{what}: {exc}")


class ClusterAccess:
    """NBDExport lookup and the per-export writer Lease, for one node."""

    def __init__(self, api: KubeApi, node_id: str) -> None:
        self.api = api
        self.node_id = node_id

    def get_export(self, namespace: str, name: str) -> ExportStatus | None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}"
        try:
            return ExportStatus.from_object(self.api.request("GET", path))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise _as_csi(exc, f"reading NBDExport {namespace}/{name}") from None

    def lease_holder(self, namespace: str, lease: str) -> str | None:
        """Node holding a Lease, or None when the Lease does not exist."""
        try:
            obj = self.api.request("GET", LEASES.format(ns=namespace) + f"/{lease}")
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise _as_csi(exc, f"reading Lease {namespace}/{lease}") from None
        return str((obj.get("spec") or {}).get("holderIdentity") or "")

    def acquire_writer(self, namespace: str, export: str) -> str:
        """Take the writer Lease of an export for this node; returns ``namespace/lease``.

        Idempotent: holding it already is success. Held by another node: FAILED_PRECONDITION
        naming that node, as the CSI spec asks for "published to another node".
        """
        name = writer_lease_name(export)
        body = writer_lease(namespace, export, self.node_id)
        try:
            self.api.request("POST", LEASES.format(ns=namespace), body)
            return f"{namespace}/{name}"
        except KubeApiError as exc:
            if exc.status != 409:
                raise _as_csi(exc, f"creating Lease {namespace}/{name}") from None
        holder = self.lease_holder(namespace, name)
        if holder == self.node_id:
            return f"{namespace}/{name}"
        if holder is None:
            # Released between our create and our read: the caller retries (kubelet backoff).
            raise Unavailable(f"writer Lease {namespace}/{name} changed hands; retry")
        raise FailedPrecondition(
            f"NBDExport {namespace}/{export} is ReadWriteOnce and attached read-write on node"
            f" {holder!r} (Lease {namespace}/{name}); detach it there first"
        )

    def record_attachment(self, namespace: str, export: str, device: str, read_only: bool) -> str:
        """Create (or refresh) this node's attachment Lease; returns ``namespace/lease``."""
        body = attachment_lease(
            namespace, export, self.node_id, device, "ReadOnly" if read_only else "ReadWrite"
        )
        name = attachment_lease_name(export, self.node_id)
        leases = LEASES.format(ns=namespace)
        try:
            self.api.request("POST", leases, body)
        except KubeApiError as exc:
            if exc.status != 409:
                raise _as_csi(exc, f"creating Lease {namespace}/{name}") from None
            # Ours from an earlier attempt (its name includes the node): refresh device and mode.
            patch = {"metadata": {"annotations": body["metadata"]["annotations"]}}
            try:
                self.api.request("PATCH", f"{leases}/{name}", patch, merge=True)
            except KubeApiError as exc2:
                raise _as_csi(exc2, f"updating Lease {namespace}/{name}") from None
        return f"{namespace}/{name}"

    def record_event(self, namespace: str, export: str, reason: str, message: str) -> None:
        """A Warning Event on the NBDExport (``kubectl describe nbdx`` shows it)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{export}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": export,
                "namespace": namespace,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning",
            "source": {"component": "nbd-agent", "host": self.node_id},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.request("POST", f"/api/v1/namespaces/{namespace}/events", body)
        except KubeApiError as exc:
            raise _as_csi(exc, f"recording an Event on NBDExport {namespace}/{export}") from None

    def release(self, lease_ref: str) -> None:
        """Delete one of our Leases (attachment or writer); absent already is success, and a
        Lease held by another node is left alone."""
        namespace, _, name = lease_ref.partition("/")
        path = LEASES.format(ns=namespace) + f"/{name}"
        try:
            obj = self.api.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return
            raise _as_csi(exc, f"reading Lease {lease_ref}") from None
        if (obj.get("spec") or {}).get("holderIdentity") != self.node_id:
            return
        uid = (obj.get("metadata") or {}).get("uid")
        # The uid precondition makes the delete hit exactly the Lease we just read as ours.
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
        try:
            self.api.request("DELETE", path, options if uid else None)
        except KubeApiError as exc:
            if exc.status not in (404, 409):
                raise _as_csi(exc, f"deleting Lease {lease_ref}") from None


class Conflict(Exception):
    """A create found the name taken (HTTP 409)."""


class Objects:
    """One kind of namespaced object, for the controller: create, get, list, patch, delete."""

    kind = ""
    prefix = ""
    plural = ""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    def _path(self, namespace: str, name: str = "") -> str:
        base = f"{self.prefix}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{name}" if name else base

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create an object; Conflict when the name is taken (the API decides, atomically)."""
        meta = body["metadata"]
        try:
            return dict(self.api.request("POST", self._path(meta["namespace"]), body))
        except KubeApiError as exc:
            if exc.status == 409:
                raise Conflict(meta["name"]) from None
            what = f"creating {self.kind} {meta['namespace']}/{meta['name']}"
            raise _as_csi(exc, what) from None

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return dict(self.api.request("GET", self._path(namespace, name)))
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise _as_csi(exc, f"reading {self.kind} {namespace}/{name}") from None

    def every(self, namespace: str) -> list[dict[str, Any]]:
        """All objects of the namespace, whoever made them."""
        try:
            return list(self.api.request("GET", self._path(namespace)).get("items") or [])
        except KubeApiError as exc:
            raise _as_csi(exc, f"listing {self.kind}s in {namespace}") from None

    def list(self, namespace: str, label: str) -> list[dict[str, Any]]:
        """Objects carrying ``label`` (any value), sorted by name."""
        path = f"{self._path(namespace)}?labelSelector={label}"
        try:
            items = self.api.request("GET", path).get("items") or []
        except KubeApiError as exc:
            raise _as_csi(exc, f"listing {self.kind}s in {namespace}") from None
        # Filtered again here: a selector the server ignored must not widen the answer.
        mine = [i for i in items if label in ((i.get("metadata") or {}).get("labels") or {})]
        return sorted(mine, key=lambda i: str(i["metadata"]["name"]))

    def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            return dict(self.api.request("PATCH", self._path(namespace, name), patch, merge=True))
        except KubeApiError as exc:
            raise _as_csi(exc, f"updating {self.kind} {namespace}/{name}") from None

    def delete(self, namespace: str, name: str) -> None:
        """Delete an object; absent already is success."""
        try:
            self.api.request("DELETE", self._path(namespace, name))
        except KubeApiError as exc:
            if exc.status != 404:
                raise _as_csi(exc, f"deleting {self.kind} {namespace}/{name}") from None


class ExportStore(Objects):
    """The volumes: NBDExports."""

    kind = KIND
    prefix = f"/apis/{GROUP}/{VERSION}"
    plural = PLURAL


class SnapshotStore(Objects):
    """The snapshots: VolumeSnapshots of the volumes' data claims (the claims' class makes them)."""

    kind = "VolumeSnapshot"
    prefix = "/apis/snapshot.storage.k8s.io/v1"
    plural = "volumesnapshots"


class LeaseStore(Objects):
    """Host-device inventories (written by node plugins) and claims (``hostdevices.py``)."""

    kind = "Lease"
    prefix = "/apis/coordination.k8s.io/v1"
    plural = "leases"
