"""Attach latency and reconnect time: nbd-agent next to Debian's nbd-client, in one UML kernel.

Why it exists: the issue's closing note must quote these figures side by side, measured the same
way on the same kernel against the same server (nbdkit's file plugin, so the server's own cost
is small and identical for both clients).

What is measured (median of ``--reps`` runs each):
* attach: wall time of the attach command until it returns with the device configured
  (``nbd-agent attach`` CLI including Python start-up; the in-process ``attach()`` call the CSI
  daemon pays; ``nbd-client`` with netlink), each followed by a detach that is not timed.
* reconnect: the server is SIGKILLed while the device is attached in persist mode and restarted
  after ``--down`` seconds; the figure is the time from the restarted server accepting
  connections to a direct 4 KiB read on the device completing, and whether that read (or one
  issued while the server was down) failed. nbd-agent: ``attach --persist`` (dead-connection
  timeout 120 s); nbd-client: ``-persist`` in its default (netlink) mode.

Run: ``.venv/bin/python -m bench.agent_attach [--reps 5] [--json out.json]``. Takes ~1 minute.
What it must not do: run on the host's kernel (it needs root and nbd.ko: it boots UML).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MiB = 1 << 20


def _guest_main() -> None:
    """Runs inside the UML guest; writes $WORK/results.json."""
    from tests.kernel import guest

    reps = int(os.environ.get("BENCH_REPS", "5"))
    down = float(os.environ.get("BENCH_DOWN", "1.0"))
    res = guest.Results()
    image = guest.make_image("bench.img", 64 * MiB)
    port = guest.free_port()
    srv = guest.server("nbdkit", image, port=port).start()
    uri = f"nbd://127.0.0.1:{port}/"

    def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
        t0 = time.monotonic()
        p = guest.run(argv)
        return time.monotonic() - t0, p

    agent_cli, agent_api, client = [], [], []
    from nbd_agent import attach

    for _ in range(reps):
        dt, p = timed([guest.PY, "-m", "nbd_agent.cli", "attach", uri])
        assert p.returncode == 0, p.stderr
        agent_cli.append(dt)
        guest.agent("detach", p.stdout.strip())
        t0 = time.monotonic()
        a = attach.attach(uri, attach.AttachOptions())
        agent_api.append(time.monotonic() - t0)
        attach.detach(a.index)
        dt, p = timed(["nbd-client", "127.0.0.1", str(port), "/dev/nbd1", "-N", ""])
        assert p.returncode == 0, p.stderr
        client.append(dt)
        guest.run(["nbd-client", "-d", "/dev/nbd1"])
        guest.wait_until(lambda: 1 not in guest.configured_devices(), 10, "nbd-client -d")
    res["attach"] = {
        "nbd-agent CLI": agent_cli,
        "nbd-agent attach()": agent_api,
        "nbd-client": client,
    }

    def reconnect_once(start_client: list[str], dev: str, label: str) -> dict[str, Any]:
        nonlocal srv
        log = open(guest.WORK / f"{label}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(start_client, stdout=log, stderr=log)
        guest.wait_until(lambda: guest.getsize64(dev) == 64 * MiB, 15, f"{label} attached")
        srv.kill()
        t_kill = time.monotonic()
        during = subprocess.Popen(
            ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "skip=9"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        guest.wait_until(lambda: time.monotonic() - t_kill >= down, down + 5, "downtime", 0.05)
        srv = guest.server("nbdkit", image, port=port).start()
        t_up = time.monotonic()
        after = guest.run(
            ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "skip=33"],
            timeout=180,
        )
        flow = time.monotonic() - t_up
        during_rc = during.wait(180)
        out = {
            "io_flow_s": flow,
            "read_after_rc": after.returncode,
            "read_during_outage_rc": during_rc,
        }
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        return out

    agent_runs, client_runs = [], []
    for _ in range(max(1, reps // 2)):
        agent_runs.append(
            reconnect_once(
                [
                    guest.PY,
                    "-m",
                    "nbd_agent.cli",
                    "attach",
                    "--persist",
                    "--device",
                    "/dev/nbd0",
                    uri,
                ],
                "/dev/nbd0",
                "agent",
            )
        )
        guest.agent("detach", "/dev/nbd0", "--force")
        client_runs.append(
            reconnect_once(
                [
                    "nbd-client",
                    "127.0.0.1",
                    str(port),
                    "/dev/nbd1",
                    "-N",
                    "",
                    "-persist",
                    "-nofork",
                ],
                "/dev/nbd1",
                "nbd-client",
            )
        )
        guest.run(["nbd-client", "-d", "/dev/nbd1"])
    res["reconnect"] = {"nbd-agent": agent_runs, "nbd-client": client_runs}
    srv.stop()


def _summary(data: dict[str, Any]) -> str:
    lines = ["| client | attach median (s) | min | max |", "|---|---|---|---|"]
    for name, values in data.get("attach", {}).items():
        lines.append(
            f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |"
        )
    lines += [
        "",
        "| client | server up -> I/O flows, median (s) | reads failed (during/after) |",
        "|---|---|---|",
    ]
    for name, runs in data.get("reconnect", {}).items():
        flows = [r["io_flow_s"] for r in runs]
        failed = sum(r["read_during_outage_rc"] != 0 for r in runs)
        failed_after = sum(r["read_after_rc"] != 0 for r in runs)
        lines.append(
            f"| {name} | {statistics.median(flows):.3f} | {failed}/{len(runs)} during, "
            f"{failed_after}/{len(runs)} after |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--down", type=float, default=1.0, help="seconds the server stays down")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.kernel.uml import run_in_uml

    os.environ["BENCH_REPS"], os.environ["BENCH_DOWN"] = str(args.reps), str(args.down)
    script = (
        f"export BENCH_REPS={args.reps} BENCH_DOWN={args.down}\n"
        "exec $PY -c 'from bench.agent_attach import _guest_main; _guest_main()'\n"
    )
    result = run_in_uml(script, timeout=120 + 40 * args.reps, nbds_max=4)
    data = (
        json.loads((result.workdir / "results.json").read_text())
        if (result.workdir / "results.json").exists()
        else {}
    )
    if result.returncode != 0:
        print(result.output[-4000:], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    print(_summary(data))
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
