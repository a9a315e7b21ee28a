"""The node plugin's side of host-device volumes: resolve the admin's allowlist, publish it.

Why it exists: only the node sees its disks. The admin names the devices kube-nbd may give away
as path globs (``--host-device '/dev/disk/by-id/nvme-*'``, from the chart's
``agent.hostDevices.paths``); this module resolves them here and publishes the result, with each
device's size, as this node's inventory Lease (``hostdevices.inventory_lease``), renewed every
interval so the controller can tell a live node from a gone one.

A matched path is published only when it is a block device that nothing on the node stacks on:
no partitions and no holders (LVM, MD, dm-crypt, multipath) in sysfs. A disk with a mounted
partition therefore never qualifies; an allowlisted whole disk mounted directly does, so the
allowlist must name disks reserved for kube-nbd (docs/csi.md says so).

After each publish it hands the published devices to the ``host_wipe.Wiper``, which zeroes
those whose volumes were deleted from a ``wipeOnDelete`` class.

What it must not do: open, read or write any device while scanning (sizes come from sysfs),
publish a path outside the allowlist, or publish a path the NBDExport schema would refuse.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nbd_agent.csi import hostdevices
from nbd_agent.csi.errors import CsiError
from nbd_agent.csi.host_wipe import Wiper
from nbd_agent.csi.kube import Conflict, LeaseStore

log = logging.getLogger(__name__)

# The NBDExport schema's pattern for source.hostDevice.path.
_EXPORT_PATH = re.compile(r"^/dev/[A-Za-z0-9._/-]+$")
SECTOR = 512


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _sysfs_entry(sys_root: Path, real: str) -> Path | None:
    entry = sys_root / "class" / "block" / os.path.basename(real)
    return entry if (entry / "size").is_file() else None


def _stacked(entry: Path) -> bool:
    """True when partitions or holders sit on the device: something else uses it."""
    holders = entry / "holders"
    if holders.is_dir() and any(holders.iterdir()):
        return True
    return any((child / "partition").is_file() for child in entry.iterdir() if child.is_dir())


def scan(
    patterns: Sequence[str],
    root: str = "",
    is_block: Callable[[str], bool] = is_block_device,
) -> list[tuple[str, int]]:
    """(path, bytes) of every free block device the allowlist globs match, each device once
    (under the first path that named it), in allowlist order. ``root`` is where the node's
    /dev and /sys are seen (the agent's container mounts them at /; tests give a tree)."""
    found: list[tuple[str, int]] = []
    seen: set[str] = set()
    for pattern in patterns:
        for match in sorted(glob.glob(root + pattern)):
            path, real = match[len(root) :], os.path.realpath(match)
            if real in seen or not is_block(match):
                continue
            if not _EXPORT_PATH.match(path) or ".." in path:
                log.warning("host device %s: its path is not one an NBDExport accepts", path)
                continue
            entry = _sysfs_entry(Path(root + "/sys"), real)
            if entry is None:
                log.warning("host device %s (%s) has no size in sysfs; skipped", path, real)
                continue
            if _stacked(entry):
                log.info("host device %s has partitions or holders: in use, not offered", path)
                continue
            size = int((entry / "size").read_text().strip() or 0) * SECTOR
            if size > 0:
                seen.add(real)
                found.append((path, size))
    return found


class Publisher:
    """Publishes this node's inventory Lease now and then every ``interval`` seconds."""

    def __init__(
        self,
        leases: LeaseStore,
        namespace: str,
        node: str,
        patterns: Sequence[str],
        interval: float = 30,
        scanner: Callable[[Sequence[str]], list[tuple[str, int]]] = scan,
        wiper: Wiper | None = None,
    ) -> None:
        self.leases = leases
        self.namespace = namespace
        self.node = node
        self.patterns = list(patterns)
        self.interval = interval
        self.scanner = scanner
        self.wiper = wiper  # None: released devices marked Wiping stay claimed
        self._thread: threading.Thread | None = None

    def publish_once(self) -> list[tuple[str, int]]:
        devices = self.scanner(self.patterns)
        # Three missed renewals before the controller stops offering the node's devices.
        duration = max(1, int(self.interval * 3))
        body = hostdevices.inventory_lease(self.namespace, self.node, devices, duration)
        try:
            self.leases.create(body)
        except Conflict:
            patch: dict[str, Any] = {"metadata": {"annotations": body["metadata"]["annotations"]}}
            patch["spec"] = body["spec"]
            self.leases.patch(self.namespace, body["metadata"]["name"], patch)
        if self.wiper is not None:
            self.wiper.start_due(devices)
        return devices

    def start(self, stop: threading.Event) -> None:
        def loop() -> None:
            while not stop.is_set():
                try:
                    devices = self.publish_once()
                    log.debug("published %d host devices", len(devices))
                except (CsiError, OSError) as exc:
                    log.warning("publishing this node's host devices failed: %s", exc)
                stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="host-inventory", daemon=True)
        self._thread.start()
