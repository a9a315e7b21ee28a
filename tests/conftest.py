"""Suite-wide reporting: a count per tier, the kernel that ran, and no silent skips in CI.

The tiers are the folders under tests/ (docs in shared DESIGN.md, section 4). At the end of a run
a table gives passed, failed and skipped per tier, and the kernel tier's line names the
user-mode-linux kernel it booted. Under CI (``CI`` set, as ``.ci/run`` has it), a skipped kernel,
interop or image test fails the run: there every tool those tiers need is installed, so a skip there
means a test that did not run, not one that cannot.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

TIERS = ("unit", "interop", "kernel", "controlplane", "image", "e2e")
MUST_NOT_SKIP = ("kernel", "interop", "image")
TESTS = Path(__file__).resolve().parent

_counts: Counter[tuple[str, str]] = Counter()
_skipped: dict[str, list[str]] = {tier: [] for tier in MUST_NOT_SKIP}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _tier(report: pytest.TestReport | pytest.CollectReport) -> str:
    parts = Path(report.fspath).resolve().relative_to(TESTS).parts
    return parts[0] if len(parts) > 1 else "other"


def _record(report: pytest.TestReport | pytest.CollectReport, outcome: str) -> None:
    tier = _tier(report)
    _counts[tier, outcome] += 1
    if outcome == "skipped" and tier in _skipped:
        _skipped[tier].append(report.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # A test counts once: by its call, or by its setup where that did not pass (a skip or an
    # error there means no call); a failed teardown counts as a failure on top.
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _record(report, report.outcome)
    elif report.when == "teardown" and report.failed:
        _record(report, "failed")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    # A module skipped as a whole (pytest.skip(allow_module_level=True)) reports here only.
    if report.skipped and report.fspath:
        _record(report, "skipped")


def _kernel_line() -> str | None:
    kernels = sys.modules.get("tests.kernel.kernels")
    if kernels is None or not kernels.probed():
        return None  # no kernel test booted a guest in this process
    try:
        return f"kernel tier ran {kernels.selected_kernel().describe()}"
    except kernels.NoBootableKernel as exc:  # each kernel test failed with the whole reason
        return f"kernel tier: {str(exc).splitlines()[0]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    tiers = [t for t in (*TIERS, "other") if any(_counts[t, o] for o in _OUTCOMES)]
    if not tiers:
        return
    write = terminalreporter.write_line
    terminalreporter.section("tests per tier")
    for tier in tiers:
        write(f"{tier:<13}" + "  ".join(f"{_counts[tier, o]:4d} {o}" for o in _OUTCOMES))
    line = _kernel_line()
    if line:
        write(line)
    for tier, nodeids in _skipped.items():
        if nodeids:
            how = "fails the run under CI" if _in_ci() else "would fail the run under CI"
            write(f"{len(nodeids)} {tier} test(s) skipped ({how}): " + ", ".join(nodeids[:5]))


_OUTCOMES = ("passed", "failed", "skipped")


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _in_ci() and any(_skipped.values()) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
