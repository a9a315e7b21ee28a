"""Bring one volume up (lock, attach, format-if-blank, mount) and down again, with rollback.

Why it exists: NodeStageVolume, ephemeral NodePublishVolume, NodeUnstageVolume, ephemeral
NodeUnpublishVolume and the start-up reconciler all perform the same few steps in the same order.
Doing them in one place keeps the order that protects data: take the writer Lease before
attaching read-write, record the device in the state file before touching its contents, format
only what ``mounter.probe`` calls blank, and undo every completed step when a later one fails.

What it must not do: validate CSI requests or take the per-volume lock (``node.py`` does both
before calling in), or talk to gRPC.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Protocol

from nbd_agent.csi import mounter
from nbd_agent.csi.attacher import Attacher
from nbd_agent.csi.errors import CsiError, FailedPrecondition, Internal, Unavailable
from nbd_agent.csi.sources import VolumeSource
from nbd_agent.csi.state import NodeState, VolumeRecord

log = logging.getLogger(__name__)


class Leases(Protocol):
    """The cluster-side records of an attachment (``kube.py``, protocol of
    ``nbd_api.attachments``): the writer Lease that makes a ReadWriteOnce export single-writer,
    and the per-node attachment Lease the operator mirrors into the export's status."""

    def acquire_writer(self, namespace: str, export: str) -> str: ...

    def record_attachment(
        self, namespace: str, export: str, device: str, read_only: bool
    ) -> str: ...

    def release(self, lease_ref: str) -> None: ...

    def record_event(self, namespace: str, export: str, reason: str, message: str) -> None: ...


@dataclass(frozen=True)
class Capability:
    """The parts of a CSI VolumeCapability the plugin acts on."""

    block: bool
    fs_type: str
    mount_flags: tuple[str, ...]
    mode: int
    write: bool
    multi_node_write: bool


