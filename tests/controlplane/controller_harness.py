"""The CSI Controller service over real gRPC on a unix socket, against the API substitute.

Why it exists: the controller tests (and the snapshot and operator-integration tests) need the
same thing: ``nbd-agent csi-controller``'s servicers bound to a socket under pytest's tmp, a
channel and stubs, and the fake API server of ``operator_harness``. The controller's HTTP client
is blocking and the fake API serves on the test's event loop, so every RPC is made through
``asyncio.to_thread`` (``Controller.call``).

What it must not do: reach around the gRPC server into the service (tests see status codes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc
from nbd_agent.csi.controller import ControllerService, Quiesce
from nbd_agent.csi.identity import IdentityService
from nbd_agent.csi.kube import ExportStore, KubeApi, LeaseStore, SnapshotStore
from nbd_agent.csi.server import build_server
from nbd_operator.kube import Kube

from tests.controlplane.operator_harness import NS, FakeApiServer, api_server

Mode = pb.VolumeCapability.AccessMode


class Controller:
    """Stubs for one running controller; ``call`` runs an RPC off the event loop."""

    def __init__(self, channel: grpc.Channel, api: FakeApiServer, client: Kube) -> None:
        self.api = api
        self.client = client
        self.identity = pb_grpc.IdentityStub(channel)
        self.stub = pb_grpc.ControllerStub(channel)

    async def call(self, method: str, request: Any) -> Any:
        rpc: Callable[..., Any] = getattr(self.stub, method)
        return await asyncio.to_thread(rpc, request, timeout=10)

    async def code(self, method: str, request: Any) -> grpc.StatusCode:
        """The status code of a call that must fail."""
        try:
            await self.call(method, request)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        raise AssertionError(f"{method} succeeded but was expected to fail")

    def exports(self) -> list[dict[str, Any]]:
        return self.api.all("nbdexports", NS)

    def snapshots(self) -> list[dict[str, Any]]:
        return self.api.all("volumesnapshots", NS)


def no_server(export: Any) -> None:
    """The quiesce of exports that have no server here (the API substitute runs no pods)."""


@contextlib.asynccontextmanager
async def controller(
    tmp: Path, quiesce: Quiesce = no_server, host_devices: bool = False
) -> AsyncIterator[Controller]:
    """The fake API server and a controller serving on ``tmp/controller.sock`` (with
    ``host_devices``: as ``nbd-agent csi-controller --host-devices``)."""
    async with api_server() as (api, client):
        kube = KubeApi(str(api.url))
        leases = LeaseStore(kube) if host_devices else None
        service = ControllerService(
            ExportStore(kube), NS, SnapshotStore(kube), quiesce=quiesce, leases=leases
        )
        socket = tmp / "controller.sock"
        identity = IdentityService(None, controller=True, topology=host_devices)
        server = build_server(f"unix://{socket}", identity, controller=service)
        server.start()
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            await asyncio.to_thread(grpc.channel_ready_future(channel).result, 10)
            yield Controller(channel, api, client)
        finally:
            channel.close()
            server.stop(grace=None).wait()


def mount(mode: int = Mode.SINGLE_NODE_WRITER, fs_type: str = "ext4") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def block(mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=mode),
    )


def create_request(
    name: str = "pvc-1",
    required: int = 0,
    limit: int = 0,
    caps: list[pb.VolumeCapability] | None = None,
    **parameters: str,
) -> pb.CreateVolumeRequest:
    return pb.CreateVolumeRequest(
        name=name,
        capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=caps if caps is not None else [mount()],
        parameters=parameters,
    )
