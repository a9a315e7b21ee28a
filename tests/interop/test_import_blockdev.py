"""``nbdserver import`` into a block device (a loop device over a file filled with 0xff): the
old bytes are overwritten, zero extents included, the resume record lives in --work-dir."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.import_helpers import one_line_failure, run_import
from tests.loopdev import loop_device

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
SIZE = 20 * 1024 * 1024


def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(3 * 1024 * 1024)
        f.write(os.urandom(1024 * 1024))
    return path


def compare(a: str, b: Path, fmt_b: str) -> None:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", fmt_b, a, str(b)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("output", ["same", "raw"])
def test_an_image_is_imported_over_old_data_on_a_block_device(tmp_path: Path, output: str) -> None:
    image = disk(tmp_path)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                   check=True)  # fmt: skip
    source, fmt = (image, "raw") if output == "same" else (qcow2, "qcow2")
    work = tmp_path / "work"
    work.mkdir()
    with loop_device(tmp_path / "backing", SIZE) as dev:
        with open(dev, "wb") as f:
            f.write(b"\xff" * SIZE)
        res = run_import(str(source), dev, "--format", fmt, "--output-format", output,
                         "--work-dir", str(work))  # fmt: skip
        assert res.returncode == 0, res.stderr
        compare(dev, source, fmt)
        record = work / f"{os.path.basename(dev)}.import.json"
        assert '"complete": true' in record.read_text()
        again = run_import(str(source), dev, "--format", fmt, "--output-format", output,
                           "--work-dir", str(work))  # fmt: skip
        assert again.returncode == 0 and "already imported" in again.stderr, again.stderr


def test_a_block_device_without_a_work_dir_is_refused(tmp_path: Path) -> None:
    image = disk(tmp_path)
    with loop_device(tmp_path / "backing", SIZE) as dev:
        one_line_failure(run_import(str(image), dev), 2, "--work-dir")
