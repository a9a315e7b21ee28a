"""Making qcow2 images with qemu-img and qemu-io (the oracle) for the qcow2 tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SIZE = 8 << 20
needs_qemu = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")), reason="qemu-utils not installed"
)


def run(*cmd: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode in ok, f"{cmd}: {res.returncode}\n{res.stdout}{res.stderr}"
    return res


def qemu_io(image: Path | str, fmt: str, *commands: str) -> None:
    args = [a for c in commands for a in ("-c", c)]
    run("qemu-io", "-f", fmt, *args, str(image))


def raw_with_data(path: Path, size: int = SIZE) -> Path:
    """A raw image with patterned data, a zeroed run and holes."""
    run("qemu-img", "create", "-q", "-f", "raw", str(path), str(size))
    qemu_io(
        path,
        "raw",
        "write -P 0x11 0 1M",
        "write -P 0x22 1536k 700k",
        f"write -P 0x33 {size - 65536} 65536",
    )
    return path


def qcow2(path: Path, *options: str, backing: Path | None = None, backing_fmt: str = "raw",
          size: int | None = SIZE) -> Path:  # fmt: skip
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    for opt in options:
        cmd += ["-o", opt]
    if backing is not None:
        cmd += ["-b", backing.name, "-F", backing_fmt]
    cmd.append(str(path))
    if size is not None:
        cmd.append(str(size))
    run(*cmd)
    return path


def check_clean(image: Path) -> None:
    res = run("qemu-img", "check", "-f", "qcow2", str(image), ok=(0, 1, 2, 3))
    assert res.returncode == 0, res.stdout + res.stderr


def compare(a: str, a_fmt: str, b: str, b_fmt: str) -> subprocess.CompletedProcess[str]:
    return run("qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, a, b, ok=(0, 1, 2))
