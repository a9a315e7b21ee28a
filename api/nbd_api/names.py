"""Names of the NBDExport API: group, version, kind, finalizer, annotations, conditions.

Why it exists: every string that both the operator and the agent (and the CRD, and the chart's
RBAC) must spell the same way is defined here, once. Tests compare these against the CRD file.

What it must not do: hold logic or import anything outside the standard library.
"""

from __future__ import annotations

from typing import Final, Literal

GROUP: Final = "nbd.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "NBDExport"
PLURAL: Final = "nbdexports"
SINGULAR: Final = "nbdexport"
SHORT_NAME: Final = "nbdx"

# The CSI driver name equals the API group (DESIGN section 2).
CSI_DRIVER: Final = GROUP

# The port every export's server listens on (IANA "nbd"); the Service exposes the same port.
NBD_PORT: Final = 10809

# Everything the operator writes into metadata lives under our own group, not kopf's default
# (kopf.zalando.org): the finalizer, kopf's progress and diff-base annotations, our labels.
ANNOTATION_PREFIX: Final = GROUP
FINALIZER: Final = f"{GROUP}/finalizer"

Phase = Literal["Pending", "Provisioning", "Ready", "Failed", "Terminating"]
PHASES: Final[tuple[Phase, ...]] = ("Pending", "Provisioning", "Ready", "Failed", "Terminating")

AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany"]
ACCESS_MODES: Final[tuple[AccessMode, ...]] = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany")


def data_claim_name(export: str) -> str:
    """The PersistentVolumeClaim the operator creates for a volumeClaimTemplate source (the
    CSI controller snapshots and clones it)."""
    return f"{export}-nbd-data"


# Condition types in status.conditions (metav1.Condition shape).
COND_READY: Final = "Ready"
COND_SOURCE_BOUND: Final = "SourceBound"
COND_SERVER_AVAILABLE: Final = "ServerAvailable"
# False when the operator refuses part of a spec it cannot apply (e.g. shrinking the size);
# the export keeps serving what it served before.
COND_SPEC_VALID: Final = "SpecValid"

# Field names inside status, for readers that walk the raw object.
STATUS_PHASE: Final = "phase"
STATUS_URI: Final = "uri"
STATUS_SIZE_BYTES: Final = "sizeBytes"
STATUS_READ_ONLY: Final = "readOnly"
STATUS_ACCESS_MODE: Final = "accessMode"
STATUS_ATTACHMENTS: Final = "attachments"
STATUS_ATTACHMENT_COUNT: Final = "attachmentCount"
STATUS_OBSERVED_GENERATION: Final = "observedGeneration"
STATUS_CONDITIONS: Final = "conditions"
STATUS_MESSAGE: Final = "message"
STATUS_TLS: Final = "tls"
