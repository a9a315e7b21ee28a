"""Turn per-round bench figures into medians, ratios and tables (plain text, Markdown, JSON).

Why: the only fair comparison on a shared, noisy machine is within one run: each server's median
over rounds, and the ratio nbdserver/peer per workload. Keeping this arithmetic pure (no fio, no
processes) lets the unit tests check it exactly.

What it must not do: run anything, or drop a server silently: a server that could not run, or a
workload that failed on it, shows as "n/a" with its reason in the notes.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.workloads import Workload

SUBJECT = "nbdserver"
RSS_TARGET_KIB = 80 * 1024
CPU_TITLE = "server CPU (median, 100% = one core) and spread of its figures ((max-min)/median):"
# What a Markdown export states about its run, so a pasted table keeps its context.
META_FACTS = ("date", "commit", "nbdserver_commit", "nbdserver_uncommitted", "rounds", "runtime",
              "image_size", "cpus", "loadavg_start", "loadavg_rounds", "loadavg_end")  # fmt: skip


@dataclass
class Cell:
    """All rounds of one workload on one server."""

    figures: list[float] = field(default_factory=list)
    cpu_percent: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.figures) if self.figures else None

    @property
    def spread_percent(self) -> float | None:
        """(max - min) / median over rounds: how much to trust the median on a noisy machine."""
        m = self.median
        if not m or len(self.figures) < 2:
            return None
        return 100.0 * (max(self.figures) - min(self.figures)) / m

    @property
    def cpu_median(self) -> float | None:
        return statistics.median(self.cpu_percent) if self.cpu_percent else None


@dataclass
class BenchResults:
    servers: list[str]
    workloads: list[Workload]
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # server -> reason
    multi_conn: dict[str, bool | None] = field(default_factory=dict)
    peak_rss_kib: dict[str, int] = field(default_factory=dict)  # sampled, whole process tree
    hwm_kib: dict[str, int] = field(default_factory=dict)  # VmHWM of the main process
    meta: dict[str, Any] = field(default_factory=dict)

    def cell(self, workload: str, server: str) -> Cell:
        return self.cells.setdefault((workload, server), Cell())

    def ratio(self, workload: str, peer: str) -> float | None:
        """nbdserver's median divided by peer's (above 1.0: nbdserver is faster)."""
        ours = self.cell(workload, SUBJECT).median
        theirs = self.cell(workload, peer).median
        if ours is None or not theirs:
            return None
        return ours / theirs

    @property
    def peers(self) -> list[str]:
        return [s for s in self.servers if s != SUBJECT]


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def rows(results: BenchResults) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: medians per server, then ratios."""
    has_subject = SUBJECT in results.servers
    header = ["workload", "unit", *results.servers]
    if has_subject:
        header += [f"{SUBJECT}/{p}" for p in results.peers]
    body = []
    for w in results.workloads:
        digits = 0 if w.metric == "IOPS" else 1
        row = [w.name, w.metric]
        row += [_num(results.cell(w.name, s).median, digits) for s in results.servers]
        if has_subject:
            row += [_ratio(results.ratio(w.name, p)) for p in results.peers]
        body.append(row)
    return header, body


def cpu_rows(results: BenchResults) -> tuple[list[str], list[list[str]]]:
    """Per server: median CPU during the jobs, and the spread of its figures over rounds."""
    header = ["workload"]
    for s in results.servers:
        header += [f"{s} cpu%", f"{s} spread%"]
    body = []
    for w in results.workloads:
        row = [w.name]
        for s in results.servers:
            cell = results.cell(w.name, s)
            row += [_num(cell.cpu_median), _num(cell.spread_percent)]
        body.append(row)
    return header, body


def notes(results: BenchResults) -> list[str]:
    out = []
    for server, reason in results.unavailable.items():
        out.append(f"{server} did not run: {reason}")
    for (workload, server), cell in sorted(results.cells.items()):
        for err in sorted(set(cell.errors)):
            out.append(f"{server} {workload}: {err}")
    for server, flag in results.multi_conn.items():
        if flag is False:
            out.append(f"{server} does not advertise NBD_FLAG_CAN_MULTI_CONN")
    if SUBJECT in results.peak_rss_kib or SUBJECT in results.hwm_kib:
        out.append(
            f"{SUBJECT} peak RSS: {_mib(results.hwm_kib.get(SUBJECT))} VmHWM of the main process, "
            f"{_mib(results.peak_rss_kib.get(SUBJECT))} sampled over its process tree"
        )
    others = [
        f"{s} {_mib(results.peak_rss_kib.get(s))}"
        for s in results.peers
        if s in results.peak_rss_kib
    ]
    if others:
        out.append("peers' sampled peak RSS: " + ", ".join(others))
    out += target_notes(results)
    return out