class Volumes:
    """Setup and teardown of volumes on this node; callers hold the volume's lock."""

    def __init__(self, state: NodeState, attacher: Attacher, leases: Leases | None):
        self.state = state
        self.attacher = attacher
        self.leases = leases

    def needs_writer_lease(self, source: VolumeSource, cap: Capability) -> bool:
        return cap.write and bool(source.export) and source.access_mode == "ReadWriteOnce"

    def setup(
        self, volume_id: str, source: VolumeSource, cap: Capability, staging: str, ephemeral: bool
    ) -> VolumeRecord:
        """Lease, attach, record, and for filesystem volumes format-if-blank and mount."""
        read_only = source.read_only or not cap.write
        self._check_no_second_writer(volume_id, source, read_only)
        lease = ""
        attachment = ""
        if source.export and self.leases is None:
            raise Unavailable(
                f"{source.export} is an NBDExport: the agent needs the Kubernetes API"
            )
        if self.leases is not None and self.needs_writer_lease(source, cap):
            lease = self.leases.acquire_writer(source.namespace, source.name)
        try:
            device = self._orphan(source.uri, read_only) or self.attacher.attach(
                source.uri, read_only, source.connections
            )
        except BaseException:
            self._release(lease)
            raise
        try:
            if self.leases is not None and source.export:
                attachment = self.leases.record_attachment(
                    source.namespace, source.name, device, read_only
                )
        except BaseException:
            self.attacher.detach(device)
            self._release(lease)
            raise
        record = VolumeRecord(
            volume_id=volume_id,
            uri=source.uri,
            device=device,
            connections=source.connections,
            read_only=read_only,
            block=cap.block,
            access_mode=cap.mode,
            fs_type=cap.fs_type,
            mount_flags=list(cap.mount_flags),
            staging_path=staging,
            ephemeral=ephemeral,
            export=source.export,
            lease=lease,
            attachment=attachment,
            identity=self.attacher.identity(device),
        )
        # Recorded before any byte of the device is looked at: a crash from here on leaves a
        # record that reconcile or a retried call can finish or undo.
        self.state.put(record)
        try:
            if not cap.block:
                self.mount_staging(record)
        except BaseException:
            self.teardown(record)
            raise
        log.info("volume %s: %s attached at %s", volume_id, source.uri, device)
        return record

    def _check_no_second_writer(
        self, volume_id: str, source: VolumeSource, read_only: bool
    ) -> None:
        """Two volumes on one node over the same export would be two independent filesystem
        mounts of one device's data: fine when all are read-only or the export is declared
        ReadWriteMany (cluster filesystem), corruption otherwise. The cluster-wide writer Lease
        cannot see this (the same node holds it for both), so it is checked here."""
        if source.access_mode == "ReadWriteMany":
            return
        for other in self.state.volumes.values():
            if other.volume_id == volume_id or other.uri != source.uri:
                continue
            if not (read_only and other.read_only):
                raise FailedPrecondition(
                    f"{source.export or source.uri} is already attached on this node as volume"
                    f" {other.volume_id} ({'read-only' if other.read_only else 'read-write'});"
                    " a second attachment with a writer would corrupt it"
                )

    def _orphan(self, uri: str, read_only: bool) -> str | None:
        """A device attached to ``uri`` that no record names: left by a crash between the
        kernel's CONNECT and the state file write. The retried call takes it over instead of
        attaching a second device and leaking the first."""
        owned = {r.device for r in self.state.volumes.values()}
        for device, ro in sorted(self.attacher.attached_devices(uri).items()):
            if device not in owned and ro == read_only:
                self.attacher.adopt(device, uri)
                log.warning("taking over %s, attached to %s by an earlier attempt", device, uri)
                return device
        return None

    def mount_staging(self, record: VolumeRecord) -> None:
        """Mount the device's filesystem at the staging path, creating one only on a blank
        device. A device that holds anything else is refused, never reformatted."""
        path, device = record.staging_path, record.device
        if mounter.is_mounted(path):
            return
        try:
            found = mounter.probe(device)
        except (mounter.MountError, OSError) as exc:
            raise Internal(f"probing {device}: {exc}") from exc
        fs_type = record.fs_type or mounter.DEFAULT_FS
        if found.fs_type:
            if record.fs_type and found.fs_type != record.fs_type:
                raise FailedPrecondition(
                    f"{record.uri} holds a {found.fs_type} filesystem, the volume asks for"
                    f" {record.fs_type}; refusing to reformat a device that holds data"
                )
            fs_type = found.fs_type
        elif not found.blank:
            what = found.other or "data without a filesystem signature"
            raise FailedPrecondition(
                f"{record.uri} is not blank ({what}); refusing to format it. Wipe it on purpose"
                " or publish it as volumeMode: Block"
            )
        elif record.read_only:
            raise FailedPrecondition(f"{record.uri} is blank and read-only: nothing to mount")
        else:
            try:
                mounter.mkfs(device, fs_type)
            except mounter.MountError as exc:
                raise Internal(str(exc)) from exc
            log.info("volume %s: formatted blank %s as %s", record.volume_id, device, fs_type)
        try:
            mounter.mount(device, path, fs_type, record.read_only, record.mount_flags)
        except mounter.MountError as exc:
            raise Internal(str(exc)) from exc
        record.fs_type = fs_type
        self.state.save()

    def ensure_staged(self, record: VolumeRecord) -> None:
        """Repair a recorded volume whose device or staging mount went away (node reboot,
        agent crash mid-stage) so an idempotent retry ends in the state it promises."""
        if not record.device or not self.attacher.is_attached(record.device, record.uri):
            if not record.block:
                self._unmount(record.staging_path)
            record.device = self.attacher.attach(
                record.uri, record.read_only, record.connections, record.identity
            )
            self.state.save()
        if not record.block:
            self.mount_staging(record)

    def report_refused(self, device: str, reason: str) -> None:
        """The keeper refused to reattach ``device`` (different data behind it): say so as a
        Warning Event on the volume's NBDExport (the log and the volume condition say it too)."""
        for record in list(self.state.volumes.values()):
            if record.device != device or not record.export or self.leases is None:
                continue
            namespace, _, name = record.export.partition("/")
            try:
                self.leases.record_event(namespace, name, "DataChanged", f"{device}: {reason}")
            except Exception as exc:  # an Event is best effort; the condition still tells
                log.warning("cannot record an Event on %s: %s", record.export, exc)

    def teardown(self, record: VolumeRecord) -> None:
        """Undo ``setup``: unmount staging, detach, give the Lease back, forget the volume.

        Each step tolerates having been done already, so a half-failed teardown can be retried.
        """
        if not record.block and record.staging_path:
            self._unmount(record.staging_path)
            if record.ephemeral:  # our own folder (kubelet's staging folders are kubelet's)
                with contextlib.suppress(OSError):
                    os.rmdir(record.staging_path)
        if record.device and self.attacher.is_attached(record.device, record.uri):
            self.attacher.detach(record.device)
        self._release(record.attachment)
        self._release(record.lease)
        self.state.remove(record.volume_id)
        log.info("volume %s: detached %s", record.volume_id, record.device or "(no device)")

    def _release(self, lease: str) -> None:
        if lease and self.leases is not None:
            self.leases.release(lease)

    @staticmethod
    def _unmount(path: str) -> None:
        try:
            mounter.unmount(path)
        except mounter.MountError as exc:
            raise Internal(str(exc)) from exc


def to_csi(exc: Exception, what: str) -> CsiError:
    """A mount-layer failure as a CSI error (attach and Kubernetes errors arrive as CsiError)."""
    if isinstance(exc, CsiError):
        return exc
    return Internal(f"{what}: {exc}")
