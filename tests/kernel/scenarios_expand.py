"""Online expansion in a real kernel, inside one UML guest (host side: test_csi_expand_uml.py).

The CSI plugin runs as its real process (``csi_scenarios.Plugin``); nbdserver serves a file
export on loopback. For ext4 and xfs, mounted and published: fio writes and verifies a file on
the volume the whole time; the server is restarted larger (what the operator does when a
volume grows); kubelet's NodeExpandVolume is retried until the device has the new size (the
agent's keeper reattaches the larger export with RECONFIGURE), then the filesystem grows
while mounted. A block volume only waits for its device's size.

Each step records what it saw in ``$WORK/results.json`` before anything can fail.

What it must not do: import pytest, run on the host, or sleep as synchronisation.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import grpc
from nbd_agent.csi._generated import csi_pb2 as pb

from tests.kernel import guest
from tests.kernel.csi_scenarios import Plugin, Volume, step, write_synced
from tests.kernel.guest import Results, wait_until

MiB = 1 << 20
# mkfs.xfs refuses filesystems under 300 MiB; images are sparse in the guest's tmpfs.
SIZES = {"ext4": (64 * MiB, 96 * MiB), "xfs": (320 * MiB, 400 * MiB), "block": (32 * MiB, 48 * MiB)}


def _server(image: Path, port: int, size: int) -> guest.Server:
    argv = [guest.PY, "-m", "nbdserver", "serve", str(image), "--name", "d", "--size", str(size)]
    argv += ["--bind", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return guest.Server("nbdserver", argv, port)


def _capability(kind: str) -> pb.VolumeCapability:
    access = pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    if kind == "block":
        return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=access)
    mount = pb.VolumeCapability.MountVolume(fs_type=kind)
    return pb.VolumeCapability(mount=mount, access_mode=access)


def _fio(target: str) -> subprocess.Popen[str]:
    """Random 4 KiB writes, each batch read back and checked, for a fixed time."""
    argv = ["fio", "--name=verify", f"--filename={target}/fio.dat", "--size=16M",
            "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--direct=1",
            "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
            "--time_based", "--runtime=20", "--output-format=terse"]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _expand(vol: Volume, size: int) -> tuple[int, int]:
    """NodeExpandVolume as kubelet does it: retried while the plugin says UNAVAILABLE."""
    request = pb.NodeExpandVolumeRequest(
        volume_id=vol.vid,
        volume_path=vol.target,
        staging_target_path=vol.staging,
        capacity_range=pb.CapacityRange(required_bytes=size),
        volume_capability=vol.cap,
    )
    attempts: list[str] = []

    def once() -> int | None:
        try:
            return int(vol.plugin.node.NodeExpandVolume(request).capacity_bytes)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            attempts.append(exc.details() or "")
            return None

    capacity: int = wait_until(once, 60, "NodeExpandVolume to succeed", step=0.2)
    return capacity, len(attempts)


def _grow(res: Results, plugin: Plugin, kind: str) -> None:
    small, large = SIZES[kind]
    image = guest.SCRATCH / f"{kind}.img"
    port = guest.free_port()
    srv = _server(image, port, small).start()
    vol = Volume(plugin, f"{kind}-vol", f"nbd://127.0.0.1:{port}/d", _capability(kind))
    step(res, f"{kind}_stage", vol.stage)
    step(res, f"{kind}_publish", vol.publish)
    fs = kind != "block"
    payload = os.urandom(2 * MiB)
    res[f"{kind}_payload_sha"] = hashlib.sha256(payload).hexdigest()
    if fs:
        step(res, f"{kind}_write", lambda: write_synced(Path(vol.target) / "payload", payload))
        before = os.statvfs(vol.target)
        res[f"{kind}_fs_bytes_before"] = before.f_blocks * before.f_frsize
        fio = _fio(vol.target)
    started = time.monotonic()
    srv.kill()
    srv = _server(image, port, large).start()
    capacity, retries = step(res, f"{kind}_expand", lambda: _expand(vol, large)) or (0, 0)
    res[f"{kind}_expand_seconds"] = round(time.monotonic() - started, 2)
    res[f"{kind}_capacity"] = capacity
    res[f"{kind}_unavailable_retries"] = retries
    if fs:
        res[f"{kind}_fio_running_during_expand"] = fio.poll() is None
        after = os.statvfs(vol.target)
        res[f"{kind}_fs_bytes_after"] = after.f_blocks * after.f_frsize
        # Space the old filesystem did not have: a file larger than all of it must now fit.
        big = str(Path(vol.target) / "big")
        need = res[f"{kind}_fs_bytes_before"] + 4 * MiB
        res[f"{kind}_fallocate_rc"] = guest.run(["fallocate", "-l", str(need), big]).returncode
        out, err = fio.communicate(timeout=120)
        res[f"{kind}_fio_rc"] = fio.returncode
        res[f"{kind}_fio_err"] = err[-1500:]
        fields = out.strip().splitlines()[-1].split(";") if out.strip() else []
        res[f"{kind}_fio_error_field"] = fields[4] if len(fields) > 4 else None
        data = (Path(vol.target) / "payload").read_bytes()
        res[f"{kind}_payload_sha_after"] = hashlib.sha256(data).hexdigest()
    step(res, f"{kind}_unpublish", vol.unpublish)
    step(res, f"{kind}_unstage", vol.unstage)
    srv.stop()


def expansion() -> None:
    res = Results()
    plugin = Plugin(1)
    caps = plugin.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest()).capabilities
    res["node_capabilities"] = sorted(c.rpc.type for c in caps)
    for kind in ("ext4", "xfs", "block"):
        _grow(res, plugin, kind)
    res["log"] = plugin.log_path.read_text()[-3000:]
    res["agent_stop_rc"] = plugin.stop()
    res["devices_at_end"] = guest.configured_devices()
