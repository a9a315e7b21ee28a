"""Start-up reconciliation: make the recorded node state, the kernel and the mounts agree again.

Why it exists: the agent may be restarted at any point between kubelet's calls (or in the middle
of one). The kernel kept its NBD devices and the mounts are still there, but nobody watches the
devices' links any more, and some volumes may have been left half-done. Before serving gRPC, the
agent walks its state file once and, per volume:

- re-arms reconnection for every device that is still attached to its URI (``adopt``);
- forgets publish targets that are no longer mounted (kubelet already cleaned them, or a crash
  hit between bind and save);
- tears down what kubelet no longer wants: an ephemeral volume with no target left, a staged
  volume whose staging directory kubelet has removed and that has no target left;
- repairs what it still wants: re-attaches and re-mounts a staged volume whose device or staging
  mount went away (node reboot), so bind mounts of later publishes see the data.

What it must not do: guess about volumes it has no record of (a mount it did not make is never
touched), or stop at the first broken volume (each is handled and logged on its own).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from nbd_agent.csi import mounter
from nbd_agent.csi.state import VolumeRecord
from nbd_agent.csi.volumes import Volumes

log = logging.getLogger(__name__)


@dataclass
class Report:
    adopted: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    torn_down: list[str] = field(default_factory=list)
    dropped_targets: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def reconcile(volumes: Volumes) -> Report:
    report = Report()
    for record in list(volumes.state.volumes.values()):
        try:
            _reconcile_one(volumes, record, report)
        except Exception as exc:
            log.warning("reconcile %s: %s", record.volume_id, exc)
            report.failed[record.volume_id] = str(exc)
    log.info(
        "reconciled: adopted %s, repaired %s, torn down %s, dropped targets %s, failed %s",
        report.adopted,
        report.repaired,
        report.torn_down,
        report.dropped_targets,
        sorted(report.failed),
    )
    return report


def _reconcile_one(volumes: Volumes, record: VolumeRecord, report: Report) -> None:
    attached = bool(record.device) and volumes.attacher.is_attached(record.device, record.uri)
    if attached:
        volumes.attacher.adopt(record.device, record.uri)
        report.adopted.append(record.volume_id)
    for target in list(record.targets):
        if not mounter.is_mounted(target):
            del record.targets[target]
            report.dropped_targets.append(target)
    volumes.state.save()
    wanted = bool(record.targets) or (not record.ephemeral and os.path.isdir(record.staging_path))
    if not wanted:
        volumes.teardown(record)
        report.torn_down.append(record.volume_id)
        return
    staged_ok = attached and (record.block or mounter.is_mounted(record.staging_path))
    if not staged_ok:
        volumes.ensure_staged(record)
        if record.device:
            volumes.attacher.adopt(record.device, record.uri)
        report.repaired.append(record.volume_id)
