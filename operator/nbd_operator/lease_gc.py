"""Removes attachment and writer Leases whose holder node no longer exists.

Why it exists: an agent deletes its Leases when it detaches. A node that vanished with an export
attached never does, and its Leases would block the export's deletion and (the writer Lease)
every other node's ReadWriteOnce attach forever. Once the Node object is gone from the API the
node cannot come back under that identity with the device still attached, so the operator
deletes such a Lease and says so with a Warning Event on the export.

What it must not do: touch a Lease whose node exists (a slow or partitioned node still holds its
device: only its agent or an admin may release it), touch Leases that are not ours (the watch
selects ``nbd.dev/export``-labelled ones), or delete a Lease that was replaced meanwhile (the
delete carries the uid it looked at as a precondition).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, cast

import kopf
from nbd_api import KIND, LABEL_EXPORT, LABEL_ROLE

from nbd_operator.kube import Kube

LOG = logging.getLogger("nbd_operator")


def holder(lease: Mapping[str, Any]) -> str | None:
    return (lease.get("spec") or {}).get("holderIdentity") or None


class LeaseIndex:
    """Which Leases each node holds, fed by the Lease watch (so a Node deletion finds them)."""

    def __init__(self) -> None:
        self._by_node: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}

    def seen(self, event_type: str, lease: Mapping[str, Any]) -> None:
        meta = lease.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        for held in self._by_node.values():
            held.pop(key, None)
        node = holder(lease)
        if event_type != "DELETED" and node is not None:
            self._by_node.setdefault(node, {})[key] = dict(lease)
        self._by_node = {n: held for n, held in self._by_node.items() if held}

    def held_by(self, node: str) -> list[dict[str, Any]]:
        return list(self._by_node.get(node, {}).values())


async def collect(kube: Kube, lease: Mapping[str, Any]) -> bool:
    """Delete ``lease`` if its holder node does not exist; True when it was deleted here."""
    node = holder(lease)
    meta = lease.get("metadata") or {}
    ns, name, uid = str(meta.get("namespace")), str(meta.get("name")), meta.get("uid")
    if node is None or await kube.get("Node", None, node) is not None:
        return False
    if not await kube.delete("Lease", ns, name, uid=uid):
        return False  # gone already, or replaced by a newer Lease of that name
    labels = meta.get("labels") or {}
    role, export = labels.get(LABEL_ROLE, "?"), labels.get(LABEL_EXPORT)
    message = f"deleted {role} Lease {name}: its node {node} no longer exists"
    LOG.warning("%s/%s", ns, message)
    body = await kube.get(KIND, ns, export) if export else None
    if body is not None:
        kopf.event(
            kopf.Body(cast(kopf.RawBody, body)),
            type="Warning",
            reason="StaleLeaseRemoved",
            message=message,
        )
    return True
