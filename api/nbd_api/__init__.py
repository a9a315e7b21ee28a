"""The NBDExport API names, shared by the operator and the node agent.

Why it exists: the operator writes an NBDExport's status and the agent reads it; both must agree
on the group, version, plural, status field names and on how a node records that it has an export
attached. Defining those once, here, keeps the two from drifting apart. The schema itself lives in
``crds/nbdexport.yaml`` (its one source); this module only names things.

What it must not do: import kopf, a Kubernetes client, nbdserver or either component. It is
plain data and pure functions, so the agent can use it without pulling in the operator's stack.

Attachments are recorded as ``coordination.k8s.io/v1`` Lease objects that the agent creates in
the export's namespace (see :mod:`nbd_api.attachments`). The operator mirrors them into
``status.attachments`` for display; the Leases stay the truth.
"""

from __future__ import annotations

from nbd_api.attachments import (
    ATTACHMENT_LEASE_PREFIX,
    LABEL_EXPORT,
    LABEL_NODE,
    LABEL_ROLE,
    LEASE_ANNOTATION_DEVICE,
    LEASE_ANNOTATION_MODE,
    ROLE_ATTACHMENT,
    ROLE_WRITER,
    Attachment,
    attachment_from_lease,
    attachment_lease,
    attachment_lease_name,
    writer_lease,
    writer_lease_name,
)
from nbd_api.names import (
    ACCESS_MODES,
    ANNOTATION_PREFIX,
    API_VERSION,
    COND_READY,
    COND_SERVER_AVAILABLE,
    COND_SOURCE_BOUND,
    COND_SPEC_VALID,
    CSI_DRIVER,
    FINALIZER,
    GROUP,
    KIND,
    NBD_PORT,
    PHASES,
    PLURAL,
    SHORT_NAME,
    SINGULAR,
    VERSION,
    AccessMode,
    Phase,
    data_claim_name,
)
from nbd_api.status import ExportStatus, export_uri, parse_quantity

__all__ = [
    "ACCESS_MODES",
    "ANNOTATION_PREFIX",
    "API_VERSION",
    "ATTACHMENT_LEASE_PREFIX",
    "COND_READY",
    "COND_SERVER_AVAILABLE",
    "COND_SOURCE_BOUND",
    "COND_SPEC_VALID",
    "CSI_DRIVER",
    "FINALIZER",
    "GROUP",
    "KIND",
    "LABEL_EXPORT",
    "LABEL_NODE",
    "LABEL_ROLE",
    "LEASE_ANNOTATION_DEVICE",
    "LEASE_ANNOTATION_MODE",
    "NBD_PORT",
    "PHASES",
    "PLURAL",
    "ROLE_ATTACHMENT",
    "ROLE_WRITER",
    "SHORT_NAME",
    "SINGULAR",
    "VERSION",
    "AccessMode",
    "Attachment",
    "ExportStatus",
    "Phase",
    "attachment_from_lease",
    "attachment_lease",
    "attachment_lease_name",
    "data_claim_name",
    "export_uri",
    "parse_quantity",
    "writer_lease",
    "writer_lease_name",
]
