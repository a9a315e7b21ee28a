"""Where a CSI volume comes from: an NBDExport (by PV handle or inline), or a direct NBD URI.

Why it exists: kubelet hands the plugin a ``volume_id`` and a ``volume_context`` map; three
shapes of those mean three sources, and each must end as the same thing: a URI to attach, whether
the export may be written, its access mode, and which NBDExport (if any) the writer lock guards.

- PersistentVolume: ``csi.volumeHandle: <namespace>/<export>``; resolved through the export's
  status by the Kubernetes API.
- CSI ephemeral inline volume: ``volumeAttributes: {export: NAME}``, namespace taken from the
  pod (kubelet's ``csi.storage.k8s.io/pod.namespace`` when the CSIDriver sets podInfoOnMount).
- Direct: ``volumeAttributes: {uri: nbd://host:port/name}`` (also ``nbds://``, ``nbd+unix://``),
  for NBD servers outside the cluster. No NBDExport, so no writer lock: the server's own
  configuration decides who may write.

What it must not do: talk to Kubernetes itself (it receives an ``ExportLookup``), or trust a
status that the operator has not marked usable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from nbd_api import ExportStatus

from nbd_agent.csi.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

ATTR_EXPORT = "export"
ATTR_NAMESPACE = "namespace"
ATTR_URI = "uri"
ATTR_CONNECTIONS = "connections"
ATTR_READ_ONLY = "readOnly"
ATTR_EPHEMERAL = "csi.storage.k8s.io/ephemeral"
ATTR_POD_NAMESPACE = "csi.storage.k8s.io/pod.namespace"
URI_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
MAX_CONNECTIONS = 16
# RFC 1123 DNS label (namespaces) and subdomain (object names), as Kubernetes validates them.
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


class ExportLookup(Protocol):
    """Reads one NBDExport; returns None when it does not exist."""

    def get_export(self, namespace: str, name: str) -> ExportStatus | None: ...


@dataclass(frozen=True)
class VolumeSource:
    """A resolved volume: what to attach and under which rules."""

    uri: str
    read_only: bool
    access_mode: str
    export: str = ""  # "namespace/name" of the NBDExport, empty for a direct URI
    size_bytes: int | None = None
    connections: int = 1

    @property
    def namespace(self) -> str:
        return self.export.partition("/")[0]

    @property
    def name(self) -> str:
        return self.export.partition("/")[2]


def is_ephemeral(context: Mapping[str, str]) -> bool:
    return context.get(ATTR_EPHEMERAL, "").lower() == "true"


def check_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in URI_SCHEMES:
        raise InvalidArgument(f"uri {uri!r}: scheme must be one of {', '.join(URI_SCHEMES)}")
    if parts.scheme.endswith("+unix"):
        if "socket=" not in parts.query:
            raise InvalidArgument(f"uri {uri!r}: a unix URI needs ?socket=PATH")
    elif not parts.hostname:
        raise InvalidArgument(f"uri {uri!r}: no host")
    return uri


def _connections(context: Mapping[str, str]) -> int:
    raw = context.get(ATTR_CONNECTIONS, "1")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_CONNECTIONS:
        raise InvalidArgument(f"connections must be 1..{MAX_CONNECTIONS}, got {raw!r}")
    return int(raw)


def export_ref(volume_id: str, context: Mapping[str, str]) -> tuple[str, str] | None:
    """The (namespace, name) of the NBDExport a request refers to, or None for a direct URI.

    Raises INVALID_ARGUMENT when neither a well-formed reference nor a URI is given.
    """
    if ATTR_URI in context:
        return None
    if ATTR_EXPORT in context:
        name = context[ATTR_EXPORT]
        namespace = context.get(ATTR_POD_NAMESPACE) or context.get(ATTR_NAMESPACE, "")
        if not namespace:
            raise InvalidArgument(
                f"export {name!r} given without a namespace: set podInfoOnMount on the CSIDriver"
                f" (kubelet then passes {ATTR_POD_NAMESPACE}) or the {ATTR_NAMESPACE!r} attribute"
            )
    else:
        namespace, sep, name = volume_id.partition("/")
        if not sep:
            raise InvalidArgument(
                f"volume id {volume_id!r} is not <namespace>/<export>, and the volume has"
                f" neither an {ATTR_EXPORT!r} nor a {ATTR_URI!r} attribute"
            )
    if not _LABEL.match(namespace) or not _SUBDOMAIN.match(name):
        raise InvalidArgument(f"{namespace}/{name} is not a valid namespace/export name")
    return namespace, name


def resolve(
    volume_id: str, context: Mapping[str, str], lookup: ExportLookup | None
) -> VolumeSource:
    """Turn a request's volume id and context into a VolumeSource, or a CSI error."""
    connections = _connections(context)
    ref = export_ref(volume_id, context)
    if ref is None:
        read_only = context.get(ATTR_READ_ONLY, "false").lower() == "true"
        return VolumeSource(
            uri=check_uri(context[ATTR_URI]),
            read_only=read_only,
            access_mode="ReadOnlyMany" if read_only else "ReadWriteOnce",
            connections=connections,
        )
    namespace, name = ref
    if lookup is None:
        raise Unavailable(
            f"volume {namespace}/{name} names an NBDExport, but this agent has no Kubernetes"
            " API access (run it in a cluster, or give a direct 'uri' attribute)"
        )
    status = lookup.get_export(namespace, name)
    if status is None:
        raise NotFound(f"NBDExport {namespace}/{name} does not exist")
    if not status.usable or status.uri is None:
        raise Unavailable(
            f"NBDExport {namespace}/{name} is not ready yet (phase {status.phase or 'unknown'})"
        )
    return VolumeSource(
        uri=status.uri,
        read_only=status.read_only,
        access_mode=status.access_mode,
        export=f"{namespace}/{name}",
        size_bytes=status.size_bytes,
        connections=connections,
    )


def check_access(source: VolumeSource, *, wants_write: bool, multi_node_write: bool) -> None:
    """Refuse capabilities the export cannot give (FAILED_PRECONDITION, as the spec says)."""
    if wants_write and source.read_only:
        raise FailedPrecondition(f"{source.export or source.uri} is read-only; ask for read access")
    if wants_write and source.access_mode == "ReadOnlyMany":
        raise FailedPrecondition(f"{source.export or source.uri} has accessMode ReadOnlyMany")
    if multi_node_write and source.access_mode != "ReadWriteMany":
        raise FailedPrecondition(
            f"{source.export or source.uri} has accessMode {source.access_mode}: writers on"
            " several nodes need ReadWriteMany (and a cluster filesystem)"
        )
