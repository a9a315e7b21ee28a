"""A typed reading of an NBDExport's spec, and the names and labels of its children.

Why it exists: the manifest builders and the reconciler should work with checked, typed values,
not raw dicts. The API server has already applied the CRD's defaults and rules; this module
applies the same defaults again and re-checks the few rules a schema bypass could break (an
older CRD, a test fake), so a bad object becomes a clear ``SpecError``, never a half-built server.

What it must not do: any I/O. Spec in, dataclass out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nbd_api import LABEL_EXPORT, data_claim_name, parse_quantity

SourceKind = Literal[
    "volumeClaimTemplate", "persistentVolumeClaim", "hostDevice", "memory", "export", "image"
]
SOURCE_KINDS: tuple[SourceKind, ...] = (
    "volumeClaimTemplate",
    "persistentVolumeClaim",
    "hostDevice",
    "memory",
    "export",
    "image",
)

# The formats nbdserver serves (--format); the last two it reads only.
FORMATS = ("raw", "qcow2", "vmdk", "xz")
READ_ONLY_FORMATS = ("vmdk", "xz")

PART_OF = "kube-nbd"
MANAGED_BY = "nbd-operator"


class SpecError(ValueError):
    """The spec cannot be served as written; the message says what to change."""


@dataclass(frozen=True)
class TLSSpec:
    secret_name: str
    required: bool = True
    client_certificate: bool = False


@dataclass(frozen=True)
class QoSSpec:
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


@dataclass(frozen=True)
class ServerSpec:
    image: str | None = None
    image_pull_policy: str | None = None
    resources: Mapping[str, Any] | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ExportSpec:
    """One NBDExport's spec, defaulted and checked."""

    name: str
    namespace: str
    uid: str
    source_kind: SourceKind
    source: Mapping[str, Any]
    size_bytes: int | None
    # How the source's bytes are read (nbdserver --format). A clone has no format of its own:
    # format_known stays False until the reconciler fills in its base's.
    format: str = "raw"
    format_known: bool = True
    read_only: bool = False
    copy_on_write: bool = False
    access_mode: str = "ReadWriteOnce"
    allowed_clients: tuple[str, ...] = ()
    tls: TLSSpec | None = None
    connections: int | None = None
    qos: QoSSpec = field(default_factory=QoSSpec)
    server: ServerSpec = field(default_factory=ServerSpec)

    @property
    def volume_mode(self) -> str:
        """Filesystem or Block, for the two claim-backed sources; Filesystem otherwise."""
        return str(self.source.get("volumeMode", "Filesystem"))

    @property
    def file_backed(self) -> bool:
        """True when the server serves an image file it sizes itself (``--size``)."""
        if self.source_kind == "memory":
            return True
        if self.source_kind in ("volumeClaimTemplate", "persistentVolumeClaim"):
            return self.volume_mode == "Filesystem"
        return False

    @property
    def image_mode(self) -> str | None:
        """import or stream for an image source; None for the other kinds."""
        return str(self.source.get("mode", "import")) if self.source_kind == "image" else None

    @property
    def image_location(self) -> str:
        """An image source's remote as nbdserver takes it: the URL, or s3://bucket/key."""
        s3 = self.source.get("s3")
        if s3:
            return f"s3://{s3['bucket']}/{s3['key']}"
        return str(self.source["url"])

    @property
    def persistent_overlay(self) -> bool:
        """Writes are this export's data and live on a claim it owns (<name>-nbd-overlay): a
        clone's, and a writable stream's (the remote itself is never written)."""
        return self.source_kind == "export" or (self.image_mode == "stream" and not self.read_only)

    @property
    def reclaim_policy(self) -> str:
        return str(self.source.get("reclaimPolicy", "Delete"))


