"""The CSI Node service: argument checks, per-volume locking and idempotency for each RPC.

Why it exists: this is where the CSI spec's rules for the node live, in the order the reference
driver uses: validate the request first (INVALID_ARGUMENT), then take the volume's lock (ABORTED
if busy), then treat "already done, compatibly" as success and "already done, differently" as
ALREADY_EXISTS. The actual bring-up and tear-down is ``volumes.Volumes``.

What it must not do: import grpc (requests and responses are plain protobuf messages; the server
module maps ``CsiError`` to status codes), or talk to Kubernetes or the kernel directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from nbd_agent.csi import mounter
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi.attacher import Attacher
from nbd_agent.csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from nbd_agent.csi.hostdevices import TOPOLOGY_KEY, is_label_value
from nbd_agent.csi.locks import VolumeLocks
from nbd_agent.csi.sources import ATTR_URI, ExportLookup, check_access, is_ephemeral, resolve
from nbd_agent.csi.state import NodeState, Target, VolumeRecord
from nbd_agent.csi.volumes import Capability, Leases, Volumes, to_csi

log = logging.getLogger(__name__)
Mode = pb.VolumeCapability.AccessMode
_WRITE_MODES = {
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
    Mode.MULTI_NODE_SINGLE_WRITER,
    Mode.MULTI_NODE_MULTI_WRITER,
}
_MULTI_NODE_WRITE = {Mode.MULTI_NODE_SINGLE_WRITER, Mode.MULTI_NODE_MULTI_WRITER}


def _required(value: str, name: str) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required")
    return value


def _absolute(value: str, name: str) -> str:
    _required(value, name)
    if not os.path.isabs(value) or "\0" in value:
        raise InvalidArgument(f"{name} must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def parse_capability(cap: pb.VolumeCapability, present: bool) -> Capability:
    if not present:
        raise InvalidArgument("volume_capability is required")
    kind = cap.WhichOneof("access_type")
    if kind is None:
        raise InvalidArgument("volume_capability needs block or mount access_type")
    mode = cap.access_mode.mode
    if mode == Mode.UNKNOWN:
        raise InvalidArgument("volume_capability.access_mode is required")
    fs_type = cap.mount.fs_type if kind == "mount" else ""
    if fs_type and fs_type not in mounter.SUPPORTED_FS:
        raise InvalidArgument(
            f"fs_type {fs_type!r} is not supported (use one of {', '.join(mounter.SUPPORTED_FS)})"
        )
    return Capability(
        block=kind == "block",
        fs_type=fs_type,
        mount_flags=tuple(cap.mount.mount_flags) if kind == "mount" else (),
        mode=mode,
        write=mode in _WRITE_MODES,
        multi_node_write=mode in _MULTI_NODE_WRITE,
    )


class NodeService:
    def __init__(
        self,
        node_id: str,
        state: NodeState,
        attacher: Attacher,
        lookup: ExportLookup | None = None,
        leases: Leases | None = None,
    ) -> None:
        self.node_id = node_id
        self.state = state
        self.attacher = attacher
        self.lookup = lookup
        self.locks = VolumeLocks()
        self.volumes = Volumes(state, attacher, leases)
        self.ephemeral_dir = state.dir / "ephemeral"

    # ---- information ----

    def NodeGetInfo(self, req: pb.NodeGetInfoRequest) -> pb.NodeGetInfoResponse:
        # The node's own segment: kubelet labels the Node with it, and host-device placement,
        # capacity and pinned volumes are expressed in it (hostdevices.TOPOLOGY_KEY).
        # A node name too long for a label value gets no segment (kubelet could not register).
        info = pb.NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=self.attacher.max_devices()
        )
        if is_label_value(self.node_id):
            info.accessible_topology.segments[TOPOLOGY_KEY] = self.node_id
        return info

    def NodeGetCapabilities(
        self, req: pb.NodeGetCapabilitiesRequest
    ) -> pb.NodeGetCapabilitiesResponse:
        rpc = pb.NodeServiceCapability.RPC
        kinds = [
            rpc.STAGE_UNSTAGE_VOLUME,
            rpc.GET_VOLUME_STATS,
            rpc.VOLUME_CONDITION,
            rpc.EXPAND_VOLUME,
        ]
        return pb.NodeGetCapabilitiesResponse(
            capabilities=[pb.NodeServiceCapability(rpc=rpc(type=k)) for k in kinds]
        )

    # ---- stage ----

    def NodeStageVolume(self, req: pb.NodeStageVolumeRequest) -> pb.NodeStageVolumeResponse:
        volume_id = _required(req.volume_id, "volume_id")
        staging = _absolute(req.staging_target_path, "staging_target_path")
        cap = parse_capability(req.volume_capability, req.HasField("volume_capability"))
        context = dict(req.volume_context)
        if is_ephemeral(context):
            raise InvalidArgument("ephemeral inline volumes are published, never staged")
        with self.locks.hold(volume_id):
            record = self.state.get(volume_id)
            if record is not None:
                self._check_compatible_stage(record, staging, cap)
                if context.get(ATTR_URI, record.uri) != record.uri:
                    raise AlreadyExists(f"volume {volume_id} is staged from {record.uri}")
                try:
                    self.volumes.ensure_staged(record)
                except Exception as exc:
                    raise to_csi(exc, f"restaging {volume_id}") from exc
                return pb.NodeStageVolumeResponse()
            source = resolve(volume_id, context, self.lookup)
            check_access(source, wants_write=cap.write, multi_node_write=cap.multi_node_write)
            try:
                self.volumes.setup(volume_id, source, cap, staging, ephemeral=False)
            except Exception as exc:
                raise to_csi(exc, f"staging {volume_id}") from exc
        return pb.NodeStageVolumeResponse()

    @staticmethod
    def _check_compatible_stage(record: VolumeRecord, staging: str, cap: Capability) -> None:
        if record.ephemeral:
            raise AlreadyExists(f"volume {record.volume_id} is in use as an ephemeral volume")
        differences = []
        if record.staging_path != staging:
            differences.append(f"staged at {record.staging_path}")
        if record.block != cap.block:
            differences.append("block" if record.block else "filesystem")
        if record.access_mode != cap.mode:
            differences.append(f"access mode {Mode.Name(record.access_mode)}")
        if cap.fs_type and record.fs_type and cap.fs_type != record.fs_type:
            differences.append(f"fs_type {record.fs_type}")
        if differences:
            raise AlreadyExists(
                f"volume {record.volume_id} is already staged differently: {', '.join(differences)}"
            )

    def NodeUnstageVolume(self, req: pb.NodeUnstageVolumeRequest) -> pb.NodeUnstageVolumeResponse:
        volume_id = _required(req.volume_id, "volume_id")
        staging = _absolute(req.staging_target_path, "staging_target_path")
        with self.locks.hold(volume_id):
            record = self.state.get(volume_id)
            if record is None or record.ephemeral or record.staging_path != staging:
                return pb.NodeUnstageVolumeResponse()  # not staged there: done, per the spec
            still = [t for t in record.targets if mounter.is_mounted(t)]
            if still:
                raise FailedPrecondition(
                    f"volume {volume_id} is still published at {', '.join(sorted(still))}"
                )
            try:
                self.volumes.teardown(record)
            except Exception as exc:
                raise to_csi(exc, f"unstaging {volume_id}") from exc
        return pb.NodeUnstageVolumeResponse()

    # ---- publish ----

    def NodePublishVolume(self, req: pb.NodePublishVolumeRequest) -> pb.NodePublishVolumeResponse:
        volume_id = _required(req.volume_id, "volume_id")
        target = _absolute(req.target_path, "target_path")
        cap = parse_capability(req.volume_capability, req.HasField("volume_capability"))
        context = dict(req.volume_context)
        ephemeral = is_ephemeral(context)
        if ephemeral and cap.block:
            raise InvalidArgument("ephemeral inline volumes are filesystem volumes")
        if not ephemeral and not req.staging_target_path:
            raise FailedPrecondition("staging_target_path is not set (STAGE_UNSTAGE_VOLUME)")
        with self.locks.hold(volume_id):
            other = self.state.find_target(target)
            if other is not None and other.volume_id != volume_id:
                raise AlreadyExists(f"{target} is already used by volume {other.volume_id}")
            record = self.state.get(volume_id)
            if ephemeral and record is None:
                source = resolve(volume_id, context, self.lookup)
                check_access(source, wants_write=cap.write, multi_node_write=cap.multi_node_write)
                digest = hashlib.sha256(volume_id.encode()).hexdigest()[:32]
                staging = str(self.ephemeral_dir / digest)
                try:
                    record = self.volumes.setup(volume_id, source, cap, staging, ephemeral=True)
                except Exception as exc:
                    raise to_csi(exc, f"publishing ephemeral {volume_id}") from exc
            elif record is None:
                raise FailedPrecondition(
                    f"volume {volume_id} is not staged (call NodeStageVolume first)"
                )
            elif record.ephemeral != ephemeral:
                raise AlreadyExists(
                    f"volume {volume_id} is in use {'as' if record.ephemeral else 'not as'}"
                    " an ephemeral volume"
                )
            elif not ephemeral and record.staging_path != _absolute(
                req.staging_target_path, "staging_target_path"
            ):
                raise FailedPrecondition(
                    f"volume {volume_id} is staged at {record.staging_path},"
                    f" not at {req.staging_target_path}"
                )
            if record.block != cap.block:
                raise AlreadyExists(
                    f"volume {volume_id} was staged as {'block' if record.block else 'filesystem'}"
                )
            read_only = req.readonly or record.read_only
            self._publish(record, target, read_only)
        return pb.NodePublishVolumeResponse()

    def _publish(self, record: VolumeRecord, target: str, read_only: bool) -> None:
        existing = record.targets.get(target)
        if existing is not None and existing.read_only != read_only:
            raise AlreadyExists(
                f"volume {record.volume_id} is already published at {target} with"
                f" readonly={existing.read_only}"
            )
        try:
            self.volumes.ensure_staged(record)
            if existing is not None and mounter.is_mounted(target):
                return
            source = record.device if record.block else record.staging_path
            mounter.bind(source, target, read_only)
            record.targets[target] = Target(read_only=read_only)
            self._sync_block_read_only(record)
        except Exception as exc:
            record.targets.pop(target, None)
            raise to_csi(exc, f"publishing {record.volume_id} at {target}") from exc
        self.state.save()

    @staticmethod
    def _sync_block_read_only(record: VolumeRecord) -> None:
        """A block volume's device is read-only while every target is (or the attach is)."""
        if record.block and record.device and not record.read_only:
            all_read_only = bool(record.targets) and all(
                t.read_only for t in record.targets.values()
            )
            mounter.set_block_read_only(record.device, all_read_only)

    def NodeUnpublishVolume(
        self, req: pb.NodeUnpublishVolumeRequest
    ) -> pb.NodeUnpublishVolumeResponse:
        volume_id = _required(req.volume_id, "volume_id")
        target = _absolute(req.target_path, "target_path")
        with self.locks.hold(volume_id):
            owner = self.state.find_target(target)
            if owner is not None and owner.volume_id != volume_id:
                raise NotFound(f"{target} belongs to volume {owner.volume_id}, not {volume_id}")
            record = self.state.get(volume_id)
            try:
                mounter.unmount(target)
                mounter.remove_path(target)
                if record is not None:
                    record.targets.pop(target, None)
                    self._sync_block_read_only(record)
                    if record.ephemeral and not record.targets:
                        self.volumes.teardown(record)
                    else:
                        self.state.save()
            except Exception as exc:
                raise to_csi(exc, f"unpublishing {volume_id} from {target}") from exc
        return pb.NodeUnpublishVolumeResponse()

    # ---- stats ----

    def _condition(self, record: VolumeRecord) -> pb.VolumeCondition:
        """Abnormal while the link is down (the agent reconnects) and, for good, after the
        server came back with different data (the device then fails its I/O)."""
        refused = self.attacher.refusal(record.device) if record.device else ""
        if refused:
            return pb.VolumeCondition(
                abnormal=True, message=f"{record.device} was not reattached: {refused}"
            )
        if record.device and self.attacher.is_alive(record.device):
            return pb.VolumeCondition(
                abnormal=False, message=f"{record.device} connected to {record.uri}"
            )
        return pb.VolumeCondition(
            abnormal=True,
            message=f"the NBD link of {record.device or 'the volume'} to {record.uri} is down;"
            " the agent is reconnecting",
        )

    def NodeGetVolumeStats(
        self, req: pb.NodeGetVolumeStatsRequest
    ) -> pb.NodeGetVolumeStatsResponse:
        volume_id = _required(req.volume_id, "volume_id")
        path = _absolute(req.volume_path, "volume_path")
        record = self.state.get(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} is not on this node")
        if path not in record.targets and path != record.staging_path:
            raise NotFound(f"volume {volume_id} is not staged or published at {path}")
        if not Path(path).exists():
            raise NotFound(f"{path} does not exist")
        condition = self._condition(record)
        Unit = pb.VolumeUsage.Unit
        try:
            if record.block:
                size = mounter.device_size(record.device)
                usage = [pb.VolumeUsage(total=size, unit=Unit.BYTES)]
            else:
                u = mounter.usage(path)
                usage = [
                    pb.VolumeUsage(
                        total=u.total_bytes,
                        available=u.available_bytes,
                        used=u.used_bytes,
                        unit=Unit.BYTES,
                    ),
                    pb.VolumeUsage(
                        total=u.total_inodes,
                        available=u.free_inodes,
                        used=u.used_inodes,
                        unit=Unit.INODES,
                    ),
                ]
        except OSError as exc:
            raise to_csi(exc, f"stats of {path}") from exc
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    # ---- expansion ----

    def NodeExpandVolume(self, req: pb.NodeExpandVolumeRequest) -> pb.NodeExpandVolumeResponse:
        """Finish a grown volume on the node: wait (UNAVAILABLE, kubelet retries) until the
        device has the new size, then grow a mounted filesystem online. The device itself grows
        when the agent reattaches the restarted, larger server (RECONFIGURE with its size)."""
        volume_id = _required(req.volume_id, "volume_id")
        path = _absolute(req.volume_path, "volume_path")
        required = req.capacity_range.required_bytes
        if required < 0 or req.capacity_range.limit_bytes < 0:
            raise InvalidArgument("capacity_range bytes must not be negative")
        with self.locks.hold(volume_id):
            record = self.state.get(volume_id)
            if record is None:
                raise NotFound(f"volume {volume_id} is not on this node")
            if path not in record.targets and path != record.staging_path:
                raise NotFound(f"volume {volume_id} is not staged or published at {path}")
            try:
                size = mounter.device_size(record.device)
            except OSError as exc:
                raise to_csi(exc, f"size of {record.device}") from exc
            if size < required:
                raise Unavailable(
                    f"{record.device} has {size} bytes, {required} asked: the device grows when"
                    " the agent reattaches the restarted server; retry"
                )
            if not record.block and not record.read_only:
                try:
                    mounter.grow_filesystem(record.device, record.staging_path, record.fs_type)
                except mounter.MountError as exc:
                    raise Internal(str(exc)) from exc
                log.info("volume %s: %s grown to %d bytes", volume_id, record.fs_type, size)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)
