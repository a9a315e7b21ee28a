"""What the node plugin has done on this node, persisted to one JSON file in the state directory.

Why it exists: kubelet may restart the agent at any moment (upgrade, crash, OOM). The kernel keeps
the NBD devices and the mounts keep existing, but only this file says which volume owns which
device, staging path, publish targets and writer lease. A restarted agent reads it to reconcile
(``reconcile.py``) and to answer idempotent retries correctly.

Every change is written atomically (temporary file, fsync, rename, fsync of the directory), so a
crash leaves either the old or the new file, never a torn one. The node logic records an attach
*before* it formats or mounts, so a crash mid-way leaves a record to clean up, not a leaked device.

What it must not do: touch devices or mounts, or hold secrets (the file lives on a hostPath).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "csi-state.json"
FORMAT_VERSION = 1


@dataclass
class Target:
    """One NodePublishVolume target path."""

    read_only: bool = False


@dataclass
class VolumeRecord:
    """One volume on this node: from attach to detach.

    ``lease`` is ``"namespace/name"`` of the writer Lease this node holds for the volume (empty
    when it holds none), ``attachment`` that of its attachment Lease (NBDExport volumes only).
    ``staging_path`` is the CO's staging path, or the plugin's own folder for ephemeral inline
    volumes (which kubelet never stages).
    """

    volume_id: str
    uri: str
    device: str = ""
    connections: int = 1
    read_only: bool = False
    block: bool = False
    access_mode: int = 0  # the CSI VolumeCapability.AccessMode.Mode it was staged with
    fs_type: str = ""
    mount_flags: list[str] = field(default_factory=list)
    staging_path: str = ""
    ephemeral: bool = False
    export: str = ""
    lease: str = ""
    attachment: str = ""
    identity: str = ""  # the export identity seen at first attach; a restage must find it again
    targets: dict[str, Target] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        targets = {path: Target(**t) for path, t in data.pop("targets", {}).items()}
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known}, targets=targets)


class NodeState:
    """The in-memory view of the state file; every mutation is followed by ``save()``.

    Callers serialise changes per volume (``locks.VolumeLocks``); the internal lock only keeps
    the file write and the dict consistent when two volumes save at once.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self._lock = threading.Lock()
        self.volumes: dict[str, VolumeRecord] = {}

    def load(self) -> NodeState:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return self
        data = json.loads(self.path.read_text())
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{self.path}: unknown state format {data.get('version')!r}")
        self.volumes = {
            vid: VolumeRecord.from_json(dict(rec)) for vid, rec in data["volumes"].items()
        }
        return self

    def get(self, volume_id: str) -> VolumeRecord | None:
        return self.volumes.get(volume_id)

    def put(self, record: VolumeRecord) -> None:
        with self._lock:
            self.volumes[record.volume_id] = record
            self._write()

    def remove(self, volume_id: str) -> None:
        with self._lock:
            if self.volumes.pop(volume_id, None) is not None:
                self._write()

    def save(self) -> None:
        with self._lock:
            self._write()

    def find_target(self, target_path: str) -> VolumeRecord | None:
        for record in self.volumes.values():
            if target_path in record.targets:
                return record
        return None

    def _write(self) -> None:
        payload = {
            "version": FORMAT_VERSION,
            "volumes": {vid: asdict(rec) for vid, rec in sorted(self.volumes.items())},
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".csi-state.", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(payload, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