def _opt_int(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{key} must be a positive integer, not {value!r}")
    return value


def parse_spec(body: Mapping[str, Any]) -> ExportSpec:
    """Read an NBDExport object into an ExportSpec, or raise SpecError saying what is wrong."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    source = spec.get("source") or {}
    kinds = [k for k in SOURCE_KINDS if source.get(k) is not None]
    if len(kinds) != 1:
        raise SpecError(f"spec.source must name exactly one of {', '.join(SOURCE_KINDS)}")
    kind = kinds[0]
    source_body = dict(source[kind] or {})
    if kind in ("volumeClaimTemplate", "persistentVolumeClaim"):
        source_body.setdefault("volumeMode", "Filesystem")
    if kind == "persistentVolumeClaim":
        source_body.setdefault("path", "disk.img")
    if kind == "volumeClaimTemplate":
        source_body.setdefault("reclaimPolicy", "Delete")
    if kind == "image":
        source_body.setdefault("mode", "import")
        source_body.setdefault("volumeMode", "Filesystem")
    # A stream is read-only at the remote: written to, it is a copy-on-write over it.
    writable_stream = (
        kind == "image" and source_body["mode"] == "stream" and not spec.get("readOnly", False)
    )

    size_bytes: int | None = None
    if spec.get("size") is not None:
        try:
            size_bytes = parse_quantity(spec["size"])
        except ValueError as exc:
            raise SpecError(f"spec.size: {exc}") from exc
        if size_bytes == 0:
            raise SpecError("spec.size must be greater than zero")

    tls_raw = spec.get("tls")
    tls = None
    if tls_raw:
        tls = TLSSpec(
            secret_name=str(tls_raw["secretName"]),
            required=tls_raw.get("mode", "Required") == "Required",
            client_certificate=bool(tls_raw.get("requireClientCertificate", False)),
        )
    qos_raw = spec.get("qos") or {}
    server_raw = spec.get("server") or {}
    result = ExportSpec(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        uid=str(meta.get("uid", "")),
        source_kind=kind,
        source=source_body,
        size_bytes=size_bytes,
        format=str(spec.get("format") or "raw"),
        format_known=kind != "export",
        read_only=bool(spec.get("readOnly", False)),
        copy_on_write=bool(spec.get("copyOnWrite", False)) or kind == "export" or writable_stream,
        access_mode=str(spec.get("accessMode", "ReadWriteOnce")),
        allowed_clients=tuple(str(c) for c in spec.get("allowedClients") or ()),
        tls=tls,
        connections=_opt_int(spec, "connections"),
        qos=QoSSpec(
            read_bps=_opt_int(qos_raw, "readBytesPerSecond"),
            write_bps=_opt_int(qos_raw, "writeBytesPerSecond"),
            read_iops=_opt_int(qos_raw, "readIOPS"),
            write_iops=_opt_int(qos_raw, "writeIOPS"),
        ),
        server=ServerSpec(
            image=server_raw.get("image"),
            image_pull_policy=server_raw.get("imagePullPolicy"),
            resources=server_raw.get("resources"),
            node_selector=dict(server_raw.get("nodeSelector") or {}),
            tolerations=tuple(server_raw.get("tolerations") or ()),
        ),
    )
    if result.file_backed and result.size_bytes is None:
        raise SpecError(f"spec.size is required for a {kind} source")
    if kind == "memory" and (result.read_only or result.copy_on_write):
        raise SpecError("a memory export starts empty; readOnly and copyOnWrite make no sense")
    _check_format(result, given=spec.get("format") is not None)
    if kind == "image":
        _check_image(result)
    if result.source_kind == "volumeClaimTemplate" and result.size_bytes is None:
        raise SpecError("spec.size is required for a volumeClaimTemplate source")
    return result


def _check_format(spec: ExportSpec, *, given: bool) -> None:
    """The CRD's format rules, again (a schema bypass must not reach the server's flags)."""
    if spec.format not in FORMATS:
        raise SpecError(f"format must be one of {', '.join(FORMATS)}, not {spec.format!r}")
    if spec.format in READ_ONLY_FORMATS and not (
        spec.read_only or spec.copy_on_write or spec.persistent_overlay
    ):
        raise SpecError(f"format {spec.format} is served read-only: set readOnly or copyOnWrite")
    if spec.source_kind == "memory" and spec.format != "raw":
        raise SpecError("a memory export is raw: format must be raw or absent")
    if spec.source_kind == "export" and given:
        raise SpecError("a clone serves its base's format: leave format unset")


def _check_image(spec: ExportSpec) -> None:
    """The CRD's image rules, again."""
    src = spec.source
    if bool(src.get("url")) == bool(src.get("s3")):
        raise SpecError("source.image needs exactly one of url and s3")
    if spec.image_mode not in ("import", "stream"):
        raise SpecError(f"source.image.mode must be import or stream, not {spec.image_mode!r}")
    if spec.image_mode == "import" and spec.size_bytes is None:
        raise SpecError("spec.size is required for an image import (the claim's image room)")
    if spec.persistent_overlay and spec.size_bytes is None:
        raise SpecError("spec.size is required for a writable image stream (its overlay's room)")
    if spec.volume_mode == "Block" and spec.format != "raw":
        raise SpecError("an import into a Block claim needs format raw")


# Children names: deterministic, derived from the export's name only, so a restarted operator
# finds what it created and two exports can never collide.
def server_name(export: str) -> str:
    """The Deployment and the Service of an export share this name."""
    return f"{export}-nbd"


def claim_name(export: str) -> str:
    """The PersistentVolumeClaim the operator creates for a volumeClaimTemplate source."""
    return data_claim_name(export)


def import_job_name(export: str) -> str:
    """The Job that copies an image source into the export's claim."""
    return f"{export}-nbd-import"


def overlay_claim_name(export: str) -> str:
    """The PersistentVolumeClaim that holds a clone's (or a stream's) copy-on-write overlay."""
    return f"{export}-nbd-overlay"


def policy_name(export: str) -> str:
    """The NetworkPolicy that admits only spec.allowedClients."""
    return f"{export}-nbd-clients"


def selector_labels(export: str) -> dict[str, str]:
    """The labels that select an export's server pod (Deployment selector, Service, policy)."""
    return {
        "app.kubernetes.io/name": "nbdserver",
        "app.kubernetes.io/instance": export,
        "app.kubernetes.io/component": "nbd-server",
    }


def child_labels(export: str, component: str = "nbd-server") -> dict[str, str]:
    """The full app.kubernetes.io/* label set on every object the operator creates."""
    labels = selector_labels(export)
    labels["app.kubernetes.io/component"] = component
    labels["app.kubernetes.io/part-of"] = PART_OF
    labels["app.kubernetes.io/managed-by"] = MANAGED_BY
    labels[LABEL_EXPORT] = export
    return labels
