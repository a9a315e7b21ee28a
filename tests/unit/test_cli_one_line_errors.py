"""Every bad flag or environment problem is one line naming the flag, exit status 2, and no
traceback (issue 12, defect 5)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--backend", "memory", "--size", "1M",
           "--bind", "127.0.0.1", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=30)


def _assert_one_line_error(res: subprocess.CompletedProcess[str], flag: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("nbdserver: ") and flag in last, res.stderr


def test_metrics_port_equal_to_the_nbd_port_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _serve("--port", str(port), "--metrics-port", str(port))
    _assert_one_line_error(res, "--metrics-port")


def test_metrics_port_out_of_range_is_one_line() -> None:
    _assert_one_line_error(_serve("--port", "0", "--metrics-port", "99999"), "--metrics-port")


def test_metrics_port_already_taken_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = _serve("--port", "0", "--metrics-port", str(s.getsockname()[1]))
    _assert_one_line_error(res, "--metrics-port")


def test_a_missing_cow_dir_is_one_line(tmp_path: Path) -> None:
    res = _serve("--port", "0", "--copy-on-write", "--cow-dir", str(tmp_path / "nope"))
    _assert_one_line_error(res, "--cow-dir")


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--port", "0", "--workers", "0"], "--workers"),
     (["--port", "0", "--idle-timeout", "nan"], "--idle-timeout"),
     (["--port", "0", "--unix", "/nonexistent-dir/x.sock"], "--unix")],
)  # fmt: skip
def test_other_bad_values_are_one_line(args: list[str], flag: str) -> None:
    _assert_one_line_error(_serve(*args), flag)


@pytest.mark.parametrize(
    ("args", "flag"),
    [(["--port", "abc"], "--port"), (["--backend", "tape"], "--backend"),
     (["--copy-on-write=forever"], "--copy-on-write")],
)  # fmt: skip
def test_flags_argparse_refuses_are_one_line_too(args: list[str], flag: str) -> None:
    res = _serve(*args)
    _assert_one_line_error(res, flag)
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # no usage block
