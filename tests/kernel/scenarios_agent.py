"""Agent scenarios that run inside one UML guest each (host-side tests: test_agent_*.py).

Why it exists: a boot costs seconds, so each function here batches many checks into one guest
and records what it saw in ``$WORK/results.json``; the host-side tests assert on that record.
Each step records before it asserts anything, so one broken step does not hide the others.

What it must not do: import pytest, or run on the host.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

from tests.kernel import guest
from tests.kernel.guest import Results, agent, run, wait_until

MiB = 1 << 20
SERVER_KINDS = ("nbdserver", "nbdkit", "qemu-nbd", "nbd-server")


def _ext4_roundtrip(kind: str, res: Results) -> None:
    """Attach, mkfs.ext4, mount, write, sync, umount, detach; then read the file from the
    image itself (debugfs reads ext4 images without a kernel)."""
    image = guest.make_image(f"{kind}.img", 64 * MiB)
    srv = guest.server(kind, image, name="disk").start()
    out: dict[str, object] = {}
    res[kind] = out
    try:
        uri = f"nbd://127.0.0.1:{srv.port}/disk"
        t0 = time.monotonic()
        p = agent("attach", uri)
        out["attach_s"] = round(time.monotonic() - t0, 3)
        out["attach_rc"], out["attach_err"] = p.returncode, p.stderr
        dev = p.stdout.strip()
        out["device"] = dev
        if p.returncode != 0:
            return
        out["size"] = guest.getsize64(dev)
        payload = os.urandom(3 * MiB)
        out["sha256"] = hashlib.sha256(payload).hexdigest()
        mnt = guest.SCRATCH / f"mnt-{kind}"
        mnt.mkdir()
        steps = [
            ["mkfs.ext4", "-q", "-F", dev],
            ["mount", dev, str(mnt)],
        ]
        for argv in steps:
            r = run(argv)
            out[f"{argv[0]}_rc"] = r.returncode
            if r.returncode:
                out[f"{argv[0]}_err"] = r.stderr
                return
        (mnt / "data.bin").write_bytes(payload)
        run(["sync"])
        out["umount_rc"] = run(["umount", str(mnt)]).returncode
        d = agent("detach", dev)
        out["detach_rc"], out["detach_err"] = d.returncode, d.stderr
        out["configured_after_detach"] = guest.configured_devices()
    finally:
        srv.stop()
    dump = guest.SCRATCH / f"{kind}.out"
    r = run(["debugfs", "-R", f"dump /data.bin {dump}", str(image)])
    out["image_sha256"] = hashlib.sha256(dump.read_bytes()).hexdigest() if dump.exists() else None
    image.unlink()


def attach_matrix() -> None:
    """Boot 1: every server kind, ext4 round trip; multi-connection; read-only."""
    res = Results()
    for kind in SERVER_KINDS:
        try:
            _ext4_roundtrip(kind, res)
        except Exception as exc:  # record and go on: the other servers still get their run
            res[f"{kind}_exception"] = repr(exc)
    _multi_conn(res)
    _read_only(res)
    _odd_size(res)
    _unix_socket(res)


def _unix_socket(res: Results) -> None:
    """nbd+unix:// URIs: the kernel takes a unix stream socket as well as a TCP one."""
    image = guest.make_image("unix.img", 8 * MiB)
    path = guest.SCRATCH / "nbd.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(path), "file", str(image)])
    try:
        wait_until(path.exists, 15, "nbdkit's unix socket")
        p = agent("attach", f"nbd+unix:///?socket={path}")
        dev = p.stdout.strip()
        out: dict[str, object] = {"rc": p.returncode, "err": p.stderr}
        if p.returncode == 0:
            w = run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=2", "oflag=direct"])
            out["dd_rc"] = w.returncode
            out["cmp_rc"] = run(["cmp", "-n", str(2 * MiB), dev, str(image)]).returncode
            out["detach_rc"] = agent("detach", dev).returncode
        res["unix_socket"] = out
    finally:
        proc.terminate()
        proc.wait(10)


def _odd_size(res: Results) -> None:
    """An export whose size is not a whole number of sectors: the kernel rounds it down."""
    size = 8 * MiB + 1000
    image = guest.make_image("odd.img", size)
    srv = guest.server("nbdserver", image, name="odd").start()
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/odd")
        dev = p.stdout.strip()
        res["odd_size"] = {
            "rc": p.returncode,
            "err": p.stderr,
            "export_size": size,
            "device_size": guest.getsize64(dev) if p.returncode == 0 else None,
            "detach_rc": agent("detach", dev).returncode if p.returncode == 0 else None,
        }
    finally:
        srv.stop()


def established_connections(port: int) -> int:
    r = run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"])
    return len([line for line in r.stdout.splitlines() if line.strip()])


def _multi_conn(res: Results) -> None:
    image = guest.make_image("multi.img", 32 * MiB)
    srv = guest.server("nbdkit", image).start()
    out: dict[str, object] = {}
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/", "--connections", "4")
        out["rc"], out["err"], dev = p.returncode, p.stderr, p.stdout.strip()
        out["established"] = established_connections(srv.port)
        if p.returncode == 0:
            w = run(["dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=16", "oflag=direct"])
            out["dd_rc"] = w.returncode
            a = run(["cmp", "-n", str(16 * MiB), dev, str(image)])
            out["cmp_rc"] = a.returncode
            out["detach_rc"] = agent("detach", dev).returncode
        out["configured_after"] = guest.configured_devices()
        res["multi_conn"] = out
    finally:
        srv.stop()


