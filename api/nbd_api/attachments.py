"""How a node records that it has an NBDExport attached: Lease objects, named per export.

Why Leases and not a list in status written by agents: several agents (ReadOnlyMany,
ReadWriteMany) would race on one status list, and merge patches replace lists wholesale, so one
node could erase another's record. A Lease per (export, node) is one object per writer: creating
it cannot clobber anyone else's. ReadWriteOnce exclusivity comes from a second, single Lease per
export (the *writer* Lease): the API server creates an object of a given name at most once, so
two nodes racing for write access cannot both win (the loser gets HTTP 409 Conflict).

The protocol, for the agent:

1. Before connecting read-write under ReadWriteOnce: create ``writer_lease(export, node)``.
   409 Conflict and a different ``spec.holderIdentity`` means another node writes: refuse.
   (Same holder: it is ours from an earlier attempt; carry on.)
2. After the kernel device is connected: create ``attachment_lease(export, node, device, mode)``
   (409 with the same holder: update its annotations instead).
3. On detach: delete the attachment Lease, then the writer Lease if it holds it.

The operator mirrors attachment Leases into ``status.attachments`` and its deletion finalizer
waits until none remains. It deletes a Lease only when its holder node has no Node object any
more (the node left the cluster and cannot release it); an agent must therefore expect its
Leases to vanish only together with its Node.

What this module must not do: talk to the API. It builds and reads plain dicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from nbd_api.names import GROUP

ATTACHMENT_LEASE_PREFIX: Final = "nbd-attach-"
WRITER_LEASE_PREFIX: Final = "nbd-writer-"

LABEL_EXPORT: Final = f"{GROUP}/export"
LABEL_ROLE: Final = f"{GROUP}/lease-role"
# Node names may exceed a label value's 63 characters; the node is spec.holderIdentity, and
# this label carries it only when it fits (for `kubectl get lease -l` convenience).
LABEL_NODE: Final = f"{GROUP}/node"
ROLE_ATTACHMENT: Final = "attachment"
ROLE_WRITER: Final = "writer"
LEASE_ANNOTATION_DEVICE: Final = f"{GROUP}/device"
LEASE_ANNOTATION_MODE: Final = f"{GROUP}/mode"

AttachMode = Literal["ReadWrite", "ReadOnly"]
_MAX_NAME = 253
_MAX_LABEL = 63


def _bounded(name: str) -> str:
    """Keep an object name within 253 characters, deterministically (hash suffix)."""
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: _MAX_NAME - 11].rstrip('-.')}-{digest}"


def attachment_lease_name(export: str, node: str) -> str:
    """The name of the Lease that says ``node`` has ``export`` attached."""
    return _bounded(f"{ATTACHMENT_LEASE_PREFIX}{export}.{node}")


def writer_lease_name(export: str) -> str:
    """The name of the single Lease whose holder is the one node allowed to write."""
    return _bounded(f"{WRITER_LEASE_PREFIX}{export}")


def _lease(name: str, namespace: str, export: str, node: str, role: str) -> dict[str, Any]:
    labels = {LABEL_EXPORT: export, LABEL_ROLE: role}
    if len(node) <= _MAX_LABEL:
        labels[LABEL_NODE] = node
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"holderIdentity": node},
    }


def writer_lease(namespace: str, export: str, node: str) -> dict[str, Any]:
    """The writer Lease the agent creates before attaching read-write (ReadWriteOnce)."""
    return _lease(writer_lease_name(export), namespace, export, node, ROLE_WRITER)


def attachment_lease(
    namespace: str, export: str, node: str, device: str, mode: AttachMode
) -> dict[str, Any]:
    """The attachment Lease the agent creates once ``device`` is connected on ``node``."""
    lease = _lease(attachment_lease_name(export, node), namespace, export, node, ROLE_ATTACHMENT)
    annotations = {LEASE_ANNOTATION_DEVICE: device, LEASE_ANNOTATION_MODE: mode}
    lease["metadata"]["annotations"] = annotations
    return lease


@dataclass(frozen=True)
class Attachment:
    """One node's attachment of an export, as shown in ``status.attachments``."""

    node: str
    device: str
    mode: AttachMode
    since: str | None = None

    def to_status(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"nodeName": self.node, "device": self.device, "mode": self.mode}
        if self.since:
            entry["since"] = self.since
        return entry

    @classmethod
    def from_status(cls, entry: Mapping[str, Any]) -> Attachment:
        mode = entry.get("mode")
        return cls(
            node=str(entry.get("nodeName", "")),
            device=str(entry.get("device", "")),
            mode="ReadOnly" if mode == "ReadOnly" else "ReadWrite",
            since=entry.get("since"),
        )


def attachment_from_lease(lease: Mapping[str, Any]) -> Attachment | None:
    """Read an attachment Lease; None for a writer Lease or an object that is not ours."""
    meta = lease.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_ROLE) != ROLE_ATTACHMENT:
        return None
    annotations = meta.get("annotations") or {}
    spec = lease.get("spec") or {}
    mode = annotations.get(LEASE_ANNOTATION_MODE)
    return Attachment(
        node=str(spec.get("holderIdentity") or labels.get(LABEL_NODE) or ""),
        device=str(annotations.get(LEASE_ANNOTATION_DEVICE, "")),
        mode="ReadOnly" if mode == "ReadOnly" else "ReadWrite",
        since=spec.get("acquireTime") or meta.get("creationTimestamp"),
    )
