"""Recognise an image format from the first bytes of a file: only to *refuse*, never to choose.

Why: served as raw, a qcow2, VMDK or xz file is a disk of garbage (a 65 MiB qcow2 becomes a
65 MiB "disk" of metadata), and writing to it destroys the image. So an export without an
explicit ``--format`` whose header names a format is refused at start.

What it must not do: pick a format for an export. Probing a *writable* raw image is qemu's known
hole: a guest writes a qcow2 header into its raw disk, and the next start that probes reads the
disk as qcow2 (with a backing file of the guest's choosing, e.g. /etc/shadow). The format of an
image is configuration, never a guess.
"""

from __future__ import annotations

import os

QCOW2_MAGIC = b"QFI\xfb"
VMDK_MAGIC = b"KDMV"
VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
XZ_MAGIC = b"\xfd7zXZ\x00"
_HEAD = 512


def detect(head: bytes) -> str | None:
    """The format ``head`` (the first bytes of an image) declares, or None for none known."""
    if head.startswith(QCOW2_MAGIC):
        return "qcow2"
    if head.startswith(VMDK_MAGIC) or head.lstrip(b"\n\r").startswith(VMDK_DESCRIPTOR):
        return "vmdk"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return None


def detect_path(path: str) -> str | None:
    """``detect`` on the file at ``path``; None when it cannot be read (the open reports that)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return detect(os.pread(fd, _HEAD, 0))
    except OSError:
        return None
    finally:
        os.close(fd)
