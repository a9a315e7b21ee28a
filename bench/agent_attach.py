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

    def reconnect_once(argv: list[str], dev: str | None, label: str) -> dict[str, Any]:
        """Attach in persist mode (``dev`` None: the client prints it), crash the server, bring
        it back, and time the first read that succeeds after it accepts again."""
        nonlocal srv
        log = open(guest.WORK / f"{label}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if dev is None else log, stderr=log)
        if dev is None:
            assert proc.stdout is not None
            dev = proc.stdout.readline().decode().strip()
        device = dev
        guest.wait_until(lambda: guest.getsize64(device) == 64 * MiB, 15, f"{label} attached")
        srv.kill()
        t_kill = time.monotonic()
        during = subprocess.Popen(
            ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "skip=9"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        guest.wait_until(lambda: time.monotonic() - t_kill >= down, down + 5, "downtime", 0.05)
        srv = guest.server("nbdkit", image, port=port).start()
        t_up = time.monotonic()
        # Reads after the restart until one succeeds; a client that never reconnects runs
        # into the deadline and is recorded as None.
        flow: float | None = None
        failed_after = 0
        while time.monotonic() - t_up < 15:
            after = guest.run(
                ["dd", f"if={dev}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct"],
                timeout=180,
            )
            if after.returncode == 0:
                flow = time.monotonic() - t_up
                break
            failed_after += 1
            time.sleep(0.05)  # a failed read returns at once: pace the retries
        out = {
            "device": dev,
            "io_flow_s": flow,
            "reads_failed_after_restart": failed_after,
            "read_during_outage_rc": during.wait(180),
        }
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        return out

    runs: dict[str, list[dict[str, Any]]] = {
        "nbd-agent attach --persist": [],
        "nbd-client -persist (netlink)": [],
        "nbd-client -persist -nonetlink": [],
    }
    nbd_client = ["nbd-client", "127.0.0.1", str(port), "/dev/nbd1", "-N", "", "-persist"]
    for _ in range(max(1, reps // 2)):
        agent_argv = [guest.PY, "-m", "nbd_agent.cli", "attach", "--persist", uri]
        out = reconnect_once(agent_argv, None, "agent")
        runs["nbd-agent attach --persist"].append(out)
        guest.agent("detach", out["device"], "--force")
        runs["nbd-client -persist (netlink)"].append(
            reconnect_once(nbd_client, "/dev/nbd1", "nbd-client")
        )
        guest.run(["nbd-client", "-d", "/dev/nbd1"])
        guest.wait_until(lambda: 1 not in guest.configured_devices(), 10, "nbd-client -d")
        runs["nbd-client -persist -nonetlink"].append(
            reconnect_once([*nbd_client, "-nonetlink", "-nofork"], "/dev/nbd1", "nbd-client-ioctl")
        )
        guest.run(["nbd-client", "-d", "/dev/nbd1"])
        guest.wait_until(lambda: 1 not in guest.configured_devices(), 10, "nbd-client -d")
    res["reconnect"] = runs
    srv.stop()


def _summary(data: dict[str, Any]) -> str:
    lines = ["| client | attach median (s) | min | max |", "|---|---|---|---|"]
    for name, values in data.get("attach", {}).items():
        lines.append(
            f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |"
        )
    lines += [
        "",
        "| client | server up -> first good read, median (s) | read during outage failed "
        "| reads failed after restart |",
        "|---|---|---|---|",
    ]
    for name, runs in data.get("reconnect", {}).items():
        flows = [r["io_flow_s"] for r in runs if r["io_flow_s"] is not None]
        flow = f"{statistics.median(flows):.3f}" if flows else "never (15 s)"
        if flows and len(flows) < len(runs):
            flow += f" ({len(runs) - len(flows)} of {len(runs)} runs: never)"
        failed = sum(r["read_during_outage_rc"] != 0 for r in runs)
        after = sum(r["reads_failed_after_restart"] for r in runs)
        lines.append(f"| {name} | {flow} | {failed}/{len(runs)} | {after} |")
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
