"""The suite's closing report (tests/conftest.py): a count per tier, and under CI a skipped
kernel or interop test fails the run, while a skipped e2e test (no cluster) does not.

Runs pytest on a small throwaway tree that carries the real conftest, so the hooks are the ones
every run uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _tree(tmp_path: Path, skipped_tier: str) -> Path:
    tests = tmp_path / "tests"
    for tier, body in {
        "unit": "def test_ok():\n    assert True\n",
        skipped_tier: "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('no tool')\n",
    }.items():
        (tests / tier).mkdir(parents=True)
        (tests / tier / f"test_{tier}.py").write_text(body)
    shutil.copy(CONFTEST, tests / "conftest.py")
    return tests


def _run(tests: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", str(tests), "-p", "no:cacheprovider", "-q"],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("tier", ["kernel", "interop"])
def test_a_skipped_kernel_or_interop_test_fails_the_run_under_ci(tmp_path: Path, tier: str):
    tests = _tree(tmp_path, tier)
    ci = _run(tests, "true")
    assert ci.returncode == 1, ci.stdout
    assert f"1 {tier} test(s) skipped (fails the run under CI)" in ci.stdout
    local = _run(tests, None)
    assert local.returncode == 0, local.stdout
    assert "would fail the run under CI" in local.stdout


def test_the_report_counts_each_tier_and_an_e2e_skip_passes_under_ci(tmp_path: Path):
    done = _run(_tree(tmp_path, "e2e"), "true")
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert any(line.split()[:3] == ["unit", "1", "passed"] for line in lines), done.stdout
    e2e = next(line for line in lines if line.startswith("e2e "))
    assert e2e.split() == ["e2e", "0", "passed", "0", "failed", "1", "skipped"]
