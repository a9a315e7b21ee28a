"""Computes an NBDExport's status from what is actually there.

Why it exists: phase, conditions and URI must say what is true (the claim is bound, the server
pod is available, a node has it attached), not what the operator last asked for. This module turns
observed objects into the status dict; the reconciler gathers the objects and writes the result.

What it must not do: I/O or clock reads (``now`` is passed in), so every outcome is testable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbd_api import (
    COND_READY,
    COND_SERVER_AVAILABLE,
    COND_SOURCE_BOUND,
    COND_SPEC_VALID,
    Attachment,
    export_uri,
)

from nbd_operator.import_progress import FIELDS as IMPORT_FIELDS
from nbd_operator.spec import ExportSpec, server_name

Problem = tuple[str, str]  # (reason, message): a CamelCase reason and a sentence saying what to fix


@dataclass(frozen=True)
class Observed:
    """Everything the status is computed from, gathered by the reconciler."""

    name: str
    namespace: str
    generation: int | None
    spec: ExportSpec | None  # None when the spec itself cannot be served
    deleting: bool = False
    claim: Mapping[str, Any] | None = None
    deployment: Mapping[str, Any] | None = None
    spec_problem: Problem | None = None  # the spec cannot be served at all -> Failed
    source_problem: Problem | None = None  # an input is missing (claim, secret, node) -> Failed
    refused: Problem | None = None  # part of an update refused (shrink); still serving
    deletion_blocked: Problem | None = None
    served_size: int | None = None
    image_import: Mapping[str, Any] | None = None  # status.import of an image import
    importing: Problem | None = None  # the import has not finished: (reason, progress sentence)
    attachments: Sequence[Attachment] = field(default_factory=tuple)
    previous_conditions: Sequence[Mapping[str, Any]] = field(default_factory=tuple)


def claim_bound(claim: Mapping[str, Any] | None) -> bool:
    return claim is not None and (claim.get("status") or {}).get("phase") == "Bound"


def deployment_available(deployment: Mapping[str, Any] | None) -> bool:
    """One ready replica of the current pod template (Recreate: never an old and a new one)."""
    if deployment is None:
        return False
    meta = deployment.get("metadata") or {}
    st = deployment.get("status") or {}
    generation, observed = meta.get("generation"), st.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return False
    return int(st.get("availableReplicas") or 0) >= 1 and int(st.get("updatedReplicas") or 1) >= 1


def _condition(
    ctype: str, ok: bool, reason: str, message: str, obs: Observed, now: str
) -> dict[str, Any]:
    status = "True" if ok else "False"
    since = now
    for old in obs.previous_conditions:
        if old.get("type") == ctype and old.get("status") == status:
            since = str(old.get("lastTransitionTime") or now)
    cond: dict[str, Any] = {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
    }
    if obs.generation is not None:
        cond["observedGeneration"] = obs.generation
    return cond


def _source_condition(obs: Observed) -> tuple[bool, str, str]:
    spec = obs.spec
    if obs.spec_problem is not None:
        return False, obs.spec_problem[0], obs.spec_problem[1]
    if obs.source_problem is not None:
        return False, obs.source_problem[0], obs.source_problem[1]
    assert spec is not None
    if spec.source_kind in ("volumeClaimTemplate", "persistentVolumeClaim"):
        if claim_bound(obs.claim):
            return True, "ClaimBound", "the PersistentVolumeClaim is bound"
        return False, "ClaimPending", "waiting for the PersistentVolumeClaim to be bound"
    if spec.source_kind == "image":
        if obs.importing is not None:
            return False, obs.importing[0], obs.importing[1]
        if spec.image_mode == "stream":
            return True, "Streaming", f"served from {spec.image_location}"
        if claim_bound(obs.claim):
            return True, "Imported", f"imported from {spec.image_location}"
        return False, "ClaimPending", "waiting for the PersistentVolumeClaim to be bound"
    if spec.source_kind == "hostDevice":
        return True, "NodeFound", f"device {spec.source['path']} on node {spec.source['nodeName']}"
    if spec.source_kind == "memory":
        return True, "Ephemeral", "memory-backed scratch space (lost when the server restarts)"
    return True, "BaseExportFound", f"copy-on-write over export {spec.source['name']}"


def compute_status(obs: Observed, now: str) -> dict[str, Any]:
    """The full status object for one export (phase, uri, conditions, attachments...)."""
    source_ok, source_reason, source_msg = _source_condition(obs)
    server_ok = deployment_available(obs.deployment)
    if server_ok:
        server_reason, server_msg = "ServerAvailable", "the NBD server pod is ready"
    elif obs.deployment is None:
        server_reason, server_msg = "NotCreated", "the NBD server has not been created yet"
    else:
        server_reason, server_msg = (
            "ServerUnavailable",
            "waiting for the NBD server pod to be ready",
        )
    valid_ok = obs.refused is None and obs.spec_problem is None
    valid_reason, valid_msg = (
        ("Accepted", "the spec is being served")
        if valid_ok
        else (obs.refused or obs.spec_problem or ("Refused", ""))
    )
    ready = source_ok and server_ok and obs.spec_problem is None and not obs.deleting

    if obs.deletion_blocked is not None:
        ready_reason, ready_msg = obs.deletion_blocked
    elif obs.deleting:
        ready_reason, ready_msg = "Terminating", "the export is being deleted"
    elif ready:
        ready_reason, ready_msg = "Ready", "the export is being served"
    elif not source_ok:
        ready_reason, ready_msg = source_reason, source_msg
    else:
        ready_reason, ready_msg = server_reason, server_msg

    if obs.deleting:
        phase = "Terminating"
    elif obs.spec_problem is not None or obs.source_problem is not None:
        phase = "Failed"
    elif ready:
        phase = "Ready"
    elif obs.deployment is None and obs.importing is None:
        phase = "Pending"
    else:
        phase = "Provisioning"

    conditions = [
        _condition(COND_READY, ready, ready_reason, ready_msg, obs, now),
        _condition(COND_SOURCE_BOUND, source_ok, source_reason, source_msg, obs, now),
        _condition(COND_SERVER_AVAILABLE, server_ok, server_reason, server_msg, obs, now),
        _condition(COND_SPEC_VALID, valid_ok, valid_reason, valid_msg, obs, now),
    ]
    message = ready_msg if obs.refused is None else f"{ready_msg}; {obs.refused[1]}"
    status: dict[str, Any] = {
        "phase": phase,
        # Why it is not Ready, for kubectl's Reason column; None clears it (merge patch).
        "reason": None if phase == "Ready" else ready_reason,
        "message": message,
        "conditions": conditions,
        "attachments": [a.to_status() for a in obs.attachments],
        "attachmentCount": len(obs.attachments),
    }
    if obs.generation is not None:
        status["observedGeneration"] = obs.generation
    spec = obs.spec
    if spec is not None:
        tls = spec.tls is not None and spec.tls.required
        status["uri"] = export_uri(server_name(spec.name), spec.namespace, spec.name, tls=tls)
        if spec.format_known:
            status["format"] = spec.format
        status["readOnly"] = spec.read_only
        status["accessMode"] = spec.access_mode
        status["tls"] = spec.tls is not None
        if obs.served_size is not None:
            status["sizeBytes"] = obs.served_size
    if obs.image_import is not None:
        # Keys the import no longer reports go as null: a merge patch removes them.
        status["import"] = {key: None for key in IMPORT_FIELDS} | dict(obs.image_import)
    return status
