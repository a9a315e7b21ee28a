"""A real block device for tests: a loop device over a sparse file, detached afterwards.

Needs root and /dev/loop-control (the team's machines and CI have both); elsewhere the test is
skipped with the reason, since a block device truly cannot be created there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def loop_device(backing: Path, size: int) -> Iterator[str]:
    """Create ``backing`` sparse with ``size`` bytes and attach it; yields ``/dev/loopN``."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or not shutil.which("losetup"):
        pytest.skip("needs root and loop devices to create a block device")
    with open(backing, "wb") as f:
        f.truncate(size)
    res = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"losetup cannot attach here: {res.stderr.strip()}")
    dev = res.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
