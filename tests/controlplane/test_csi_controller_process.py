"""The real ``nbd-agent csi-controller`` process against the API substitute (``--kube-api URL``):
it serves the Identity and Controller services on its socket, provisions a volume, offers
snapshots exactly when the API serves snapshot.storage.k8s.io/v1, refuses to start without a
namespace, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc

from tests.controlplane.controller_harness import create_request
from tests.controlplane.operator_harness import NS, api_server

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("", "agent", "api"))
    env.pop("POD_NAMESPACE", None)
    return env


def _argv(sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nbd_agent.cli", "csi-controller",
            "--endpoint", f"unix://{sock}", *extra]  # fmt: skip


async def test_the_controller_process_provisions_and_stops_on_sigterm(tmp_path: Path) -> None:
    sock, log = tmp_path / "controller.sock", tmp_path / "controller.log"
    async with api_server() as (api, _client):
        argv = _argv(sock, "--namespace", NS, "--kube-api", str(api.url).rstrip("/"))
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, env=_env())
        channel = grpc.insecure_channel(f"unix://{sock}")
        try:
            await asyncio.to_thread(grpc.channel_ready_future(channel).result, 30)
            identity, controller = pb_grpc.IdentityStub(channel), pb_grpc.ControllerStub(channel)
            info = await asyncio.to_thread(identity.GetPluginInfo, pb.GetPluginInfoRequest())
            assert info.name == "nbd.dev"
            resp = await asyncio.to_thread(controller.CreateVolume, create_request("pvc-p"))
            assert resp.volume.volume_id == f"{NS}/pvc-p"
            assert [o["metadata"]["name"] for o in api.all("nbdexports", NS)] == ["pvc-p"]
            caps = await asyncio.to_thread(
                controller.ControllerGetCapabilities, pb.ControllerGetCapabilitiesRequest()
            )
            # The substitute serves snapshot.storage.k8s.io/v1 (operator_harness.RESOURCES).
            snapshots = pb.ControllerServiceCapability.RPC.CREATE_DELETE_SNAPSHOT
            assert snapshots in {c.rpc.type for c in caps.capabilities}, log.read_text()
        finally:
            channel.close()
            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.to_thread(proc.wait, 20)
    assert rc == 0, log.read_text()
    assert "CSI controller stopped" in log.read_text()


def test_without_a_namespace_it_exits_2_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        _argv(tmp_path / "c.sock", "--kube-api", "http://127.0.0.1:9"),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert done.returncode == 2
    assert "--namespace" in done.stderr and "Traceback" not in done.stderr
