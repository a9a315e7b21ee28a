"""The codebase stays ruff-clean, mypy-clean and inside its import layering, in CI too.

These run the real tools on the real tree, so a lint regression fails the suite instead of
waiting for someone to remember ``make lint``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = ["nbdserver", "agent/nbd_agent", "operator/nbd_operator", "api/nbd_api"]
SOURCES = [*PACKAGES, "bench", "tests", "scripts"]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_no_lint_errors() -> None:
    res = run(str(BIN / "ruff"), "check", *SOURCES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_format_leaves_every_file_as_it_is() -> None:
    res = run(str(BIN / "ruff"), "format", "--check", *SOURCES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_finds_no_type_errors() -> None:
    res = run(str(BIN / "mypy"), *PACKAGES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_import_layering_contracts_hold() -> None:
    res = run(str(BIN / "lint-imports"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout
