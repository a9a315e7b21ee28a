"""Export identity in a real kernel, inside one UML guest (host side: test_export_identity_uml.py).

1. A memory export restarted under a mounted ext4: the agent refuses the new (empty) export,
   the device fails its reads (EIO), nothing reads zeros where the data was.
2. A persistent copy-on-write clone whose server is killed and restarted: its writes are still
   there, the base untouched, the device reconnected (same identity).
3. A file export restarted larger: the device grows (RECONFIGURE with the new size) and stays
   attached; the new tail is writable.
4. The CSI plugin's attacher (in process) over a memory export that restarts: it records the
   refusal, and the volume condition NodeGetVolumeStats reports turns abnormal with the reason.

What it must not do: import pytest, or run on the host.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.kernel import guest
from tests.kernel.guest import Results, agent, run, wait_until
from tests.kernel.scenarios_agent import MiB


def _nbdserver(port: int, *args: str) -> guest.Server:
    argv = [guest.PY, "-m", "nbdserver", "serve", *args]
    argv += ["--bind", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return guest.Server("nbdserver", argv, port)


def _persist(uri: str, log_name: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    log_path = guest.WORK / log_name
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [guest.PY, "-m", "nbd_agent.cli", "-v", "attach", "--persist", uri],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip(), log_path


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(15)


def _restart_after_kill(srv: guest.Server, log: Path, again: guest.Server) -> guest.Server:
    srv.kill()
    wait_until(lambda: "link dead" in log.read_text(), 10, "LINK_DEAD")
    return again.start()


def _finish(
    out: dict[str, Any], proc: subprocess.Popen[bytes], dev: str, log: Path, srv: guest.Server
) -> dict[str, Any]:
    """End a phase: keep the agent's log, stop it, detach the device, stop the server."""
    out["log"] = log.read_text()[-2000:]
    out["agent_rc"] = _stop(proc)
    out["detach_rc"] = agent("detach", dev).returncode
    srv.stop()
    return out


