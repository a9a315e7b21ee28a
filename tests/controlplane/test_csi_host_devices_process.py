"""Host devices end to end on this machine, with the real processes and a real block device:
``nbd-agent csi --host-device <loop device>`` publishes it (size from sysfs) to the API
substitute, ``nbd-agent csi-controller --host-devices`` provisions a volume on it, reports the
capacity it takes and gives back, the device keeps its data unless the class said
``wipeOnDelete`` (then the node plugin zeroes it before it is free), and both stop on
SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest
from nbd_agent.csi import hostdevices
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc

from tests.controlplane.controller_harness import block, create_request
from tests.controlplane.operator_harness import NS, api_server
from tests.controlplane.test_csi_controller_process import _env
from tests.loopdev import loop_device

MIB = 2**20
NODE = "host-node"


@contextmanager
def process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process stopped with SIGTERM at the end; it must exit 0."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=_env())
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        assert rc == 0, log.read_text()


@pytest.mark.parametrize("wipe", [False, True], ids=["kept", "wiped"])
async def test_a_published_loop_device_becomes_a_volume_and_is_given_back(
    tmp_path: Path, wipe: bool
) -> None:
    with ExitStack() as stack:
        device = stack.enter_context(loop_device(tmp_path / "disk.img", 64 * MIB))
        async with api_server() as (api, _client):
            url = str(api.url).rstrip("/")
            node = [sys.executable, "-m", "nbd_agent.cli", "csi",
                    "--endpoint", f"unix://{tmp_path / 'node.sock'}", "--node-id", NODE,
                    "--state-dir", str(tmp_path / "state"), "--kube-api", url,
                    "--host-device", device, "--host-device-namespace", NS,
                    "--host-device-interval", "1"]  # fmt: skip
            controller = [sys.executable, "-m", "nbd_agent.cli", "csi-controller",
                          "--endpoint", f"unix://{tmp_path / 'controller.sock'}",
                          "--namespace", NS, "--kube-api", url, "--host-devices"]  # fmt: skip
            # Entered last, stopped first: the processes end before the API substitute.
            inner = ExitStack()
            inner.enter_context(process(node, tmp_path / "node.log"))
            inner.enter_context(process(controller, tmp_path / "controller.log"))
            channel = grpc.insecure_channel(f"unix://{tmp_path / 'controller.sock'}")
            try:
                await asyncio.to_thread(grpc.channel_ready_future(channel).result, 30)
                stub = pb_grpc.ControllerStub(channel)

                def inventory() -> list[hostdevices.Device]:
                    return hostdevices.published(api.all("leases", NS))

                await api.wait_for(inventory, timeout=30)
                assert inventory() == [hostdevices.Device(NODE, device, 64 * MIB)]

                def capacity() -> int:
                    req = pb.GetCapacityRequest(
                        parameters={"backing": "hostDevice"}, volume_capabilities=[block()]
                    )
                    return int(stub.GetCapacity(req).available_capacity)

                assert await asyncio.to_thread(capacity) == 64 * MIB
                # Data of an earlier tenant, on the device before the volume is made.
                with open(device, "r+b") as dev:
                    dev.write(b"secret" * 1024)
                    dev.seek(60 * MIB)
                    dev.write(b"secret" * 1024)
                params = {"backing": "hostDevice"} | ({"wipeOnDelete": "true"} if wipe else {})
                req = create_request("pvc-disk", caps=[block()], **params)
                made = await asyncio.to_thread(stub.CreateVolume, req)
                assert made.volume.capacity_bytes == 64 * MIB
                [export] = api.all("nbdexports", NS)
                assert export["spec"]["source"] == {
                    "hostDevice": {"nodeName": NODE, "path": device}
                }
                assert await asyncio.to_thread(capacity) == 0
                delete = pb.DeleteVolumeRequest(volume_id=made.volume.volume_id)
                await asyncio.to_thread(stub.DeleteVolume, delete)
                # Wiped: the node plugin zeroes it on its next renewal, then frees it.
                await api.wait_for(lambda: not hostdevices.claimed(api.all("leases", NS)), 30)
                assert await asyncio.to_thread(capacity) == 64 * MIB
                with open(device, "rb") as dev:
                    data = dev.read()
                assert len(data) == 64 * MIB
                assert (data.count(0) == len(data)) is wipe
            finally:
                channel.close()
                await asyncio.to_thread(inner.close)
