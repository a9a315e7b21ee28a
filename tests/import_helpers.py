"""Running ``nbdserver import`` as a real process, for the interop tests of the importer.

Why a module: the HTTP, S3 and conversion tests all start the command, read its JSON progress
lines and its resume record, and wait for a record to show progress before killing it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "nbdserver", "import"]


def run_import(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def start_import(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def progress_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line parsed as JSON (a line that does not parse fails the test)."""
    return [json.loads(line) for line in stdout.splitlines()]


def record(dest: Path) -> dict[str, Any]:
    return dict(json.loads(Path(f"{dest}.import.json").read_text()))


def wait_for_progress(dest: Path, proc: subprocess.Popen[str], deadline: float = 60) -> int:
    """Poll DEST's resume record until it counts some bytes but not all; that count."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        try:
            state = record(dest)
        except (FileNotFoundError, ValueError):
            state = {}
        if 0 < state.get("bytesDone", 0) < state.get("size", 0):
            return int(state["bytesDone"])
        time.sleep(0.02)  # polling interval of a deadline loop, not synchronisation
    raise AssertionError(f"no partial progress in {dest}.import.json within {deadline}s")


def one_line_failure(res: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    """Exit ``status``, and stderr's last line is ``nbdserver: ...`` naming ``words``."""
    assert res.returncode == status, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserver: ") and all(w in last for w in words), res.stderr