def _dd_read(dev: str, skip_4k: int) -> tuple[int, bytes, str]:
    done = subprocess.run(
        ["dd", f"if={dev}", "bs=4k", "count=1", f"skip={skip_4k}", "iflag=direct"],
        capture_output=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr.decode()[-300:]


def identity() -> None:
    res = Results()
    res["memory"] = _memory_under_ext4()
    res["clone"] = _clone_survives()
    res["grown"] = _grown_export()
    res["csi"] = _csi_condition()


def _memory_under_ext4() -> dict[str, Any]:
    out: dict[str, Any] = {}
    port = guest.free_port()
    spec = ["-e", "scratch=memory,size=64M"]
    srv = _nbdserver(port, *spec).start()
    proc, dev, log = _persist(f"nbd://127.0.0.1:{port}/scratch", "agent-mem.log")
    out["device"] = dev
    mnt = guest.SCRATCH / "mnt"
    mnt.mkdir()
    out["mkfs_rc"] = run(["mkfs.ext4", "-q", "-F", "-b", "4096", dev]).returncode
    out["mount_rc"] = run(["mount", dev, str(mnt)]).returncode
    data = os.urandom(256 * 1024)
    (mnt / "data.bin").write_bytes(data)
    run(["sync"])
    # Where the file lives on the device, to read it there directly afterwards.
    fib = run(["debugfs", "-R", "bmap /data.bin 0", dev]).stdout.strip()
    out["block"] = int(fib) if fib.isdigit() else None
    srv = _restart_after_kill(srv, log, _nbdserver(port, *spec))
    wait_until(lambda: "not reattaching" in log.read_text(), 20, "the refusal")
    out["log"] = log.read_text()[-2000:]
    run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"])
    cat = subprocess.run(["cat", str(mnt / "data.bin")], capture_output=True, timeout=60)
    out["cat_rc"] = cat.returncode
    out["cat_stderr"] = cat.stderr.decode()[-300:]
    out["cat_read_zeros"] = len(cat.stdout) > 0 and not any(cat.stdout)
    out["cat_read_data"] = cat.stdout == data
    block = out["block"] if out["block"] is not None else 0
    rc, got, err = _dd_read(dev, block)
    out["dd_rc"], out["dd_stderr"] = rc, err
    out["dd_read_zeros"] = len(got) > 0 and not any(got)
    out["configured_while_mounted"] = guest.configured_devices()
    out["umount_rc"] = run(["umount", str(mnt)]).returncode
    out["agent_rc"] = _stop(proc)
    wait_until(lambda: not guest.configured_devices(), 15, "the refused device to go")
    srv.stop()
    return out


def _clone_survives() -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = guest.make_image("base.img", 32 * MiB)
    base.write_bytes(b"B" * (32 * MiB))
    cow = guest.SCRATCH / "cow"
    cow.mkdir()
    port = guest.free_port()
    args = [str(base), "--name", "clone", "--copy-on-write", "persistent", "--cow-dir", str(cow)]
    srv = _nbdserver(port, *args).start()
    proc, dev, log = _persist(f"nbd://127.0.0.1:{port}/clone", "agent-clone.log")
    pattern = os.urandom(1 * MiB)
    (guest.SCRATCH / "clone.pattern").write_bytes(pattern)
    write = run(["dd", f"if={guest.SCRATCH / 'clone.pattern'}", f"of={dev}", "bs=64k",
                 "seek=37", "oflag=direct"])  # fmt: skip
    out["write_rc"] = write.returncode
    srv = _restart_after_kill(srv, log, _nbdserver(port, *args))
    wait_until(lambda: "reconnected after" in log.read_text(), 20, "the clone's reconnect")
    back = subprocess.run(
        ["dd", f"if={dev}", "bs=64k", "skip=37", "count=16", "iflag=direct"],
        capture_output=True,
        timeout=60,
    )
    out["read_rc"] = back.returncode
    out["writes_still_there"] = back.stdout == pattern
    out["base_untouched"] = base.read_bytes() == b"B" * (32 * MiB)
    return _finish(out, proc, dev, log, srv)


def _grown_export() -> dict[str, Any]:
    out: dict[str, Any] = {}
    image = guest.SCRATCH / "grow.img"
    port = guest.free_port()
    srv = _nbdserver(port, str(image), "--name", "g", "--size", "32M").start()
    proc, dev, log = _persist(f"nbd://127.0.0.1:{port}/g", "agent-grow.log")
    out["size_before"] = guest.getsize64(dev)
    bigger = _nbdserver(port, str(image), "--name", "g", "--size", "48M")
    srv = _restart_after_kill(srv, log, bigger)
    wait_until(lambda: guest.getsize64(dev) == 48 * MiB, 20, "the device to grow")
    out["size_after"] = guest.getsize64(dev)
    tail = os.urandom(64 * 1024)
    (guest.SCRATCH / "tail").write_bytes(tail)
    out["tail_write_rc"] = run(["dd", f"if={guest.SCRATCH / 'tail'}", f"of={dev}", "bs=64k",
                                f"seek={40 * 16}", "oflag=direct"]).returncode  # fmt: skip
    with open(image, "rb") as f:
        f.seek(40 * MiB)
        out["tail_in_image"] = f.read(len(tail)) == tail
    out["configured"] = guest.configured_devices()
    return _finish(out, proc, dev, log, srv)


def _csi_condition() -> dict[str, Any]:
    from nbd_agent.csi.kernel import KernelAttacher
    from nbd_agent.csi.node import NodeService
    from nbd_agent.csi.state import NodeState, VolumeRecord

    logging.basicConfig(filename=guest.WORK / "csi-keeper.log", level=logging.INFO)
    out: dict[str, Any] = {}
    port = guest.free_port()
    spec = ["-e", "scratch=memory,size=16M"]
    srv = _nbdserver(port, *spec).start()
    uri = f"nbd://127.0.0.1:{port}/scratch"
    attacher = KernelAttacher(dead_conn_timeout=30)
    attacher.start()
    reported: list[tuple[str, str]] = []
    attacher.on_refused = lambda device, why: reported.append((device, why))
    try:
        dev = attacher.attach(uri, False, 1)
        state_dir = guest.SCRATCH / "csi-state"
        state_dir.mkdir()
        node = NodeService("node-a", NodeState(str(state_dir)).load(), attacher)
        record = VolumeRecord(volume_id="v", uri=uri, device=dev)
        out["identity"] = attacher.identity(dev)
        before = node._condition(record)
        out["before"] = {"abnormal": before.abnormal, "message": before.message}
        srv.kill()
        srv = _nbdserver(port, *spec).start()
        wait_until(lambda: attacher.refusal(dev), 30, "the keeper's refusal")
        after = node._condition(record)
        out["after"] = {"abnormal": after.abnormal, "message": after.message}
        out["reported"] = reported
        rc, got, _ = _dd_read(dev, 0)
        out["dd_rc"], out["dd_bytes"] = rc, len(got)  # unheld, the device is gone: no bytes
    finally:
        attacher.close()
        srv.stop()
    return out
