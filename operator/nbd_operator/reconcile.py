"""One export's reconciliation: check its inputs, apply its children, write its status.

Why it exists: kopf decides *when* to act (create, update, resume, a child changed, delete);
this module decides *what* to do, the same way each time, so every trigger converges on the
same objects and the same truthful status. Failures are raised as the ``ExportError`` tree;
``handlers`` maps them to kopf's temporary/permanent errors in one place.

What it must not do: keep state between calls (everything is re-read from the API), sleep, or
talk to the API other than through ``kube.Kube``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import kopf
from nbd_api import (
    ANNOTATION_PREFIX,
    KIND,
    LABEL_EXPORT,
    LABEL_ROLE,
    ROLE_ATTACHMENT,
    attachment_from_lease,
)
from nbd_api import parse_quantity as _parse_quantity

from nbd_operator import manifests
from nbd_operator.config import OperatorConfig
from nbd_operator.import_job import CONTAINER as IMPORTER
from nbd_operator.import_job import import_job
from nbd_operator.import_progress import (
    DONE,
    FAILED,
    JobOutcome,
    current_pod,
    describe,
    import_status,
    job_outcome,
    last_progress,
)
from nbd_operator.kube import Kube, KubeError, NotFound
from nbd_operator.served_size import HEAD_BYTES, announced_size, next_size, serving_pod
from nbd_operator.spec import (
    ExportSpec,
    SpecError,
    claim_name,
    import_job_name,
    overlay_claim_name,
    parse_spec,
    policy_name,
    selector_labels,
)
from nbd_operator.spec import server_name as _server_name
from nbd_operator.status import Observed, Problem, compute_status

RETAINED_ANNOTATION = f"{ANNOTATION_PREFIX}/retained-from"


class ExportError(Exception):
    """Base of the operator's errors about one export."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class InvalidSpec(ExportError):
    """The spec cannot be served; only a spec change can fix it (permanent)."""


class InputMissing(ExportError):
    """Something the spec refers to is missing or wrong; fixed outside the export (retry)."""


class DetachPending(ExportError):
    """Deletion waits: nodes still have the export attached (retry)."""


@dataclass(frozen=True)
class Ctx:
    kube: Kube
    config: OperatorConfig


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    # kopf queues Events and posts them in the background; never blocks a handler.
    kopf.event(kopf.Body(cast(kopf.RawBody, dict(body))), type=kind, reason=reason, message=message)


@dataclass(frozen=True)
class Assessment:
    """What the reconciler learnt about an export before touching anything."""

    spec: ExportSpec  # the spec to serve (a refused shrink keeps the served size)
    base: ExportSpec | None  # the base export of a copy-on-write clone
    served_size: int | None
    refused: Problem | None
    claim: dict[str, Any] | None
    secret_keys: frozenset[str] = frozenset()  # an image source's Secret's keys


async def _check_tls(ctx: Ctx, spec: ExportSpec) -> None:
    if spec.tls is None:
        return
    secret = await ctx.kube.get("Secret", spec.namespace, spec.tls.secret_name)
    where = f"Secret {spec.namespace}/{spec.tls.secret_name}"
    if secret is None:
        raise InputMissing(
            "TLSSecretNotFound", f"{where} does not exist: create it (tls.crt, tls.key)"
        )
    keys = set((secret.get("data") or {}) | (secret.get("stringData") or {}))
    needed = {"tls.crt", "tls.key"} | ({"ca.crt"} if spec.tls.client_certificate else set())
    if missing := sorted(needed - keys):
        raise InputMissing("TLSSecretIncomplete", f"{where} lacks {', '.join(missing)}")


async def _image_secret_keys(ctx: Ctx, spec: ExportSpec) -> frozenset[str]:
    """The keys of an image source's Secret (they become the importer's environment)."""
    name = (spec.source.get("secretRef") or {}).get("name") if spec.source_kind == "image" else None
    if not name:
        return frozenset()
    secret = await ctx.kube.get("Secret", spec.namespace, name)
    if secret is None:
        raise InputMissing(
            "ImageSecretNotFound",
            f"Secret {spec.namespace}/{name} does not exist: create it or fix "
            "spec.source.image.secretRef",
        )
    return frozenset((secret.get("data") or {}) | (secret.get("stringData") or {}))


async def _check_source(
    ctx: Ctx, spec: ExportSpec
) -> tuple[dict[str, Any] | None, ExportSpec | None]:
    """Returns (claim, base export) after checking that the source exists and fits."""
    ns, src = spec.namespace, spec.source
    if spec.source_kind == "volumeClaimTemplate" or spec.image_mode == "import":
        return await ctx.kube.get("PersistentVolumeClaim", ns, claim_name(spec.name)), None
    if spec.source_kind == "persistentVolumeClaim":
        claim = await ctx.kube.get("PersistentVolumeClaim", ns, src["claimName"])
        if claim is None:
            raise InputMissing(
                "ClaimNotFound",
                f"PersistentVolumeClaim {ns}/{src['claimName']} does not exist: create it "
                "or fix spec.source.persistentVolumeClaim.claimName",
            )
        mode = (claim.get("spec") or {}).get("volumeMode", "Filesystem")
        if mode != spec.volume_mode:
            raise InputMissing(
                "VolumeModeMismatch",
                f"PersistentVolumeClaim {ns}/{src['claimName']} is {mode}, the export says "
                f"{spec.volume_mode}",
            )
        return claim, None
    if spec.source_kind == "hostDevice":
        if await ctx.kube.get("Node", None, src["nodeName"]) is None:
            raise InputMissing(
                "NodeNotFound",
                f"node {src['nodeName']} does not exist: fix spec.source.hostDevice.nodeName",
            )
        return None, None
    if spec.source_kind == "export":
        base_body = await ctx.kube.get(KIND, ns, src["name"])
        if base_body is None:
            raise InputMissing("BaseExportNotFound", f"NBDExport {ns}/{src['name']} does not exist")
        try:
            base = parse_spec(base_body)
        except SpecError as exc:
            raise InputMissing("BaseExportInvalid", f"NBDExport {ns}/{src['name']}: {exc}") from exc
        if not base.read_only:
            raise InputMissing(
                "BaseNotReadOnly",
                f"NBDExport {ns}/{src['name']} must be readOnly to be cloned (its data would "
                "change under the clone)",
            )
        if base.source_kind in ("memory", "export"):
            raise InputMissing(
                "BaseNotCloneable",
                f"NBDExport {ns}/{src['name']} has a {base.source_kind} source, which no "
                "other pod can read",
            )
        if base.image_mode == "stream":
            raise InputMissing(
                "BaseNotCloneable",
                f"NBDExport {ns}/{src['name']} streams its image (no claim to share): "
                "import it (mode import) to clone it",
            )
        base_claim = None
        if base.source_kind == "persistentVolumeClaim":
            base_claim = await ctx.kube.get("PersistentVolumeClaim", ns, base.source["claimName"])
        elif base.source_kind in ("volumeClaimTemplate", "image"):
            base_claim = await ctx.kube.get("PersistentVolumeClaim", ns, claim_name(base.name))
        return base_claim, base
    return None, None


def _served_size(
    spec: ExportSpec, body: Mapping[str, Any], claim: Mapping[str, Any] | None
) -> int | None:
    if spec.source_kind == "image":
        # spec.size is the claim's room (or the overlay's); the image's size is its own.
        return _imported_size(spec, (body.get("status") or {}).get("import"))
    if spec.size_bytes is not None:
        return spec.size_bytes
    if spec.source_kind == "persistentVolumeClaim" and claim is not None:
        capacity = ((claim.get("status") or {}).get("capacity") or {}).get("storage")
        if capacity is not None:
            return _parse_quantity(capacity)
    return None


def _imported_size(spec: ExportSpec, image_import: Mapping[str, Any] | None) -> int | None:
    """A raw import serves as many bytes as it copied; another format's disk size is in its
    header, which the operator does not read."""
    st = image_import or {}
    if spec.format == "raw" and st.get("phase") == DONE and isinstance(st.get("totalBytes"), int):
        return int(st["totalBytes"])
    return None


async def assess(ctx: Ctx, body: Mapping[str, Any]) -> Assessment:
    """Parse the spec and check its inputs; raises InvalidSpec or InputMissing."""
    try:
        spec = parse_spec(body)
    except SpecError as exc:
        raise InvalidSpec("InvalidSpec", str(exc)) from exc
    served = (body.get("status") or {}).get("sizeBytes")
    refused: Problem | None = None
    # An image's spec.size is room (the claim's, an overlay's), not the size served: a qcow2
    # image's virtual size may well exceed it.
    sized_by_spec = spec.source_kind != "image"
    shrinking = sized_by_spec and isinstance(served, int) and (spec.size_bytes or 0) < served
    if spec.size_bytes is not None and shrinking:
        refused = (
            "ShrinkRefused",
            f"spec.size {spec.size_bytes} is smaller than the {served} bytes being served; "
            f"shrinking would cut data off: set it back to at least {served}",
        )
        spec = dataclasses.replace(spec, size_bytes=served)
    await _check_tls(ctx, spec)
    secret_keys = await _image_secret_keys(ctx, spec)
    claim, base = await _check_source(ctx, spec)
    served_size = _served_size(spec, body, claim)
    if base is not None:
        # A clone serves its base's image as the base reads it: same format.
        spec = dataclasses.replace(spec, format=base.format, format_known=True)
        served_size = ((await _base_status(ctx, base)) or {}).get("sizeBytes")
        if not isinstance(served_size, int):
            raise InputMissing(
                "BaseNotReady",
                f"NBDExport {base.namespace}/{base.name} reports no size yet; the clone's "
                "overlay claim is sized from it",
            )
    return Assessment(spec, base, served_size, refused, claim, secret_keys)


async def _with_announced_size(
    ctx: Ctx, body: Mapping[str, Any], spec: ExportSpec, known: int | None
) -> int | None:
    """The size served: what the operator knows itself (spec.size, a claim's capacity, a raw
    import's bytes, a clone's base), else what the serving pod announced (a host device, an
    image's header, a remote). Read again at every reconciliation while the operator knows
    nothing itself (a restarted server may serve another size); a failed read keeps the
    recorded size, and a smaller one is recorded with a Warning Event."""
    if known is not None or spec.source_kind in ("export", "memory"):
        return known
    status = body.get("status") or {}
    recorded = status.get("sizeBytes") if isinstance(status.get("sizeBytes"), int) else None
    size, shrank = next_size(recorded, await _read_announced_size(ctx, spec))
    if shrank:
        _event(
            body,
            "Warning",
            "SizeShrank",
            f"the server now serves {size} bytes, {recorded} before: data past {size} is out "
            "of reach, and clones made over the larger size will not start",
        )
    return size


async def _read_announced_size(ctx: Ctx, spec: ExportSpec) -> int | None:
    """The size the serving pod's nbdserver announced at start (the head of its log)."""
    pods = await ctx.kube.list("Pod", spec.namespace, selector_labels(spec.name))
    pod = serving_pod(pods)
    if pod is None:
        return None
    name = str(pod["metadata"]["name"])
    try:
        # The line is at the start: limitBytes without tailLines reads the head only.
        log = await ctx.kube.log(
            spec.namespace, name, manifests.SERVER_CONTAINER, limit_bytes=HEAD_BYTES
        )
    except KubeError:  # the pod went away meanwhile: the next reconciliation reads again
        return None
    return announced_size(log, spec.name)


async def _base_status(ctx: Ctx, base: ExportSpec) -> dict[str, Any] | None:
    obj = await ctx.kube.get(KIND, base.namespace, base.name)
    return None if obj is None else obj.get("status")


async def attachments(ctx: Ctx, namespace: str, name: str) -> list[Any]:
    leases = await ctx.kube.list(
        "Lease", namespace, {LABEL_EXPORT: name, LABEL_ROLE: ROLE_ATTACHMENT}
    )
    found = [attachment_from_lease(lease) for lease in leases]
    return sorted((a for a in found if a is not None), key=lambda a: a.node)


async def write_status(ctx: Ctx, body: Mapping[str, Any], **observed: Any) -> dict[str, Any]:
    """Gather the children's state and patch the export's status with the computed result."""
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    spec: ExportSpec | None = observed.pop("spec", None)
    deployment = await ctx.kube.get("Deployment", ns, _server_name(name))
    obs = Observed(
        name=name,
        namespace=ns,
        generation=meta.get("generation"),
        spec=spec,
        deleting=bool(meta.get("deletionTimestamp")),
        deployment=deployment,
        attachments=await attachments(ctx, ns, name),
        previous_conditions=(body.get("status") or {}).get("conditions") or (),
        **observed,
    )
    status = compute_status(obs, now())
    await ctx.kube.patch(KIND, ns, name, {"status": status}, subresource="status")
    if status["phase"] == "Ready" and (body.get("status") or {}).get("phase") != "Ready":
        _event(body, "Normal", "Ready", f"serving {status.get('uri')}")
    return status


async def sync(ctx: Ctx, body: Mapping[str, Any]) -> dict[str, Any]:
    """Make the children match the spec, then report. The create/update/resume path."""
    try:
        a = await assess(ctx, body)
    except InvalidSpec as exc:
        await write_status(ctx, body, spec_problem=(exc.reason, exc.message))
        _event(body, "Warning", exc.reason, exc.message)
        raise
    except InputMissing as exc:
        spec = _parse_or_none(body)
        await write_status(ctx, body, spec=spec, source_problem=(exc.reason, exc.message))
        # kopf retries every few seconds; one Event per distinct problem, not one per retry.
        if (body.get("status") or {}).get("message") != exc.message:
            _event(body, "Warning", exc.reason, exc.message)
        raise
    if a.refused is not None and a.refused[1] not in str((body.get("status") or {}).get("message")):
        _event(body, "Warning", a.refused[0], a.refused[1])
    try:
        claim, extra = await _apply(ctx, body, a)
    except KubeError as exc:
        # The API refused a child (quota, admission, an outage): say so; kopf retries.
        _event(body, "Warning", "ApplyFailed", f"could not apply the server's objects: {exc}")
        raise
    served = await _with_announced_size(ctx, body, a.spec, extra.pop("served_size", a.served_size))
    return await write_status(
        ctx, body, spec=a.spec, claim=claim, refused=a.refused, served_size=served, **extra
    )


async def refresh(ctx: Ctx, body: Mapping[str, Any]) -> dict[str, Any]:
    """Recompute the status only (a child or a Lease changed); never creates anything."""
    try:
        a = await assess(ctx, body)
    except InvalidSpec as exc:
        return await write_status(ctx, body, spec_problem=(exc.reason, exc.message))
    except InputMissing as exc:
        spec = _parse_or_none(body)
        return await write_status(ctx, body, spec=spec, source_problem=(exc.reason, exc.message))
    claim = a.claim if a.spec.source_kind != "export" else None
    extra: dict[str, Any] = {}
    if a.spec.image_mode == "import":
        extra = await _import_observed(ctx, body, a, create=False)
    served = await _with_announced_size(ctx, body, a.spec, extra.pop("served_size", a.served_size))
    return await write_status(
        ctx, body, spec=a.spec, claim=claim, refused=a.refused, served_size=served, **extra
    )


def _parse_or_none(body: Mapping[str, Any]) -> ExportSpec | None:
    try:
        return parse_spec(body)
    except SpecError:
        return None


