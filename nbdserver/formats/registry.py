"""The image formats by name: adding one is a module with an ``open(source, read_only)``
callable (``source``: a path, or an ``ImageFile`` over any backend) and one line below.

Why: ``--format``, ``-e NAME=PATH,format=...`` and the header refusal all need the one list of
formats and whether each can write.

What it must not do: wrap formats in filters (``nbdserver.exports.stack`` does), know the
configuration model, or guess a format (``nbdserver.formats.probe`` only refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nbdserver.backends.base import Backend
from nbdserver.formats._image import ImageFile
from nbdserver.formats.qcow2 import backend as qcow2
from nbdserver.formats.vmdk import VmdkBackend
from nbdserver.formats.xz import XzBackend


@dataclass(frozen=True)
class FormatKind:
    """``open(source, read_only)`` gives the backend (``source``: a path or an ``ImageFile``);
    ``can_write``: False for read-only formats
    (a writable export of one is refused at start: give ``--read-only`` or ``--copy-on-write``).
    ``confined``: the format follows references to other files (a backing chain) and takes
    ``allow_outside`` to let them leave the image's directory."""

    name: str
    open: Callable[..., Backend]
    can_write: bool
    confined: bool = False


def _read_only(backend: Callable[[str | ImageFile], Backend]) -> Callable[..., Backend]:
    """A read-only format's ``open``: a writable export of it is refused before this runs."""
    return lambda source, read_only: backend(source)


RAW = "raw"  # the file itself, opened by the backend registry: not in FORMATS
# One line per format.
FORMATS: dict[str, FormatKind] = {
    k.name: k
    for k in (
        FormatKind("qcow2", qcow2.open_qcow2, can_write=True, confined=True),
        FormatKind("vmdk", _read_only(VmdkBackend), can_write=False),
        FormatKind("xz", _read_only(XzBackend), can_write=False),
    )
}
NAMES: tuple[str, ...] = (RAW, *FORMATS)
