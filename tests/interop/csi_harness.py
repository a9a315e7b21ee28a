"""Test harness for the CSI node plugin's gRPC tests: a real server on a real unix socket.

Why it exists: the gRPC tests exercise every RPC, argument error and idempotency path of the
real ``NodeService`` behind the real gRPC server, with real mounts (bind mounts, loop-mounted
ext4) in a temporary folder. Only the NBD attach is replaced, because this machine's kernel has
no nbd driver: ``FileAttacher`` "attaches" ``nbd://files/<name>`` by handing out the path of the
image file ``<devices>/<name>.img``. That is honest for what these tests check (validation,
locking, state, format-once, mounts); the kernel attach itself is tested in tests/kernel.

What it must not do: leave mounts or loop devices behind (``CsiHarness.close`` unmounts
everything under its folder, deepest first), or fake any CSI behaviour.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from nbd_agent.csi import mounter
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc
from nbd_agent.csi.errors import FailedPrecondition, NotFound
from nbd_agent.csi.identity import IdentityService
from nbd_agent.csi.node import NodeService
from nbd_agent.csi.reconcile import Report, reconcile
from nbd_agent.csi.server import build_server
from nbd_agent.csi.sources import ExportLookup
from nbd_agent.csi.state import NodeState
from nbd_agent.csi.volumes import Leases

FILE_URI = "nbd://files/"


@dataclass
class FileAttacher:
    """An ``Attacher`` over image files: the device of ``nbd://files/NAME`` is ``NAME.img``."""

    devices: Path
    ready_reason: str = ""
    attached: dict[str, str] = field(default_factory=dict)  # device -> uri
    read_only: dict[str, bool] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    adopted: list[str] = field(default_factory=list)
    identities: dict[str, str] = field(default_factory=dict)  # uri -> what its server tells
    refused: dict[str, str] = field(default_factory=dict)  # device -> why
    attach_calls: list[str] = field(default_factory=list)
    # uri -> event the attach waits for (to hold a call in flight for lock tests)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    entered: dict[str, threading.Event] = field(default_factory=dict)

    def ready(self) -> tuple[bool, str]:
        return (not self.ready_reason, self.ready_reason)

    def max_devices(self) -> int:
        return 16

    def attach(self, uri: str, read_only: bool, connections: int, identity: str = "") -> str:
        self.attach_calls.append(uri)
        if identity and self.identities.get(uri, "") != identity:
            raise FailedPrecondition(f"{uri}: the export's identity changed from {identity}")
        if uri in self.entered:
            self.entered[uri].set()
        if uri in self.gates:
            assert self.gates[uri].wait(30), "test gate never opened"
        if not uri.startswith(FILE_URI):
            raise NotFound(f"no such export {uri}")
        device = str(self.devices / f"{uri[len(FILE_URI) :]}.img")
        if not os.path.exists(device):
            raise NotFound(f"no such export {uri}")
        self.attached[device] = uri
        self.read_only[device] = read_only
        return device

    def detach(self, device: str) -> None:
        self.attached.pop(device, None)

    def attached_devices(self, uri: str) -> dict[str, bool]:
        return {d: self.read_only[d] for d, u in self.attached.items() if u == uri}

    def is_attached(self, device: str, uri: str) -> bool:
        return self.attached.get(device) == uri

    def is_alive(self, device: str) -> bool:
        return device in self.attached and device not in self.dead

    def adopt(self, device: str, uri: str) -> None:
        self.adopted.append(device)

    def identity(self, device: str) -> str:
        return self.identities.get(self.attached.get(device, ""), "")

    def refusal(self, device: str) -> str:
        return self.refused.get(device, "")


def _unmount_under(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    for point in sorted(mounter.mount_points(), key=len, reverse=True):
        if point.startswith(prefix):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class CsiHarness:
    """One plugin instance (state dir, socket, stubs) in ``root``; ``restart()`` makes a new one
    over the same state, as a restarted agent would."""

    def __init__(
        self,
        root: Path,
        lookup: ExportLookup | None = None,
        leases: Leases | None = None,
        node_id: str = "node-a",
    ) -> None:
        self.root = root
        self.devices = root / "devices"
        self.devices.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.socket = root / "csi.sock"
        self.attacher = FileAttacher(self.devices)
        self.lookup = lookup
        self.leases = leases
        self.node_id = node_id
        self.server: grpc.Server | None = None
        self.channel: grpc.Channel | None = None
        self.last_reconcile: Report | None = None
        self.start()

    def start(self) -> None:
        state = NodeState(self.state_dir).load()
        self.node = NodeService(
            self.node_id, state, self.attacher, lookup=self.lookup, leases=self.leases
        )
        self.last_reconcile = reconcile(self.node.volumes)
        self.server = build_server(
            f"unix://{self.socket}", IdentityService(self.attacher), self.node
        )
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.identity_stub = pb_grpc.IdentityStub(self.channel)
        self.node_stub = pb_grpc.NodeStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        _unmount_under(self.root)

    def image(self, name: str, size: int = 64 * 1024 * 1024) -> str:
        """Create a blank (all-zero, sparse) export image; returns its ``nbd://files/`` URI."""
        path = self.devices / f"{name}.img"
        with open(path, "wb") as img:
            img.truncate(size)
        return FILE_URI + name

    def path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))


def mount_cap(mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER, fs_type: str = ""):
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def block_cap(mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER):
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )
