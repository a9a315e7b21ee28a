"""One command for the bench: nbdserver against qemu-nbd, nbdkit and nbd-server, side by side.

Why: the figures that matter are ratios measured in one run on one machine. This module starts
every server once on the same raw image in /dev/shm, then for each round and workload runs fio
against each server in turn (the order rotates every round so that no server always runs first
or last while the shared machine's load drifts), and prints each server's median, the ratio
nbdserver/peer and nbdserver's peak RSS.

What it must not do: change any server's code, hide a peer that cannot run (it is reported with
its reason), or leave a server or the image behind (everything is stopped in `finally`).

Usage: python -m bench [--rounds 3] [--runtime 10] [--servers nbdserver,nbdkit] [--workloads
seq-read,rand-read] [--image-size 1G] [--markdown FILE] [--profile DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers
from bench.report import BenchResults, from_json, render_markdown, render_text, to_json
from bench.workloads import (
    WORKLOADS,
    WORKLOADS_BY_NAME,
    FioError,
    Workload,
    fio_command,
    parse_fio_json,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SERVER_ORDER = ("nbdserver", "qemu-nbd", "nbdkit", "nbd-server")


def parse_size(text: str) -> int:
    """'1G', '256M', '64K' or a plain byte count (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--servers", default=",".join(SERVER_ORDER), help="comma list (default: all four)"
    )
    p.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS), help="comma list")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runtime", type=float, default=10.0, help="seconds per fio job (after ramp)")
    p.add_argument("--ramp", type=float, default=1.0, help="fio ramp_time seconds (not measured)")
    p.add_argument("--image-size", default="1G")
    p.add_argument(
        "--image-format",
        choices=["raw", "qcow2"],
        default="raw",
        help="qcow2: the data converted by qemu-img, one copy per server (fully allocated)",
    )
    p.add_argument("--image-dir", default="/dev/shm")
    p.add_argument("--nbdserver", default=str(REPO / ".venv" / "bin" / "nbdserver"))
    p.add_argument("--nbdserver-arg", action="append", default=[], help="extra arg (repeatable)")
    p.add_argument("--fio", default="fio")
    p.add_argument("--json", help="write results JSON here (default: bench/results/<time>.json)")
    p.add_argument("--no-save", action="store_true", help="do not write JSON to bench/results/")
    p.add_argument("--markdown", help="also write the tables as Markdown to this file")
    p.add_argument("--from-json", help="run nothing: print (and --markdown) a saved run's tables")
    p.add_argument("--profile", help="after the rounds, profile nbdserver per workload into DIR")
    p.add_argument("--perf", action="store_true", help="with --profile: also record with perf")
    args = p.parse_args(argv)
    args.server_list = [s for s in args.servers.split(",") if s]
    unknown = [s for s in args.server_list if s not in SERVER_ORDER]
    if unknown:
        p.error(f"unknown servers {unknown}; choose from {', '.join(SERVER_ORDER)}")
    args.workload_list = []
    for name in (n for n in args.workloads.split(",") if n):
        if name not in WORKLOADS_BY_NAME:
            p.error(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS_BY_NAME)}")
        args.workload_list.append(WORKLOADS_BY_NAME[name])
    if args.rounds < 1 or args.runtime <= 0:
        p.error("--rounds must be >= 1 and --runtime > 0")
    args.image_bytes = parse_size(args.image_size)
    return args


def make_image(directory: str, size: int) -> Path:
    """A raw image full of non-zero data, so that reads touch real pages, not tmpfs holes."""
    fd, name = tempfile.mkstemp(prefix="nbd-bench-", suffix=".img", dir=directory)
    chunk = os.urandom(1 << 20)
    with os.fdopen(fd, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
    return Path(name)


def can_multi_conn(uri: str) -> bool | None:
    """What the server advertises, asked with nbdinfo (exit 0: yes, 2: no)."""
    if shutil.which("nbdinfo") is None:
        return None
    rc = subprocess.run(
        ["nbdinfo", "--can", "multi-conn", uri], capture_output=True, timeout=30
    ).returncode
    return {0: True, 2: False}.get(rc)


def server_image(image: Path, image_format: str, server: str) -> Path:
    """The image ``server`` serves: the raw image itself, or its own qcow2 conversion (two
    servers must never allocate in one qcow2 file at once)."""
    if image_format == "raw":
        return image
    copy = image.parent / f"{image.name}.{server}.qcow2"
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(copy)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return copy


def git_facts() -> dict[str, str]:
    def git(*a: str) -> str:
        r = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "nbdserver_commit": git(
            "log", "-1", "--format=%h %<(60,trunc)%s", "--", "nbdserver"
        ).strip(),
        # The bench runs the working tree: say when it differs from that commit.
        "nbdserver_uncommitted": str(bool(git("status", "--porcelain", "--", "nbdserver"))),
    }


