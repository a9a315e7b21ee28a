"""Zeroing a released host device (StorageClass parameter ``wipeOnDelete: "true"``).

Why it exists: a host-device volume's data stays on its device after DeleteVolume, and the next
claim would read it. With ``wipeOnDelete`` the controller does not free the device: it marks the
device's claim Lease ``Wiping``. Only the node can write the device, so its node plugin, each
time it publishes its inventory, looks up the claim of every device it publishes (by name: the
claim's name is a hash of node and path) and, for a claim marked Wiping whose NBDExport is gone,
zeroes the whole device in the background and then deletes the claim: the device is free again.

A device is zeroed only when all of these hold: it is in this node's allowlist and scan right
now; its claim names exactly this node and path; the claim is marked Wiping; and the export that
held it no longer exists. Zeroing is BLKZEROOUT (the kernel writes zeroes, or unmaps where the
device guarantees zeroes) in slices, falling back to plain writes of zeroes.

What it must not do: touch a device that fails any of those checks, run two wipes of one device,
or hold up the inventory renewals (wipes run on their own threads).
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any, Protocol

from nbd_agent.csi import hostdevices
from nbd_agent.csi.errors import CsiError

log = logging.getLogger(__name__)

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range {start, length} of a block device
SLICE = 256 * 2**20  # one ioctl call's range: short enough to log progress and stop between


class Getter(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def delete(self, namespace: str, name: str) -> None: ...


def zero_device(path: str, size: int) -> None:
    """Write zeroes over the first ``size`` bytes of the block device at ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < size:
            length = min(SLICE, size - offset)
            try:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
            except OSError:
                # No BLKZEROOUT here (an old kernel, a device that refuses it): write zeroes.
                zeros = bytes(min(length, 4 * 2**20))
                end = offset + length
                while offset < end:
                    offset += os.pwrite(fd, zeros[: end - offset], offset)
                continue
            offset += length
        os.fsync(fd)
    finally:
        os.close(fd)


class Wiper:
    """Finds this node's released devices to wipe and wipes each once, on its own thread."""

    def __init__(self, leases: Getter, exports: Getter, namespace: str, node: str) -> None:
        self.leases = leases
        self.exports = exports
        self.namespace = namespace
        self.node = node
        self._busy: set[str] = set()
        self._guard = threading.Lock()
        self.threads: list[threading.Thread] = []

    def due(self, devices: Sequence[tuple[str, int]]) -> list[tuple[str, int, str]]:
        """(path, size, claim name) of the published devices whose claims ask for a wipe now."""
        out = []
        for path, size in devices:
            claim = hostdevices.claim_name(hostdevices.Device(self.node, path, size))
            lease = self.leases.get(self.namespace, claim)
            if lease is None or not hostdevices.wiping(lease):
                continue
            named = hostdevices.claim_device(lease)
            if named is None or (named.node, named.path) != (self.node, path):
                continue  # a hash collision or a hand-edited claim: never wipe on a guess
            holder = str((lease.get("spec") or {}).get("holderIdentity") or "")
            if holder and self.exports.get(self.namespace, holder) is not None:
                continue  # its export is still being deleted
            out.append((path, size, claim))
        return out

    def start_due(self, devices: Sequence[tuple[str, int]]) -> None:
        for path, size, claim in self.due(devices):
            with self._guard:
                if path in self._busy:
                    continue
                self._busy.add(path)
            thread = threading.Thread(
                target=self._wipe, args=(path, size, claim), name=f"wipe {path}", daemon=True
            )
            self.threads.append(thread)
            thread.start()

    def _wipe(self, path: str, size: int, claim: str) -> None:
        try:
            log.info("wiping host device %s (%d bytes) released by its volume", path, size)
            zero_device(path, size)
            self.leases.delete(self.namespace, claim)
            log.info("host device %s is zeroed and free again", path)
        except (OSError, CsiError) as exc:
            log.warning("wiping host device %s failed (retried later): %s", path, exc)
        finally:
            with self._guard:
                self._busy.discard(path)
