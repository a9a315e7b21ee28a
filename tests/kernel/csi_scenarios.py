"""CSI node plugin scenarios that run inside one UML guest (host-side test: test_csi_uml.py).

Why it exists: the plugin's promises that only a real kernel can check: format-once and mount of
a real /dev/nbdX, data surviving unstage/restage, block publish of the device itself, read-only
attach, refusal to format a dirty device, an agent restart between stage and publish, and a
server restart under a published volume without an I/O error. The plugin runs as its real
subcommand process (``python -m nbd_agent.csi.cli``) and is driven over its unix socket by a
gRPC client, as kubelet would; nbdserver serves the exports on the guest's loopback. There is no
Kubernetes API in the guest, so volumes use the direct ``uri`` attribute.

Each step records what it saw in ``$WORK/results.json`` before anything can fail, so the host
test reports every broken step, not just the first.

What it must not do: import pytest, run on the host, or sleep as synchronisation.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from nbd_agent.csi._generated import csi_pb2 as pb
from nbd_agent.csi._generated import csi_pb2_grpc as pb_grpc

from tests.kernel import guest
from tests.kernel.guest import Results, wait_until

MiB = 1 << 20
Mode = pb.VolumeCapability.AccessMode
SOCKET = guest.SCRATCH / "csi" / "csi.sock"
STATE = guest.SCRATCH / "csi-state"


class Plugin:
    """The plugin process and a gRPC client to it."""

    def __init__(self, number: int) -> None:
        self.log_path = guest.WORK / f"csi-agent-{number}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115
        argv = [guest.PY, "-m", "nbd_agent.cli", "csi", "--endpoint", f"unix://{SOCKET}"]
        argv += ["--node-id", "uml-node", "--state-dir", str(STATE), "--kube-api", "none"]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.channel = grpc.insecure_channel(f"unix://{SOCKET}")
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.node = pb_grpc.NodeStub(self.channel)
        self.identity = pb_grpc.IdentityStub(self.channel)

    def kill(self) -> None:
        self.channel.close()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        self.channel.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(20)


def cap(block: bool = False, mode: int = Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    access = pb.VolumeCapability.AccessMode(mode=mode)
    if block:
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=access)
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(), access_mode=access)


class Volume:
    """One CSI volume driven through stage/publish/unpublish/unstage."""

    def __init__(self, plugin: Plugin, vid: str, uri: str, capability: pb.VolumeCapability):
        self.plugin, self.vid, self.uri, self.cap = plugin, vid, uri, capability
        self.staging = str(guest.SCRATCH / "kubelet" / "staging" / vid)
        self.target = str(guest.SCRATCH / "kubelet" / "pods" / vid / "target")
        Path(self.staging).mkdir(parents=True, exist_ok=True)  # kubelet creates it

    def stage(self) -> None:
        self.plugin.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=self.vid,
                staging_target_path=self.staging,
                volume_capability=self.cap,
                volume_context={"uri": self.uri},
            )
        )

    def publish(self, readonly: bool = False) -> None:
        self.plugin.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=self.vid,
                staging_target_path=self.staging,
                target_path=self.target,
                volume_capability=self.cap,
                readonly=readonly,
            )
        )

    def unpublish(self) -> None:
        self.plugin.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=self.vid, target_path=self.target)
        )

    def unstage(self) -> None:
        self.plugin.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=self.vid, staging_target_path=self.staging)
        )

    def condition(self) -> tuple[bool, str]:
        stats = self.plugin.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id=self.vid, volume_path=self.target)
        )
        return stats.volume_condition.abnormal, stats.volume_condition.message


def step(res: Results, name: str, fn: Callable[[], Any]) -> Any:
    """Run one step; record its outcome (value, or the error and its gRPC code) under ``name``."""
    started = time.monotonic()
    try:
        value = fn()
        res[name] = {"ok": True, "value": value, "s": round(time.monotonic() - started, 3)}
        return value
    except grpc.RpcError as exc:
        res[name] = {"ok": False, "code": exc.code().name, "details": exc.details()}
    except Exception as exc:
        res[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()[-1500:]}  # fmt: skip
    return None


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_synced(path: str | Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def lifecycle() -> None:
    """One boot: every kernel-side promise of the plugin, in order."""
    res = Results()
    image = guest.make_image("fs.img", 64 * MiB)
    port = guest.free_port()
    srv = guest.server("nbdserver", image, name="disk", port=port).start()
    uri = f"nbd://127.0.0.1:{port}/disk"
    plugin = Plugin(1)
    res["probe_ready"] = plugin.identity.Probe(pb.ProbeRequest()).ready.value
    vol = Volume(plugin, "fs-vol", uri, cap())
    payload = os.urandom(2 * MiB)
    res["payload_sha"] = hashlib.sha256(payload).hexdigest()

    # Stage (format once, mount), publish, write through the mount, tear everything down.
    step(res, "stage1", vol.stage)
    step(res, "stage1_again", vol.stage)
    res["devices_after_stage"] = guest.configured_devices()
    step(res, "publish1", vol.publish)
    step(res, "write", lambda: write_synced(Path(vol.target, "data.bin"), payload))
    step(res, "condition_healthy", vol.condition)
    step(res, "unpublish1", vol.unpublish)
    step(res, "unstage1", vol.unstage)
    res["devices_after_unstage"] = guest.configured_devices()
    res["target_exists_after_unpublish"] = os.path.exists(vol.target)

    # Restage: the filesystem is found, not recreated, and the data is there.
    step(res, "stage2", vol.stage)
    # The agent restarts between stage and publish; the new one adopts the device.
    plugin.kill()
    plugin = Plugin(2)
    vol.plugin = plugin
    step(res, "publish2_after_restart", vol.publish)
    step(res, "sha_after_restage", lambda: sha(Path(vol.target, "data.bin")))

    # The server dies while the volume is published. With the link down (the volume condition
    # says so) a writer starts and syncs: the kernel holds its I/O until the agent reconnects to
    # the restarted server, and the writer finishes without an error, its data intact.
    source = guest.SCRATCH / "during.src"
    source.write_bytes(os.urandom(8 * MiB))
    res["during_sha"] = sha(source)
    srv.kill()
    step(
        res,
        "condition_while_down",
        lambda: wait_until(
            lambda: vol.condition()[0] and vol.condition(), 20, "abnormal volume condition"
        ),
    )
    writer = subprocess.Popen(
        ["dd", f"if={source}", f"of={vol.target}/during.bin", "bs=64k", "oflag=direct",
         "conv=fsync"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    res["writer_running_while_down"] = writer.poll() is None
    srv = guest.server("nbdserver", image, name="disk", port=port).start()
    step(
        res,
        "condition_after_return",
        lambda: wait_until(
            lambda: (not vol.condition()[0]) and vol.condition(), 30, "normal volume condition"
        ),
    )
    res["writer_rc"] = writer.wait(120)
    res["writer_err"] = (writer.stderr.read() if writer.stderr else b"").decode()[-500:]
    step(res, "during_sha_after", lambda: sha(Path(vol.target, "during.bin")))
    step(res, "read_after_server_restart", lambda: sha(Path(vol.target, "data.bin")))
    step(res, "unpublish2", vol.unpublish)
    step(res, "unstage2", vol.unstage)

    # Read-only access: attached read-only, mounted read-only, data readable, writes refused.
    ro = Volume(plugin, "ro-vol", uri, cap(mode=Mode.MULTI_NODE_READER_ONLY))
    step(res, "ro_stage", ro.stage)
    step(res, "ro_publish", ro.publish)
    res["ro_device_flags"] = [
        Path(f"/sys/block/nbd{i}/ro").read_text().strip() for i in guest.configured_devices()
    ]
    step(res, "ro_read", lambda: sha(Path(ro.target, "data.bin")))
    step(res, "ro_write", lambda: write_synced(Path(ro.target, "new.bin"), b"x"))
    step(res, "ro_unpublish", ro.unpublish)
    step(res, "ro_unstage", ro.unstage)

    block_and_dirty(res, plugin)
    tls_volume(res, plugin)

    res["agent_stop_rc"] = plugin.stop()
    res["devices_at_end"] = guest.configured_devices()
    srv.stop()


def block_and_dirty(res: Results, plugin: Plugin) -> None:
    """Block publish of the raw device; a dirty device is refused, untouched, not left attached."""
    raw = guest.make_image("raw.img", 16 * MiB)
    raw_srv = guest.server("nbdserver", raw, name="raw").start()
    blk = Volume(plugin, "blk-vol", f"nbd://127.0.0.1:{raw_srv.port}/raw", cap(block=True))
    pattern = b"written through the published block device\n" * 93
    step(res, "blk_stage", blk.stage)
    step(res, "blk_publish", blk.publish)

    def write_block() -> bool:
        with open(blk.target, "r+b") as dev:
            dev.seek(MiB)
            dev.write(pattern)
            dev.flush()
            os.fsync(dev.fileno())
        return Path(blk.target).stat().st_mode & 0o170000 == 0o060000  # a block device node

    step(res, "blk_write", write_block)
    step(res, "blk_unpublish", blk.unpublish)

    def write_read_only() -> None:
        with open(blk.target, "r+b") as dev:
            dev.write(b"must not land")
            dev.flush()
            os.fsync(dev.fileno())

    step(res, "blk_publish_ro", lambda: blk.publish(readonly=True))
    step(res, "blk_write_ro", write_read_only)
    step(res, "blk_unpublish_ro", blk.unpublish)
    step(res, "blk_publish_rw_again", blk.publish)
    step(res, "blk_write_rw_again", write_block)
    step(res, "blk_unpublish_rw_again", blk.unpublish)
    step(res, "blk_unstage", blk.unstage)
    raw_srv.stop()
    with open(raw, "rb") as img:
        img.seek(MiB)
        res["blk_pattern_in_image"] = img.read(len(pattern)) == pattern
        img.seek(0)
        res["blk_ro_write_absent"] = b"must not land" not in img.read(MiB)
    res["blk_blkid"] = guest.run(["blkid", "-p", str(raw)]).stdout  # still no filesystem

    dirty = guest.make_image("dirty.img", 16 * MiB)
    with open(dirty, "r+b") as img:
        img.seek(4096)
        img.write(os.urandom(64 * 1024))
    before = sha(dirty)
    dirty_srv = guest.server("nbdserver", dirty, name="dirty").start()
    dvol = Volume(plugin, "dirty-vol", f"nbd://127.0.0.1:{dirty_srv.port}/dirty", cap())
    step(res, "dirty_stage", dvol.stage)
    res["devices_after_dirty"] = guest.configured_devices()
    dirty_srv.stop()
    res["dirty_unchanged"] = sha(dirty) == before


def tls_volume(res: Results, plugin: Plugin) -> None:
    """An nbds:// export (TLS required by the server) staged and published as a filesystem:
    the plugin's attach runs it through the userspace TLS bridge inside the plugin process."""
    certs = guest.tls_certificates()
    image = guest.make_image("tls.img", 32 * MiB)
    srv = guest.server("nbdserver", image, name="secure")
    srv.argv += ["--tls", "require", "--tls-cert", str(certs / "server.pem")]
    srv.argv += ["--tls-key", str(certs / "server.key")]
    srv.start()
    uri = f"nbds://127.0.0.1:{srv.port}/secure?tls-certificates={certs}"
    vol = Volume(plugin, "tls-vol", uri, cap())
    data = os.urandom(MiB)
    step(res, "tls_stage", vol.stage)
    step(res, "tls_publish", vol.publish)
    step(res, "tls_write", lambda: write_synced(Path(vol.target, "f.bin"), data))
    step(res, "tls_unpublish", vol.unpublish)
    step(res, "tls_unstage", vol.unstage)
    step(res, "tls_restage", vol.stage)
    step(res, "tls_republish", vol.publish)
    res["tls_data_back"] = step(res, "tls_read", lambda: sha(Path(vol.target, "f.bin"))) == (
        hashlib.sha256(data).hexdigest()
    )
    step(res, "tls_unpublish2", vol.unpublish)
    step(res, "tls_unstage2", vol.unstage)
    srv.stop()