def run_fio(
    args: argparse.Namespace, w: Workload, server: peers.RunningServer, out: Path
) -> tuple[float, float]:
    """Run one fio job against server; return (figure, server CPU %)."""
    cmd = fio_command(w, server.uri, args.runtime, args.image_bytes, str(out), args.ramp, args.fio)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.runtime + args.ramp + 120
    )
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-2:]
        raise FioError(f"fio exited {proc.returncode}: {' | '.join(tail)}")
    if not server.alive():
        raise FioError(f"server died during the job: {server.log_tail()}")
    result = parse_fio_json(out.read_text(), w)
    return result.figure(w), 100.0 * (cpu1 - cpu0) / (t1 - t0)


def run_rounds(
    args: argparse.Namespace,
    results: BenchResults,
    running: dict[str, peers.RunningServer],
    scratch: Path,
) -> None:
    order = [s for s in results.servers if s in running]
    for r in range(args.rounds):
        # Rotate the order every round: drift in the machine's load then hits every server.
        rotated = order[r % len(order) :] + order[: r % len(order)] if order else []
        # The 1-minute load average at each round's start: how busy the shared machine was.
        results.meta.setdefault("loadavg_rounds", []).append(round(os.getloadavg()[0], 2))
        for w in args.workload_list:
            for name in rotated:
                cell = results.cell(w.name, name)
                try:
                    figure, cpu = run_fio(
                        args, w, running[name], scratch / f"{name}-{w.name}-{r}.json"
                    )
                except (FioError, subprocess.TimeoutExpired) as e:
                    cell.errors.append(str(e))
                    log(f"round {r + 1}/{args.rounds} {w.name:15} {name:10} FAILED: {e}")
                    continue
                cell.figures.append(figure)
                cell.cpu_percent.append(cpu)
                what = f"round {r + 1}/{args.rounds} {w.name:15} {name:10}"
                log(f"{what} {figure:12,.1f} {w.metric:5} cpu {cpu:5.0f}%")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> BenchResults:
    specs = peers.default_specs(args.nbdserver, tuple(args.nbdserver_arg), args.image_format)
    results = BenchResults(servers=list(args.server_list), workloads=list(args.workload_list))
    results.meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **git_facts(),
        "command": "python -m bench " + shlex.join(args.argv),
        "rounds": args.rounds,
        "runtime": f"{args.runtime:g} s (+{args.ramp:g} s ramp)",
        "image_size": args.image_size,
        "image_format": args.image_format,
        "cpus": os.cpu_count(),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }
    scratch = Path(tempfile.mkdtemp(prefix="nbd-bench-"))
    image = make_image(args.image_dir, args.image_bytes)
    running: dict[str, peers.RunningServer] = {}
    try:
        for name in results.servers:
            spec = specs[name]
            reason = peers.unavailable_reason(spec)
            if reason is None:
                try:
                    own = server_image(image, args.image_format, name)
                    running[name] = peers.start_server(spec, own, scratch / name)
                except peers.ServerStartError as e:
                    reason = f"failed to start: {e}"
            if reason is not None:
                results.unavailable[name] = reason
                log(f"{name}: NOT RUN: {reason}")
        results.meta["pids"] = {name: server.pid for name, server in running.items()}
        for name, server in running.items():
            results.multi_conn[name] = can_multi_conn(server.uri)
            server.start_sampling()
        run_rounds(args, results, running, scratch)
        for name, server in running.items():
            results.hwm_kib[name] = server.hwm_kib()
            results.peak_rss_kib[name] = max(server.peak_tree_rss_kib, server.tree_rss_kib())
        results.meta["loadavg_end"] = round(os.getloadavg()[0], 2)
        if args.profile:
            from bench.profile import profile_workloads

            profile_workloads(args, running, Path(args.profile))
    finally:
        for server in running.values():
            server.stop()
        image.unlink(missing_ok=True)
        for copy in image.parent.glob(image.name + ".*.qcow2"):
            copy.unlink()
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.from_json:
        saved = from_json(json.loads(Path(args.from_json).read_text()))
        print(render_text(saved))
        if args.markdown:
            Path(args.markdown).write_text(render_markdown(saved))
        return 0
    results = run(args)
    print(render_text(results))
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(results))
    if not args.no_save or args.json:
        path = Path(args.json) if args.json else RESULTS_DIR / time.strftime("%Y%m%dT%H%M%S.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_json(results), indent=2) + "\n")
        log(f"results written to {path}")
    ran = [s for s in results.servers if s not in results.unavailable]
    return (
        0
        if ran and any(results.cell(w.name, s).figures for w in results.workloads for s in ran)
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())
