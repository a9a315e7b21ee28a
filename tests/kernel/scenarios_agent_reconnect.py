"""Agent scenarios about staying attached, run inside one UML guest (host side:
test_agent_reconnect.py): server crashes under verifying fio, agent restart and adoption, an
nbds:// export through the TLS bridge, a multi-connection device.

What it must not do: import pytest, or run on the host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.kernel import guest
from tests.kernel.guest import Results, agent, run, wait_until
from tests.kernel.scenarios_agent import MiB, established_connections


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
    # The identity the agent recorded (and checks on every reconnect below).
    res["backend"] = (Path("/sys/block") / Path(dev).name / "backend").read_text().strip()
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
    out["established_before"] = established_connections(port)
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
    wait_until(lambda: established_connections(port) == 4, 10, "four connections again")
    out["established_after"] = established_connections(port)
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
    certs = guest.tls_certificates()
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
    # The agent dies: its TLS bridge dies with it, so the kernel's link is dead until a new
    # agent adopts the device and builds a new bridge.
    a3.send_signal(signal.SIGKILL)
    a3.wait(10)
    log.close()
    log5 = open(guest.WORK / "agent5.log", "wb")  # noqa: SIM115
    a5 = subprocess.Popen([guest.PY, "-m", "nbd_agent.cli", "-v", "watch"], stderr=log5)
    wait_until(lambda: "reconnected" in (guest.WORK / "agent5.log").read_text(), 20, "TLS adopt")
    r = run(["cmp", "-n", str(MiB), str(guest.SCRATCH / "pattern"), dev])
    out["read_after_adoption_rc"] = r.returncode
    a5.send_signal(signal.SIGTERM)
    a5.wait(10)
    log5.close()
    out["adoption_log"] = (guest.WORK / "agent5.log").read_text()[-2000:]
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