async def _apply(
    ctx: Ctx, body: Mapping[str, Any], a: Assessment
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Apply the children; returns the claim and what else the status needs to know."""
    spec, kube = a.spec, ctx.kube
    claim = a.claim
    extra: dict[str, Any] = {}
    if spec.source_kind == "volumeClaimTemplate" or spec.image_mode == "import":
        claim = await _ensure_claim(ctx, body, spec, claim)
    elif spec.persistent_overlay:
        await _ensure_overlay_claim(ctx, body, a)
    if spec.image_mode == "import":
        extra = await _import_observed(ctx, body, a, create=True)
    if extra.get("importing") is None and extra.get("source_problem") is None:
        # The server starts only after the import succeeded (its checksum verified).
        _, how = await kube.ensure(
            manifests.deployment(spec, ctx.config, a.base, secret_keys=a.secret_keys),
            prune=(("spec", "template", "spec", "nodeSelector"),),
        )
        if how == "created":
            _event(body, "Normal", "ServerCreated", f"created Deployment {_server_name(spec.name)}")
        elif how == "updated":
            _event(body, "Normal", "ServerUpdated", f"rolling Deployment {_server_name(spec.name)}")
    _, how = await kube.ensure(manifests.service(spec))
    if how == "created":
        _event(body, "Normal", "ServiceCreated", f"created Service {_server_name(spec.name)}")
    policy = manifests.network_policy(spec, ctx.config.server_metrics_port)
    if policy is not None:
        _, how = await kube.ensure(policy)
        if how != "unchanged":
            _event(
                body,
                "Normal",
                "NetworkPolicyApplied",
                f"admitting {', '.join(spec.allowed_clients)}",
            )
    elif await kube.delete("NetworkPolicy", spec.namespace, policy_name(spec.name)):
        _event(
            body,
            "Normal",
            "NetworkPolicyRemoved",
            "allowedClients is empty: every client may connect",
        )
    return (claim if spec.source_kind != "export" else None), extra


async def _read_progress(ctx: Ctx, job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The importer's latest progress line, from the log of the Job's current pod."""
    meta = job.get("metadata") or {}
    ns, uid = str(meta.get("namespace")), str(meta.get("uid"))
    # The Job controller labels its pods with the Job's uid: a Job re-created under the same
    # name never reads an older one's pods.
    pods = await ctx.kube.list("Pod", ns, {"batch.kubernetes.io/controller-uid": uid})
    pod = current_pod(pods)
    if pod is None:
        return None
    try:
        log = await ctx.kube.log(ns, str(pod["metadata"]["name"]), IMPORTER, tail_lines=5)
    except KubeError:  # not started yet (HTTP 400), or gone: no progress to tell
        return None
    return last_progress(log)


async def _import_observed(
    ctx: Ctx, body: Mapping[str, Any], a: Assessment, *, create: bool
) -> dict[str, Any]:
    """The import's state for write_status: status.import, and while it is not done either
    ``importing`` (in progress) or ``source_problem`` (the Job gave up), and the import's
    Events. With ``create`` (the sync path), start the Job when there is none."""
    spec = a.spec
    ns, job_name, where = spec.namespace, import_job_name(spec.name), spec.image_location
    previous: dict[str, Any] = dict((body.get("status") or {}).get("import") or {})
    job = await ctx.kube.get("Job", ns, job_name)
    if job is None and previous.get("phase") == DONE:
        # Imported once (the Job was cleaned up since): the data is in the claim.
        return {"image_import": previous, "served_size": _imported_size(spec, previous)}
    if job is None:
        state = import_status(JobOutcome("Running"), None, None)
        if create:
            await ctx.kube.ensure(import_job(spec, ctx.config, a.secret_keys))
            _event(
                body,
                "Normal",
                "ImportStarted",
                f"Job {job_name} imports {where} into PersistentVolumeClaim "
                f"{claim_name(spec.name)}",
            )
        return {"image_import": state, "importing": ("Importing", describe(where, state))}
    outcome = job_outcome(job)
    state = import_status(outcome, await _read_progress(ctx, job), previous)
    # Whichever path sees a change first tells it (status and Events are written together).
    _import_events(body, job_name, where, previous, state)
    if state["phase"] == DONE:
        return {"image_import": state, "served_size": _imported_size(spec, state)}
    if state["phase"] == FAILED:
        problem = (
            "ImportFailed",
            f"the import of {where} failed after {state['attempts']} attempt(s): "
            f"{state.get('message', outcome.reason)}; fix the cause, then delete Job "
            f"{job_name} to try again (it resumes)",
        )
        return {"image_import": state, "source_problem": problem}
    return {"image_import": state, "importing": ("Importing", describe(where, state))}


def _import_events(
    body: Mapping[str, Any],
    job_name: str,
    where: str,
    previous: Mapping[str, Any],
    state: Mapping[str, Any],
) -> None:
    """One Event per change of the import's course, not one per progress reading."""
    phase, before = state["phase"], previous.get("phase")
    tried, tried_before = int(state.get("attempts") or 0), int(previous.get("attempts") or 0)
    if phase == DONE and before != DONE:
        digest = f", sha256 {state['sha256']}" if state.get("sha256") else ""
        size = f" ({state['totalBytes']} bytes{digest})" if "totalBytes" in state else ""
        _event(body, "Normal", "ImportSucceeded", f"imported {where}{size}")
    elif phase == FAILED and before != FAILED:
        _event(
            body,
            "Warning",
            "ImportFailed",
            f"Job {job_name} gave up after {tried} attempt(s): {state.get('message', '')}",
        )
    elif tried > tried_before >= 1:
        _event(
            body,
            "Warning",
            "ImportRetrying",
            f"attempt {tried_before} failed ({state.get('message') or previous.get('message')}); "
            f"Job {job_name} started attempt {tried}, which resumes",
        )


async def _ensure_claim(
    ctx: Ctx, body: Mapping[str, Any], spec: ExportSpec, claim: dict[str, Any] | None
) -> dict[str, Any]:
    desired = manifests.persistent_volume_claim(spec)
    if claim is None:
        claim, _ = await ctx.kube.ensure(desired)
        _event(
            body, "Normal", "ClaimCreated", f"created PersistentVolumeClaim {claim_name(spec.name)}"
        )
        return claim
    want = manifests.claim_storage_bytes(spec)
    requests = ((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}
    have = _parse_quantity(requests.get("storage", 0))
    if want > have:
        patch = {"spec": {"resources": {"requests": {"storage": manifests.quantity(want)}}}}
        claim = await ctx.kube.patch(
            "PersistentVolumeClaim", spec.namespace, claim_name(spec.name), patch
        )
        _event(body, "Normal", "ClaimResizing", f"growing the claim to {want} bytes")
    return claim


async def _ensure_overlay_claim(ctx: Ctx, body: Mapping[str, Any], a: Assessment) -> None:
    """A clone's overlay claim, created once and owned by the export (so it goes with it).
    Never resized: the overlay is made for the base's size, and nbdserver refuses to serve it
    over a base of another size (the clone's data would be misread)."""
    # A clone's overlay is sized from its base; a stream's from spec.size (the remote's size
    # is announced by its server, which cannot start before its overlay exists).
    size = a.served_size if a.spec.source_kind == "export" else a.spec.size_bytes
    assert size is not None
    name = overlay_claim_name(a.spec.name)
    if await ctx.kube.get("PersistentVolumeClaim", a.spec.namespace, name) is None:
        await ctx.kube.ensure(manifests.overlay_claim(a.spec, size, a.claim))
        _event(body, "Normal", "ClaimCreated", f"created PersistentVolumeClaim {name}")


async def finalize(ctx: Ctx, body: Mapping[str, Any]) -> None:
    """Deletion: wait while nodes have the export attached, then remove the children.

    Raises DetachPending while any attachment Lease exists; the finalizer stays until then, so
    the server keeps serving the nodes that still use it.
    """
    meta = body.get("metadata") or {}
    ns, name = str(meta.get("namespace")), str(meta.get("name"))
    spec = _parse_or_none(body)
    attached = await attachments(ctx, ns, name)
    if attached:
        nodes = ", ".join(a.node for a in attached)
        message = f"deletion waits until {len(attached)} node(s) detach: {nodes}"
        previous = (body.get("status") or {}).get("message")
        await write_status(ctx, body, spec=spec, deletion_blocked=("DetachPending", message))
        if previous != message:  # one Event per change, not one per retry
            _event(body, "Warning", "DeletionBlocked", message)
        raise DetachPending("DetachPending", message)

    await write_status(ctx, body, spec=spec)
    kube = ctx.kube
    await kube.delete("NetworkPolicy", ns, policy_name(name))
    await kube.delete("Service", ns, _server_name(name))
    await kube.delete("Deployment", ns, _server_name(name))
    if spec is not None and spec.image_mode == "import":
        await kube.delete("Job", ns, import_job_name(name))
    overlaid = spec is not None and spec.persistent_overlay
    if overlaid and await kube.delete("PersistentVolumeClaim", ns, overlay_claim_name(name)):
        _event(body, "Normal", "ClaimDeleted", f"deleted the overlay claim of {name}")
    imported = spec is not None and spec.image_mode == "import"
    if imported and await kube.delete("PersistentVolumeClaim", ns, claim_name(name)):
        _event(body, "Normal", "ClaimDeleted", f"deleted the imported claim {claim_name(name)}")
    if spec is not None and spec.source_kind == "volumeClaimTemplate":
        if spec.reclaim_policy == "Retain":
            # Without the owner reference the garbage collector leaves the claim alone.
            patch = {
                "metadata": {
                    "ownerReferences": None,
                    "annotations": {RETAINED_ANNOTATION: f"{ns}/{name}"},
                }
            }
            with contextlib.suppress(NotFound):  # already gone: nothing left to retain
                await kube.patch("PersistentVolumeClaim", ns, claim_name(name), patch)
                _event(
                    body,
                    "Normal",
                    "ClaimRetained",
                    f"kept PersistentVolumeClaim {claim_name(name)}",
                )
        elif await kube.delete("PersistentVolumeClaim", ns, claim_name(name)):
            _event(
                body, "Normal", "ClaimDeleted", f"deleted PersistentVolumeClaim {claim_name(name)}"
            )
    _event(body, "Normal", "Deleted", "server, service and policy removed")