def target_notes(results: BenchResults) -> list[str]:
    """Issue 8's targets: >= 1.0x qemu-nbd (floor), >= 1.0x nbdkit (goal), peak RSS <= 80 MiB."""
    out = []
    for peer, label in (("qemu-nbd", "floor"), ("nbdkit", "goal")):
        if peer not in results.servers or SUBJECT not in results.servers:
            continue
        ratios = {w.name: results.ratio(w.name, peer) for w in results.workloads}
        short = [f"{n} {r:.2f}x" for n, r in ratios.items() if r is not None and r < 1.0]
        measured = sum(r is not None for r in ratios.values())
        verdict = "below on " + ", ".join(short) if short else "met"
        out.append(f"target {label} (>= 1.0x {peer}): {verdict} ({measured} workloads measured)")
    peak = max(results.hwm_kib.get(SUBJECT, 0), results.peak_rss_kib.get(SUBJECT, 0))
    if peak:
        verdict = "met" if peak <= RSS_TARGET_KIB else "missed"
        out.append(f"target peak RSS <= {RSS_TARGET_KIB // 1024} MiB: {verdict} ({_mib(peak)})")
    return out


def _mib(kib: int | None) -> str:
    return "n/a" if not kib else f"{kib / 1024:.1f} MiB"


def plain_table(header: list[str], body: list[list[str]], text_columns: int = 2) -> str:
    """Columns padded with spaces; the first text_columns left-aligned, numbers right-aligned."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i < text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], body: list[list[str]], text_columns: int = 2) -> str:
    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *body])


def render_text(results: BenchResults) -> str:
    parts = [plain_table(*rows(results)), "", CPU_TITLE,
             plain_table(*cpu_rows(results), text_columns=1)]  # fmt: skip
    n = notes(results)
    if n:
        parts += ["", *(f"- {line}" for line in n)]
    return "\n".join(parts)


def render_markdown(results: BenchResults) -> str:
    meta = results.meta
    parts = []
    if meta.get("command"):
        parts.append(f"Command: `{meta['command']}`")
    facts = [f"{k}: {meta[k]}" for k in META_FACTS if k in meta]
    if facts:
        parts.append("; ".join(facts))
    parts += [
        "",
        markdown_table(*rows(results)),
        "",
        CPU_TITLE,
        "",
        markdown_table(*cpu_rows(results), text_columns=1),
    ]
    n = notes(results)
    if n:
        parts += ["", *(f"- {line}" for line in n)]
    return "\n".join(parts) + "\n"


def to_json(results: BenchResults) -> dict[str, Any]:
    cells: dict[str, dict[str, Any]] = {}
    for w in results.workloads:
        cells[w.name] = {"metric": w.metric, "servers": {}}
        for s in results.servers:
            c = results.cell(w.name, s)
            cells[w.name]["servers"][s] = {
                "figures": c.figures,
                "median": c.median,
                "cpu_percent": c.cpu_percent,
                "errors": c.errors,
            }
        cells[w.name]["ratios"] = {p: results.ratio(w.name, p) for p in results.peers}
    return {
        "meta": results.meta,
        "servers": results.servers,
        "unavailable": results.unavailable,
        "multi_conn": results.multi_conn,
        "peak_rss_kib": results.peak_rss_kib,
        "hwm_kib": results.hwm_kib,
        "workloads": cells,
    }


def from_json(data: dict[str, Any]) -> BenchResults:
    """The inverse of to_json, to re-render a saved run (python -m bench --from-json FILE)."""
    from bench.workloads import WORKLOADS_BY_NAME

    results = BenchResults(
        servers=list(data["servers"]),
        workloads=[WORKLOADS_BY_NAME[name] for name in data["workloads"]],
        unavailable=dict(data.get("unavailable", {})),
        multi_conn=dict(data.get("multi_conn", {})),
        peak_rss_kib=dict(data.get("peak_rss_kib", {})),
        hwm_kib=dict(data.get("hwm_kib", {})),
        meta=dict(data.get("meta", {})),
    )
    for name, entry in data["workloads"].items():
        for server, c in entry["servers"].items():
            cell = results.cell(name, server)
            cell.figures = list(c["figures"])
            cell.cpu_percent = list(c["cpu_percent"])
            cell.errors = list(c["errors"])
    return results