def _read_only(res: Results) -> None:
    image = guest.make_image("ro.img", 16 * MiB)
    srv = guest.server("nbdkit", image).start()
    out: dict[str, object] = {}
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/", "--read-only")
        out["rc"], out["err"], dev = p.returncode, p.stderr, p.stdout.strip()
        out["getro"] = run(["blockdev", "--getro", dev]).stdout.strip()
        w = run(["dd", "if=/dev/zero", f"of={dev}", "bs=4k", "count=1", "oflag=direct"])
        out["write_rc"], out["write_err"] = w.returncode, w.stderr[-300:]
        r = run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=4", "iflag=direct"])
        out["read_rc"] = r.returncode
        out["detach_rc"] = agent("detach", dev).returncode
        res["read_only"] = out
    finally:
        srv.stop()
    # A server that exports read-only makes the device read-only without --read-only.
    srv = guest.server("qemu-nbd", image, name="ro")
    srv.argv.insert(1, "--read-only")  # qemu-nbd's own read-only export
    srv.start()
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/ro")
        dev = p.stdout.strip()
        res["server_read_only"] = {
            "rc": p.returncode,
            "getro": run(["blockdev", "--getro", dev]).stdout.strip(),
            "detach_rc": agent("detach", dev).returncode,
        }
    finally:
        srv.stop()


def failures() -> None:
    """Boot 2 (nbds_max=2): each failure is a clear error and leaves no device configured."""
    res = Results()

    def attempt(key: str, *args: str) -> None:
        p = agent("attach", *args)
        res[key] = {
            "rc": p.returncode,
            "stdout": p.stdout,
            "stderr": p.stderr.strip(),
            "configured": guest.configured_devices(),
        }

    attempt("unreachable", f"nbd://127.0.0.1:{guest.free_port()}/disk")
    image = guest.make_image("f.img", 16 * MiB)
    srv = guest.server("qemu-nbd", image, name="disk").start()
    try:
        attempt("unknown_export", f"nbd://127.0.0.1:{srv.port}/nope")
        attempt("no_such_device", f"nbd://127.0.0.1:{srv.port}/disk", "--device", "/dev/nbd7")
        attempt("bad_uri", "http://127.0.0.1/disk")
        # A writable export without NBD_FLAG_CAN_MULTI_CONN: more connections could lose data.
        port = guest.free_port()
        single = guest.Server(
            "nbdkit",
            [
                "nbdkit",
                "-f",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "--filter=multi-conn",
                "file",
                str(image),
                "multi-conn-mode=disable",
            ],
            port,
        ).start()
        try:
            attempt("multi_conn_refused", f"nbd://127.0.0.1:{port}/", "--connections", "2")
        finally:
            single.stop()
        first = agent("attach", f"nbd://127.0.0.1:{srv.port}/disk", "--device", "/dev/nbd0")
        res["first"] = {"rc": first.returncode, "dev": first.stdout.strip()}
        attempt("device_busy", f"nbd://127.0.0.1:{srv.port}/disk", "--device", "/dev/nbd0")
        second = agent("attach", f"nbd://127.0.0.1:{srv.port}/disk", "--read-only")
        res["second"] = {"rc": second.returncode, "dev": second.stdout.strip()}
        attempt("no_free_device", f"nbd://127.0.0.1:{srv.port}/disk")
        # The device that was busy is untouched: still attached, still working.
        r = run(["dd", "if=/dev/nbd0", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"])
        res["busy_device_still_works"] = r.returncode == 0
        mnt = guest.SCRATCH / "mnt"
        mnt.mkdir()
        run(["mkfs.ext4", "-q", "-F", "/dev/nbd0"])
        run(["mount", "/dev/nbd0", str(mnt)])
        d = agent("detach", "/dev/nbd0")
        res["detach_mounted"] = {"rc": d.returncode, "stderr": d.stderr.strip()}
        run(["umount", str(mnt)])
        res["detach_after_umount_rc"] = agent("detach", "/dev/nbd0").returncode
        res["detach_second_rc"] = agent("detach", second.stdout.strip()).returncode
        res["detach_again"] = agent("detach", "/dev/nbd0").stderr.strip()
        res["configured_at_end"] = guest.configured_devices()
    finally:
        srv.stop()


def no_module() -> None:
    """Boot 3 (nbd.ko not loaded): the agent says so and does nothing."""
    res = Results()
    image = guest.make_image("m.img", 16 * MiB)
    srv = guest.server("nbdkit", image).start()
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/")
        res["attach"] = {"rc": p.returncode, "stderr": p.stderr.strip(), "stdout": p.stdout}
        p = agent("list")
        res["list"] = {"rc": p.returncode, "stderr": p.stderr.strip()}
        res["nbd_in_sys_block"] = [d for d in os.listdir("/sys/block") if d.startswith("nbd")]
        # The server saw the handshake or nothing at all, and holds no connection now.
        res["server_connections"] = established_connections(srv.port)
    finally:
        srv.stop()
