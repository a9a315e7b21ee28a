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
from bench.workloads import Workload, fio_command

TOP = 15


def summarize_collapsed(text: str, top: int = TOP) -> str:
    """Summarize py-spy's raw (collapsed) output: 'frame;frame;... count' per line."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_function(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for f in set(frames):
            inclusive[f] += count
    if total == 0:
        return "no samples\n"
    out = [f"samples: {total}", "", "own time (where the CPU is):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive time (under this function):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def _function(frame: str) -> str:
    """'read (nbdserver/server.py:120)' -> 'read (nbdserver/server.py)': group by function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    # Keep the project-relative part of a path; stdlib paths keep their last two parts.
    if "/nbdserver/" in path:
        path = "nbdserver/" + path.split("/nbdserver/", 1)[1]
    elif path.count("/") > 1:
        path = "/".join(path.split("/")[-2:])
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
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
         "--percent-limit", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return "\n".join(lines[:top]) + "\n"


def profile_one(
    args: argparse.Namespace, w: Workload, server: peers.RunningServer, outdir: Path
) -> str:
    """Run w once against server under py-spy (and perf); return the summary text."""
    pyspy = shutil.which("py-spy") or str(Path(args.nbdserver).parent / "py-spy")
    raw = outdir / f"{w.name}.pyspy.txt"
    recorders = []
    pyspy_cmd = [pyspy, "record", "--pid", str(server.pid), "--subprocesses", "--format", "raw",
                 "--rate", "250", "-o", str(raw)]  # fmt: skip
    recorders.append(subprocess.Popen(pyspy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    perf_data = outdir / f"{w.name}.perf.data"
    if args.perf and shutil.which("perf"):
        perf_cmd = [
            "perf",
            "record",
            "-q",
            "-F",
            "499",
            "-g",
            "-p",
            str(server.pid),
            "-o",
            str(perf_data),
        ]
        recorders.append(
            subprocess.Popen(perf_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    out = outdir / f"{w.name}.fio.json"
    cmd = fio_command(w, server.uri, args.runtime, args.image_bytes, str(out), args.ramp, args.fio)
    try:
        subprocess.run(
            cmd, capture_output=True, timeout=args.runtime + args.ramp + 120, check=False
        )
    finally:
        for rec in recorders:
            _stop(rec)
    parts = [f"# {w.name}: {w.description}", ""]
    if raw.exists():
        parts.append(summarize_collapsed(raw.read_text()))
    else:
        err = recorders[0].stderr.read().decode(errors="replace") if recorders[0].stderr else ""
        parts.append(f"py-spy wrote nothing: {err.strip()[-300:]}\n")
    if perf_data.exists():
        parts += ["perf (own time by dso and symbol):", perf_summary(perf_data)]
    return "\n".join(parts)


def profile_workloads(args: argparse.Namespace, server: peers.RunningServer, outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for w in args.workload_list:
        print(f"profiling nbdserver: {w.name}", flush=True, file=sys.stderr)
        summaries.append(profile_one(args, w, server, outdir))
    (outdir / "summary.txt").write_text("\n".join(summaries))
