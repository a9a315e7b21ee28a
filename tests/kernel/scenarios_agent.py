"""Agent scenarios that run inside one UML guest each (host-side tests: test_agent_*.py).

Why it exists: a boot costs seconds, so each function here batches many checks into one guest
and records what it saw in ``$WORK/results.json``; the host-side tests assert on that record.
Each step records before it asserts anything, so one broken step does not hide the others.

What it must not do: import pytest, or run on the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

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


def _established(port: int) -> int:
    r = run(["ss", "-Htn", "state", "established", f"( dport = :{port} )"])
    return len([line for line in r.stdout.splitlines() if line.strip()])


def _multi_conn(res: Results) -> None:
    image = guest.make_image("multi.img", 32 * MiB)
    srv = guest.server("nbdkit", image).start()
    out: dict[str, object] = {}
    try:
        p = agent("attach", f"nbd://127.0.0.1:{srv.port}/", "--connections", "4")
        out["rc"], out["err"], dev = p.returncode, p.stderr, p.stdout.strip()
        out["established"] = _established(srv.port)
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
        res["server_connections"] = _established(srv.port)
    finally:
        srv.stop()


def _fio(dev: str, name: str, size: str, extra: list[str]) -> subprocess.Popen[bytes]:
    argv = ["fio", f"--name={name}", f"--filename={dev}", "--ioengine=libaio", "--direct=1"]
    argv += [f"--size={size}", "--output-format=json", f"--output={guest.WORK / name}.json"]
    return subprocess.Popen(argv + extra)


def _fio_errors(name: str) -> dict[str, object]:
    data = json.loads((guest.WORK / f"{name}.json").read_text())
    job = data["jobs"][0]
    return {
        "error": job["error"],
        "write_ios": job["write"]["total_ios"],
        "read_ios": job["read"]["total_ios"],
    }


def _io_flows(dev: str) -> float:
    """Seconds until one direct 4 KiB read of ``dev`` completes (it waits while the link is
    down: the kernel holds I/O for the dead-connection timeout)."""
    t0 = time.monotonic()
    run(["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "skip=77"])
    return time.monotonic() - t0


def reconnect(kind: str = "nbdserver") -> None:
    """Boot 4: kill the server under fio --verify, restart it; then restart the agent, which
    adopts the device, and kill the server once more."""
    res = Results()
    image = guest.make_image("r.img", 64 * MiB)
    port = guest.free_port()
    srv = guest.server(kind, image, name="disk", port=port).start()
    uri = f"nbd://127.0.0.1:{port}/disk"
    log = open(guest.WORK / "agent1.log", "wb")  # noqa: SIM115
    a1 = subprocess.Popen(
        [guest.PY, "-m", "nbd_agent.cli", "-v", "attach", "--persist", uri],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert a1.stdout is not None
    dev = a1.stdout.readline().decode().strip()
    res["device"] = dev
    # Phase 1: a verifying write workload across a server crash.
    fio = _fio(
        dev,
        "fio1",
        "48M",
        [
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    )
    wait_until(lambda: _written(dev) > 4 * MiB, 30, "fio to write 4 MiB")
    srv.kill()
    res["killed_at_written"] = _written(dev)
    wait_until(lambda: "link dead" in (guest.WORK / "agent1.log").read_text(), 10, "LINK_DEAD")
    srv = guest.server(kind, image, name="disk", port=port).start()
    res["phase1_io_flow_s"] = round(_io_flows(dev), 3)
    res["fio1_rc"] = fio.wait(120)
    res["fio1"] = _fio_errors("fio1")
    # Phase 2: the agent restarts (SIGKILL: no goodbye); a new one adopts the device.
    a1.send_signal(signal.SIGKILL)
    a1.wait()
    log.close()
    res["configured_after_agent_death"] = guest.configured_devices()
    log2 = open(guest.WORK / "agent2.log", "wb")  # noqa: SIM115
    a2 = subprocess.Popen([guest.PY, "-m", "nbd_agent.cli", "-v", "watch"], stderr=log2)
    wait_until(
        lambda: "reconnected" in (guest.WORK / "agent2.log").read_text(), 20, "adoption check"
    )
    fio = _fio(
        dev,
        "fio2",
        "32M",
        [
            "--rw=randrw",
            "--bs=16k",
            "--iodepth=8",
            "--verify=md5",
            "--do_verify=1",
            "--verify_fatal=1",
            "--offset=16M",
        ],
    )
    wait_until(lambda: _written(dev) > 2 * MiB, 30, "fio2 to write")
    srv.kill()
    wait_until(lambda: "link dead" in (guest.WORK / "agent2.log").read_text(), 10, "LINK_DEAD 2")
    srv = guest.server(kind, image, name="disk", port=port).start()
    res["phase2_io_flow_s"] = round(_io_flows(dev), 3)
    res["fio2_rc"] = fio.wait(120)
    res["fio2"] = _fio_errors("fio2")
    a2.send_signal(signal.SIGTERM)
    res["agent2_rc"] = a2.wait(10)
    log2.close()
    res["agent1_log"] = (guest.WORK / "agent1.log").read_text()[-3000:]
    res["agent2_log"] = (guest.WORK / "agent2.log").read_text()[-3000:]
    res["detach_rc"] = agent("detach", dev).returncode
    res["configured_at_end"] = guest.configured_devices()
    srv.stop()
    _tls_phase(res)
    _multi_conn_phase(res)


def _multi_conn_phase(res: Results) -> None:
    """Phase 4: four connections die at once; all four are replaced (RECONFIGURE replaces one
    dead socket per new fd, and more LINK_DEADs may arrive while the first attempt runs)."""
    image = guest.make_image("mc.img", 32 * MiB)
    port = guest.free_port()
    srv = guest.server("nbdkit", image, port=port).start()
    out: dict[str, object] = {}
    log = open(guest.WORK / "agent4.log", "wb")  # noqa: SIM115
    uri = f"nbd://127.0.0.1:{port}/"
    a4 = subprocess.Popen(
        [guest.PY, "-m", "nbd_agent.cli", "-v", "attach", "--persist", "--connections", "4", uri],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert a4.stdout is not None
    dev = a4.stdout.readline().decode().strip()
    out["established_before"] = _established(port)
    srv.kill()
    wait_until(lambda: "link dead" in (guest.WORK / "agent4.log").read_text(), 10, "dead x4")
    srv = guest.server("nbdkit", image, port=port).start()
    out["io_flow_s"] = round(_io_flows(dev), 3)
    pattern = os.urandom(8 * MiB)
    (guest.SCRATCH / "mc.pattern").write_bytes(pattern)
    # Large direct writes spread over every connection: a link left dead would fail them
    # after its timeout, or hang them.
    w = run(["dd", f"if={guest.SCRATCH / 'mc.pattern'}", f"of={dev}", "bs=1M", "oflag=direct"])
    out["write_rc"] = w.returncode
    wait_until(lambda: _established(port) == 4, 10, "four connections again")
    out["established_after"] = _established(port)
    a4.send_signal(signal.SIGTERM)
    a4.wait(10)
    log.close()
    out["detach_rc"] = agent("detach", dev).returncode
    out["in_image"] = image.read_bytes()[: 8 * MiB] == pattern
    srv.stop()
    out["log"] = (guest.WORK / "agent4.log").read_text()[-2000:]
    res["multi_conn_reconnect"] = out


def _tls_phase(res: Results) -> None:
    """Phase 3: an nbds:// export through the userspace TLS bridge, across a server crash."""
    import trustme

    certs = guest.SCRATCH / "certs"
    certs.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(certs / "ca-cert.pem"))
    cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    cert.private_key_pem.write_to_path(str(certs / "server.key"))
    image = guest.make_image("tls.img", 16 * MiB)
    port = guest.free_port()
    tls_args = ["--tls", "require", "--tls-cert", str(certs / "server.pem")]
    tls_args += ["--tls-key", str(certs / "server.key")]

    def start() -> guest.Server:
        srv = guest.server("nbdserver", image, name="disk", port=port)
        srv.argv += tls_args
        return srv.start()

    srv = start()
    out: dict[str, object] = {}
    plain = agent("attach", f"nbd://127.0.0.1:{port}/disk")
    out["plain_refused"] = {"rc": plain.returncode, "stderr": plain.stderr.strip()}
    uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={certs}"
    no_persist = agent("attach", uri)
    out["no_persist"] = {"rc": no_persist.returncode, "stderr": no_persist.stderr.strip()}
    log = open(guest.WORK / "agent3.log", "wb")  # noqa: SIM115
    a3 = subprocess.Popen(
        [guest.PY, "-m", "nbd_agent.cli", "-v", "attach", "--persist", uri],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    assert a3.stdout is not None
    dev = a3.stdout.readline().decode().strip()
    out["device"] = dev
    pattern = os.urandom(1 * MiB)
    (guest.SCRATCH / "pattern").write_bytes(pattern)
    w = run(["dd", f"if={guest.SCRATCH / 'pattern'}", f"of={dev}", "bs=64k", "oflag=direct"])
    out["write_rc"] = w.returncode
    srv.kill()
    wait_until(lambda: "link dead" in (guest.WORK / "agent3.log").read_text(), 10, "TLS dead")
    srv = start()
    out["io_flow_s"] = round(_io_flows(dev), 3)
    r = run(["cmp", "-n", str(MiB), str(guest.SCRATCH / "pattern"), dev])
    out["read_back_rc"] = r.returncode
    a3.send_signal(signal.SIGTERM)
    a3.wait(10)
    log.close()
    out["detach_rc"] = agent("detach", dev).returncode
    srv.stop()
    image_head = image.read_bytes()[:MiB]
    out["in_image"] = image_head == pattern
    out["log"] = (guest.WORK / "agent3.log").read_text()[-2000:]
    res["tls"] = out


def _written(dev: str) -> int:
    """Bytes written to ``dev`` so far (sectors written, from /sys/block/nbdN/stat)."""
    stat = Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()
    return int(stat[6]) * 512
