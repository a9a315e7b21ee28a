"""``nbdserver import`` from the tests' HTTP origin, as a real process: the result is the
source (``qemu-img compare``), a SIGKILLed import resumes with a Range from where it stopped,
checksums and refusals keep DEST from being marked complete, progress lines parse."""

from __future__ import annotations

import hashlib
import os
import pty
import shutil
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.http_origin import Origin, holey_image
from tests.import_helpers import (
    COMMAND,
    REPO,
    one_line_failure,
    progress_lines,
    record,
    run_import,
    start_import,
    wait_for_progress,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
MIB = 1024 * 1024
SIZE = 48 * MIB + 4096  # six 8 MiB requests and a short one


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    path = root / "disk.img"
    holey_image(path, SIZE, 64 * 1024)
    return path


@pytest.fixture
def origin(image: Path) -> Iterator[Origin]:
    with Origin(image.parent, slow=10.0) as o:
        yield o


def compare(a: Path, b: Path, fmt_b: str = "raw") -> None:
    cmd = ["qemu-img", "compare", "-f", "raw", "-F", fmt_b, str(a), str(b)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def killed_midway(origin: Origin, dest: Path, *args: str) -> int:
    """Start an import from a slowed origin, SIGKILL it once its record counts some bytes (not
    all), give the origin its speed back; the bytes the record counted."""
    origin.delay = 0.6  # slow enough to be killed half-way
    proc = start_import(origin.url("disk.img"), str(dest), *args)
    try:
        done = wait_for_progress(dest, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    origin.delay = 0.0
    return done


def test_an_http_image_is_imported_with_json_progress_ending_in_done(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    res = run_import(origin.url("disk.img"), str(dest), "--progress", "json")
    assert res.returncode == 0, res.stderr
    compare(dest, image)
    lines = progress_lines(res.stdout)
    assert {"phase", "bytes", "totalBytes", "rateBytesPerSecond", "message"} <= set(lines[0])
    assert lines[0]["phase"] == "downloading" and lines[-1]["phase"] == "done"
    assert lines[-1]["bytes"] == lines[-1]["totalBytes"] == SIZE
    assert lines[-1]["sha256"] == sha256(image)
    assert record(dest)["complete"] is True
    assert os.stat(dest).st_blocks * 512 < SIZE // 2  # the holes stayed holes


def test_a_rerun_after_success_is_a_no_op_that_asks_the_origin_nothing(
    origin: Origin, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    assert run_import(origin.url("disk.img"), str(dest)).returncode == 0
    asked = len(origin.requests)
    res = run_import(origin.url("disk.img"), str(dest), "--progress", "json")
    assert res.returncode == 0, res.stderr
    assert progress_lines(res.stdout)[-1]["message"] == "already imported"
    assert len(origin.requests) == asked
    dest.unlink()  # DEST gone, its record left behind: imported again, not "already"
    again = run_import(origin.url("disk.img"), str(dest))
    assert again.returncode == 0 and "importing again" in again.stderr, again.stderr
    assert dest.stat().st_size == SIZE


def test_a_killed_import_resumes_with_a_range_from_where_it_stopped(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    done = killed_midway(origin, dest, "--sha256", sha256(image))
    first_run = len(origin.requests)
    res = run_import(origin.url("disk.img"), str(dest), "--sha256", sha256(image))
    assert res.returncode == 0, res.stderr
    ranges = [rng for _, rng in origin.requests[first_run:]]
    assert f"bytes={done}-{done + 8 * MIB - 1}" in ranges, ranges
    starts = [int(rng[6:].split("-")[0]) for rng in ranges]
    assert not [s for s in starts if 0 < s < done], ranges  # nothing fetched twice but the head
    assert "resuming at byte" in res.stderr
    compare(dest, image)


def test_a_source_changed_between_attempts_is_imported_again_from_the_start(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    killed_midway(origin, dest)
    image.write_bytes(image.read_bytes()[::-1])  # a new object: new ETag and mtime
    res = run_import(origin.url("disk.img"), str(dest))
    assert res.returncode == 0, res.stderr
    assert "the source changed since the last attempt: starting over" in res.stderr
    compare(dest, image)


def test_a_sha256_mismatch_fails_and_does_not_mark_dest_complete(
    origin: Origin, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    res = run_import(origin.url("disk.img"), str(dest), "--sha256", "0" * 64,
                     "--progress", "json")  # fmt: skip
    one_line_failure(res, 1, "sha256", "0" * 64)
    assert progress_lines(res.stdout)[-1]["phase"] == "failed"
    state = record(dest)
    assert state["complete"] is False and state["bytesDone"] == 0
    again = run_import(origin.url("disk.img"), str(dest), "--sha256", "0" * 64)
    one_line_failure(again, 1, "sha256")  # not "already imported"


@pytest.mark.parametrize("status", [403, 404])
def test_a_403_or_404_is_exit_2_with_one_line_and_no_dest(
    origin: Origin, tmp_path: Path, status: int
) -> None:
    origin.status["disk.img"] = status
    dest = tmp_path / "out.img"
    one_line_failure(run_import(origin.url("disk.img"), str(dest)), 2, f"HTTP {status}")
    assert not dest.exists()


def test_injected_503s_resets_and_slowness_are_retried(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    origin.slow = 1.0  # answered late, but within the deadline
    origin.fail(3, "503")
    origin.fail(2, "reset")
    origin.fail(1, "slow")
    dest = tmp_path / "out.img"
    res = run_import(origin.url("disk.img"), str(dest), "--remote-timeout", "10")
    assert res.returncode == 0, res.stderr
    compare(dest, image)


def test_a_store_that_keeps_failing_is_exit_1_with_one_line(origin: Origin, tmp_path: Path) -> None:
    origin.fail(100000, "503")
    dest = tmp_path / "out.img"
    res = run_import(origin.url("disk.img"), str(dest), "--remote-timeout", "1")
    one_line_failure(res, 1, "HTTP 503")


def test_a_qcow2_header_in_a_raw_import_is_refused_before_anything_is_written(
    image: Path, tmp_path: Path
) -> None:
    qcow2 = image.parent / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    with Origin(image.parent) as o:
        dest = tmp_path / "out.img"
        one_line_failure(run_import(o.url("disk.qcow2"), str(dest)), 2, "qcow2", "--format")
        assert not dest.exists()
        raw = tmp_path / "raw.img"
        res = run_import(o.url("disk.img"), str(raw), "--format", "qcow2")
        one_line_failure(res, 2, "not a qcow2 image")


def test_a_qcow2_imported_as_raw_is_its_virtual_disk(image: Path, tmp_path: Path) -> None:
    qcow2 = image.parent / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(image), str(qcow2)],
                   check=True)  # fmt: skip
    with Origin(image.parent) as o:
        dest = tmp_path / "out.img"
        res = run_import(o.url("disk.qcow2"), str(dest), "--format", "qcow2",
                         "--output-format", "raw", "--sha256", sha256(qcow2),
                         "--progress", "json")  # fmt: skip
        assert res.returncode == 0, res.stderr
        compare(dest, qcow2, fmt_b="qcow2")
        phases = [line["phase"] for line in progress_lines(res.stdout)]
        assert phases.index("verifying") < phases.index("converting") < phases.index("done")
        assert not (tmp_path / "out.img.download").exists()  # the staged copy is gone
        same = tmp_path / "same.qcow2"
        res = run_import(o.url("disk.qcow2"), str(same), "--format", "qcow2")
        assert res.returncode == 0, res.stderr
        assert same.read_bytes() == qcow2.read_bytes()


def test_an_existing_file_without_an_import_record_is_left_alone(
    origin: Origin, tmp_path: Path
) -> None:
    dest = tmp_path / "precious.img"
    dest.write_bytes(b"data")
    one_line_failure(run_import(origin.url("disk.img"), str(dest)), 2, "exists")
    assert dest.read_bytes() == b"data"


def test_bad_usage_is_exit_2_with_one_line(origin: Origin, tmp_path: Path) -> None:
    dest = tmp_path / "out.img"
    one_line_failure(
        run_import(origin.url("disk.img"), str(dest), "--sha256", "xyz"), 2, "--sha256"
    )
    one_line_failure(
        run_import(origin.url("disk.img"), str(dest), "--format", "nope"), 2, "--format"
    )


def test_a_dest_cut_short_between_attempts_is_imported_again_from_the_start(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    killed_midway(origin, dest)
    os.truncate(dest, 0)  # what was written is gone: the record must not be trusted
    res = run_import(origin.url("disk.img"), str(dest))
    assert res.returncode == 0, res.stderr
    assert "lost what was written: starting over" in res.stderr
    compare(dest, image)


def test_refusals_of_where_things_are_are_one_line(origin: Origin, tmp_path: Path) -> None:
    one_line_failure(run_import(str(tmp_path), str(tmp_path / "o.img")), 2, "not a regular file")
    missing = tmp_path / "nowhere" / "o.img"
    one_line_failure(run_import(origin.url("disk.img"), str(missing)), 2, "does not exist")
    one_line_failure(run_import(str(tmp_path / "none.img"), str(tmp_path / "o.img")), 2, "none.img")


def test_sigterm_ends_with_a_failed_line_and_a_rerun_resumes(
    origin: Origin, image: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "out.img"
    origin.delay = 0.6
    proc = start_import(origin.url("disk.img"), str(dest), "--progress", "json")
    try:
        done = wait_for_progress(dest, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    last = progress_lines(out)[-1]
    assert last["phase"] == "failed" and "interrupted by SIGTERM" in last["message"], last
    assert err.strip().splitlines()[-1].startswith("nbdserver: interrupted by SIGTERM"), err
    origin.delay = 0.0
    res = run_import(origin.url("disk.img"), str(dest))
    assert res.returncode == 0 and "resuming at byte" in res.stderr, res.stderr
    assert record(dest)["complete"] is True and done > 0
    compare(dest, image)


def test_the_progress_bar_is_drawn_on_a_terminal(origin: Origin, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([*COMMAND, origin.url("disk.img"), str(tmp_path / "o.img"),
                                 "--progress"], stderr=follower, cwd=REPO)  # fmt: skip
        os.close(follower)
        follower = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        assert proc.wait(60) == 0, drawn
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert b"\r[" in drawn and b"100.0%" in drawn and b"done" in drawn, drawn


def test_vmdk_and_xz_sources_imported_as_raw_are_their_disks(image: Path, tmp_path: Path) -> None:
    vmdk = image.parent / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(image), str(vmdk)],
                   check=True)  # fmt: skip
    subprocess.run(["xz", "-k", "-0", "-T1", "--block-size=4MiB", str(image)], check=True)
    with Origin(image.parent) as o:
        for name, fmt in (("disk.vmdk", "vmdk"), ("disk.img.xz", "xz")):
            dest = tmp_path / f"{fmt}.img"
            res = run_import(o.url(name), str(dest), "--format", fmt, "--output-format", "raw")
            assert res.returncode == 0, res.stderr
            compare(dest, image)


def test_an_https_source_is_imported_when_the_ca_bundle_vouches_for_it(
    image: Path, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with Origin(image.parent, tls=ctx) as o:
        url = o.url("disk.img", host="localhost")
        one_line_failure(run_import(url, str(tmp_path / "a.img")), 2, "certificate")
        dest = tmp_path / "b.img"
        res = run_import(url, str(dest), "--ca-bundle", str(bundle))
        assert res.returncode == 0, res.stderr
        compare(dest, image)
