"""A typed, read-only view of an NBDExport's status, and the helpers to build its values.

Why it exists: the agent needs a handful of status fields (where to connect, how big, may it
write, who else is attached) and should not walk raw dicts with string keys scattered around
its code. The operator uses the same helpers (``export_uri``, ``parse_quantity``) to write them.

What it must not do: talk to Kubernetes, or decide anything; it only reads what the operator
wrote. A missing or malformed status reads as "not ready", never as a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, cast

from nbd_api.attachments import Attachment
from nbd_api.names import ACCESS_MODES, COND_READY, NBD_PORT, PHASES, AccessMode, Phase

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_QUANTITY = re.compile(r"^([+]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def parse_quantity(value: int | str) -> int:
    """Turn a Kubernetes quantity (``10Gi``, ``1G``, ``4096``) into a whole number of bytes.

    Raises ValueError for anything that is not a whole, non-negative number of bytes
    (``1.5``, ``100m``, ``-1``): a block device size cannot be fractional.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise ValueError(f"not a quantity of bytes: {value!r}")
    number, suffix = match.groups()
    try:
        amount = Decimal(number)
    except InvalidOperation as exc:
        raise ValueError(f"not a quantity of bytes: {value!r}") from exc
    if suffix is None:
        scaled = amount
    elif suffix in _BINARY:
        scaled = amount * _BINARY[suffix]
    elif suffix in _DECIMAL:
        scaled = amount * _DECIMAL[suffix]
    else:
        scaled = amount.scaleb(int(suffix[1:]))
    if scaled != scaled.to_integral_value():
        raise ValueError(f"size must be a whole number of bytes: {value!r}")
    return int(scaled)


def export_uri(service: str, namespace: str, export: str, *, tls: bool) -> str:
    """The NBD URI of an export behind its Service, per the NBD URI specification.

    ``nbds://`` when TLS is required; the path component is the export name.
    """
    scheme = "nbds" if tls else "nbd"
    return f"{scheme}://{service}.{namespace}.svc:{NBD_PORT}/{export}"


@dataclass(frozen=True)
class ExportStatus:
    """What the operator last reported about one NBDExport."""

    name: str
    namespace: str
    phase: Phase | None
    uri: str | None
    size_bytes: int | None
    read_only: bool
    access_mode: AccessMode
    tls: bool
    ready: bool
    generation: int | None
    observed_generation: int | None
    attachments: tuple[Attachment, ...] = field(default_factory=tuple)

    @property
    def current(self) -> bool:
        """True when the status describes the latest spec (no update still in flight)."""
        if self.generation is None or self.observed_generation is None:
            return self.observed_generation is not None or self.generation is None
        return self.observed_generation >= self.generation

    @property
    def usable(self) -> bool:
        """True when a node may connect: Ready, with a URI, for the current spec.

        ``size_bytes`` may be None (a host device, a non-raw image or a stream whose server
        has not announced its size yet); the NBD handshake reports the real size either way.
        """
        return self.ready and self.phase == "Ready" and bool(self.uri) and self.current

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> ExportStatus:
        """Read the status of a raw NBDExport object (as returned by the API)."""
        meta = obj.get("metadata") or {}
        status = obj.get("status") or {}
        phase = status.get("phase")
        mode = status.get("accessMode")
        size = status.get("sizeBytes")
        conditions = status.get("conditions") or []
        ready = any(
            c.get("type") == COND_READY and c.get("status") == "True"
            for c in conditions
            if isinstance(c, Mapping)
        )
        entries = status.get("attachments") or []
        attachments = tuple(Attachment.from_status(a) for a in entries if isinstance(a, Mapping))
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            phase=cast(Phase, phase) if phase in PHASES else None,
            uri=status.get("uri") or None,
            size_bytes=size if isinstance(size, int) and not isinstance(size, bool) else None,
            read_only=bool(status.get("readOnly", False)),
            access_mode=cast(AccessMode, mode) if mode in ACCESS_MODES else "ReadWriteOnce",
            tls=bool(status.get("tls", False)),
            ready=ready,
            generation=meta.get("generation"),
            observed_generation=status.get("observedGeneration"),
            attachments=attachments,
        )
