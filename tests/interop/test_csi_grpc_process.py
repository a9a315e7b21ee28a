"""The real ``csi`` subcommand as a process on this machine, whose kernel has no nbd driver: it
serves on its unix socket, Probe says "not ready" with the real kernel attacher, a stage fails
with UNAVAILABLE and leaves nothing behind, and SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc

from tests.interop.csi_harness import mount_cap

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    Path("/sys/module/nbd").exists(), reason="this machine's kernel has an nbd driver"
)


@dataclass
class Plugin:
    proc: subprocess.Popen[bytes]
    channel: grpc.Channel
    log: Path
    state: Path


def plugin_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in ("", "agent", "api"))
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    log = tmp_path / "agent.log"
    sock = tmp_path / "csi.sock"
    argv = [sys.executable, "-m", "nbd_agent.cli", "csi", "--endpoint", f"unix://{sock}"]
    argv += ["--node-id", "host-node", "--state-dir", str(tmp_path / "state")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, env=plugin_env())
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield Plugin(proc, channel, log, tmp_path / "state")
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_probe_is_not_ready_without_the_nbd_family(plugin: Plugin) -> None:
    identity = pb_grpc.IdentityStub(plugin.channel)
    assert identity.GetPluginInfo(pb.GetPluginInfoRequest()).name == "nbd.dev"
    assert identity.Probe(pb.ProbeRequest()).ready.value is False
    node = pb_grpc.NodeStub(plugin.channel)
    assert node.NodeGetInfo(pb.NodeGetInfoRequest()).max_volumes_per_node == 0


def test_stage_without_the_nbd_driver_is_unavailable_and_leaves_nothing(
    plugin: Plugin, tmp_path: Path
) -> None:
    node = pb_grpc.NodeStub(plugin.channel)
    request = pb.NodeStageVolumeRequest(
        volume_id="v",
        staging_target_path=str(tmp_path / "staging"),
        volume_capability=mount_cap(),
        volume_context={"uri": "nbd://127.0.0.1:9/export"},
        secrets={"token": "s3cret-value"},
    )
    with pytest.raises(grpc.RpcError) as info:
        node.NodeStageVolume(request)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nbd" in (info.value.details() or "")
    plugin.proc.send_signal(signal.SIGTERM)
    assert plugin.proc.wait(20) == 0
    state = plugin.state / "csi-state.json"
    assert not state.exists() or json.loads(state.read_text())["volumes"] == {}
    log = plugin.log.read_text()
    assert "call /csi.v1.Node/NodeStageVolume" in log
    assert "done /csi.v1.Node/NodeStageVolume: UNAVAILABLE" in log
    assert "s3cret-value" not in log


def test_node_id_is_required(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "nbd_agent.csi.cli", "--endpoint", f"unix://{tmp_path}/s"]
    env = plugin_env()
    env.pop("NODE_NAME", None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--node-id" in done.stderr
