"""The fio workloads of the bench and the reading of fio's JSON output.

Why: every server must see exactly the same fio job, and the figure we keep from fio's output
(MB/s for large blocks, IOPS for small ones) must be read the same way each time, including the
multi-connection job where fio runs 4 jobs, each with its own NBD connection.

What it must not do: start or stop servers (peers.py) or aggregate rounds (report.py). It
refuses a fio result that reports an error rather than turning it into a low figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class FioError(RuntimeError):
    """fio failed or reported an I/O error for a job."""


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio's rw= (read, write, randread, randwrite)
    bs: str
    iodepth: int
    numjobs: int = 1
    # The figure the table shows: "MB/s" (10**6 bytes per second) or "IOPS".
    metric: str = "MB/s"
    description: str = ""

    @property
    def direction(self) -> str:
        return "write" if "write" in self.rw else "read"


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-read", "read", "1M", 8, description="sequential read 1 MiB, depth 8"),
    Workload("seq-write", "write", "1M", 8, description="sequential write 1 MiB, depth 8"),
    Workload(
        "rand-read", "randread", "4k", 32, metric="IOPS", description="random read 4 KiB, depth 32"
    ),
    Workload(
        "rand-write",
        "randwrite",
        "4k",
        32,
        metric="IOPS",
        description="random write 4 KiB, depth 32",
    ),
    Workload(
        "rand-read-qd1",
        "randread",
        "4k",
        1,
        metric="IOPS",
        description="random read 4 KiB, depth 1",
    ),
    Workload(
        "multiconn-read",
        "read",
        "1M",
        8,
        numjobs=4,
        description="sequential read 1 MiB, depth 8, 4 connections (fio numjobs=4)",
    ),
)

WORKLOADS_BY_NAME = {w.name: w for w in WORKLOADS}


def fio_command(
    workload: Workload,
    uri: str,
    runtime: float,
    image_size: int,
    output: str,
    ramp_time: float = 1.0,
    fio: str = "fio",
) -> list[str]:
    """The fio command line for workload against uri, writing JSON to output."""
    # fio's nbd engine opens one libnbd connection per job (in the job's init), so numjobs=4
    # means 4 connections. Each job reads its own quarter of the image, so the connections do
    # not all fetch the same pages.
    per_job = image_size // workload.numjobs
    cmd = [
        fio,
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--numjobs={workload.numjobs}",
        f"--size={per_job}",
        "--time_based",
        f"--runtime={_seconds(runtime)}",
        "--norandommap",
        "--group_reporting",
        "--output-format=json",
        f"--output={output}",
    ]
    if ramp_time > 0:
        cmd.append(f"--ramp_time={_seconds(ramp_time)}")
    if workload.numjobs > 1:
        cmd.append(f"--offset_increment={per_job}")
    return cmd


def _seconds(value: float) -> str:
    # fio takes plain integers as seconds; fractions need an explicit unit.
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}ms"


@dataclass(frozen=True)
class FioResult:
    bw_bytes: float  # bytes per second, summed over jobs
    iops: float
    mean_lat_us: float  # completion latency, mean over jobs
    total_ios: int = 0

    def figure(self, workload: Workload) -> float:
        """The number the table shows for this workload."""
        if workload.metric == "IOPS":
            return self.iops
        return self.bw_bytes / 1e6


def parse_fio_json(text: str, workload: Workload) -> FioResult:
    """Read fio's JSON output (text may carry log lines before the JSON object)."""
    start = text.find("{")
    if start < 0:
        raise FioError("fio wrote no JSON")
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        raise FioError(f"fio wrote unreadable JSON: {e}") from e
    return result_from_fio(data, workload)


def result_from_fio(data: dict[str, Any], workload: Workload) -> FioResult:
    jobs = data.get("jobs") or []
    if not jobs:
        raise FioError("fio reported no jobs")
    bw = iops = lat_weighted = 0.0
    total_ios = 0
    for job in jobs:
        if job.get("error"):
            raise FioError(f"fio job {job.get('jobname')} failed with error {job['error']}")
        stats = job[workload.direction]
        if stats.get("total_ios", 0) == 0 and stats.get("io_bytes", 0) == 0:
            raise FioError(f"fio job {job.get('jobname')} did no {workload.direction} I/O")
        bw += float(stats["bw_bytes"])
        total_ios += int(stats.get("total_ios", 0))
        iops += float(stats["iops"])
        lat_weighted += float(stats.get("clat_ns", {}).get("mean", 0.0)) * float(stats["iops"])
    mean_lat_us = lat_weighted / iops / 1000 if iops else 0.0
    return FioResult(bw_bytes=bw, iops=iops, mean_lat_us=mean_lat_us, total_ios=total_ios)
