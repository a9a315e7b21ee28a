"""Profile nbdserver under each bench workload with py-spy (and perf, if asked).

Why: "make the server fast" starts from where its time goes per workload. py-spy samples the
Python stacks of the running server (all threads and worker processes) without changing it;
perf adds what happens below Python (syscalls, copies in the kernel, the interpreter itself).
This module runs one extra fio job per workload while the profilers record, then writes the raw
profiles and a short text summary (top functions by own time and by inclusive time).

What it must not do: run during the measured rounds (a sampling profiler slows the server it
samples, so its figures never enter the table), or edit the server.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from bench import peers
from bench.report import markdown_table
from bench.workloads import FioError, Workload, fio_command, parse_fio_json

TOP = 15


def summarize_collapsed(text: str, top: int = TOP) -> str:
    """Summarize py-spy's raw (collapsed) output: 'frame;frame;... count' per line."""
    own: collections.Counter[str] = collections.Counter()
    own_lines: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        raw_frames = stack.split(";")
        frames = [_function(f) for f in raw_frames]
        own[frames[-1]] += count
        own_lines[_function(raw_frames[-1], keep_line=True)] += count
        for f in set(frames):
            inclusive[f] += count
    if total == 0:
        return "no samples\n"
    out = [f"samples: {total}", "", "own time (where the CPU is):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "own time by line (a C call such as recv_into counts on its Python line):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own_lines.most_common(top)]
    out += ["", "inclusive time (under this function):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def _function(frame: str, keep_line: bool = False) -> str:
    """'read (/x/nbdserver/server.py:120)' -> 'read (nbdserver/server.py)' (or ...py:120)."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    if not path or not line.isdigit():
        path, line = where.rstrip(")"), ""
    # Keep the project-relative part of a path; stdlib paths keep their last two parts.
    if "/nbdserver/" in path:
        path = "nbdserver/" + path.split("/nbdserver/", 1)[1]
    elif path.count("/") > 1:
        path = "/".join(path.split("/")[-2:])
    if keep_line and line:
        path = f"{path}:{line}"
    return f"{name} ({path})" if path else name


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Ask a recorder to finish (SIGINT makes py-spy and perf write their output)."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def perf_summary(data: Path, top: int = 25) -> str:
    rep = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
         "--sort", "dso,sym", "--percent-limit", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines[:top]) + "\n"


def _recording(
    cmd: list[str], timeout: float, out: Path, recorders: list[list[str]]
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Run fio while the recorders run; return the recorders (stopped) and fio's JSON."""
    procs = [
        subprocess.Popen(r, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in recorders
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    finally:
        for proc in procs:
            _stop(proc)
    return procs, out.read_text() if out.exists() else ""


def profile_nbdserver(
    args: argparse.Namespace, w: Workload, server: peers.RunningServer, outdir: Path
) -> str:
    """Run w once against nbdserver under py-spy (and perf record); return the summary text."""
    pyspy = shutil.which("py-spy") or str(Path(args.nbdserver).parent / "py-spy")
    raw = outdir / f"{w.name}.pyspy.txt"
    recorders = [[pyspy, "record", "--pid", str(server.pid), "--subprocesses", "--format", "raw",
                  "--rate", "250", "--nonblocking", "-o", str(raw)]]  # fmt: skip
    perf_data = outdir / f"{w.name}.perf.data"
    if args.perf and shutil.which("perf"):
        recorders.append(["perf", "record", "-q", "-F", "499", "-g", "-p", str(server.pid),
                          "-o", str(perf_data)])  # fmt: skip
    out = outdir / f"{w.name}.fio.json"
    cmd = fio_command(w, server.uri, args.runtime, args.image_bytes, str(out), args.ramp, args.fio)
    procs, _ = _recording(cmd, args.runtime + args.ramp + 120, out, recorders)
    parts = [f"# nbdserver, {w.name}: {w.description}", ""]
    if raw.exists():
        parts.append(summarize_collapsed(raw.read_text()))
    else:
        err = procs[0].stderr.read().decode(errors="replace") if procs[0].stderr else ""
        parts.append(f"py-spy wrote nothing: {err.strip()[-300:]}\n")
    if perf_data.exists():
        parts += ["perf (own time by dso and symbol):", perf_summary(perf_data)]
    return "\n".join(parts)


def parse_perf_stat(text: str) -> dict[str, float]:
    """perf stat -x, output: 'value,unit,event,...' per line -> {event: value}."""
    counts = {}
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                counts[fields[2]] = float(fields[0])
    return counts


def syscall_census(
    args: argparse.Namespace, w: Workload, server: peers.RunningServer, outdir: Path
) -> dict[str, float]:
    """Syscalls, context switches and CPU milliseconds per I/O of server under w (perf stat)."""
    stat = outdir / f"{w.name}.{server.spec.name}.perfstat.txt"
    out = outdir / f"{w.name}.{server.spec.name}.fio.json"
    # Count the whole tree: perf stat's counters are inherited by children forked later (nbd-server
    # forks one per connection). No ramp: every I/O fio counts happens while perf counts.
    pids = ",".join(str(p) for p in peers.process_tree(server.pid))
    recorder = ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,context-switches,task-clock",
                "-p", pids, "-o", str(stat)]  # fmt: skip
    cmd = fio_command(w, server.uri, args.runtime, args.image_bytes, str(out), 0, args.fio)
    user0, _ = peers.cpu_split(server.pid)
    _, fio_text = _recording(cmd, args.runtime + 120, out, [recorder])
    user1, _ = peers.cpu_split(server.pid)
    try:
        ios = parse_fio_json(fio_text, w).total_ios
    except FioError:
        return {}
    counts = parse_perf_stat(stat.read_text()) if stat.exists() else {}
    if not ios or not counts:
        return {}
    return {
        "syscalls/io": counts.get("raw_syscalls:sys_enter", 0) / ios,
        "ctxsw/io": counts.get("context-switches", 0) / ios,
        "cpu_us/io": 1000 * counts.get("task-clock", 0) / ios,
        # User-space share: for nbdserver, the interpreter's own cost per request.
        "user_us/io": 1e6 * (user1 - user0) / ios,
    }


def census_table(
    census: dict[tuple[str, str], dict[str, float]], workloads: list[Workload], servers: list[str]
) -> str:
    """One row per workload and server: syscalls, context switches, CPU and user CPU per I/O."""
    keys = ("syscalls/io", "ctxsw/io", "cpu_us/io", "user_us/io")
    body = []
    for w in workloads:
        for s in servers:
            c = census.get((w.name, s), {})
            body.append([w.name, s, *[f"{c[k]:.1f}" if k in c else "n/a" for k in keys]])
    return markdown_table(["workload", "server", *keys], body)


def profile_workloads(
    args: argparse.Namespace, running: dict[str, peers.RunningServer], outdir: Path
) -> None:
    """py-spy (and perf) profiles of nbdserver; a perf stat census of every running server."""
    outdir.mkdir(parents=True, exist_ok=True)
    summaries = []
    census: dict[tuple[str, str], dict[str, float]] = {}
    for w in args.workload_list:
        if "nbdserver" in running:
            print(f"profiling nbdserver: {w.name}", flush=True, file=sys.stderr)
            summaries.append(profile_nbdserver(args, w, running["nbdserver"], outdir))
        if shutil.which("perf"):
            for name, server in running.items():
                print(f"counting syscalls: {name} {w.name}", flush=True, file=sys.stderr)
                census[(w.name, name)] = syscall_census(args, w, server, outdir)
    if census:
        table = census_table(census, args.workload_list, list(running))
        summaries.insert(0, f"# syscalls, context switches and server CPU per I/O\n\n{table}\n")
    (outdir / "summary.txt").write_text("\n".join(summaries))
    print(f"profile written to {outdir / 'summary.txt'}", file=sys.stderr)
