"""The operator's import path fed with the real importer: the import Job's exact command line
(``nbd_operator.import_job``) runs ``nbdserver import`` against the tests' HTTP origin, and its
real stdout becomes status.import through ``nbd_operator.import_progress``.

Why: the operator's control-plane tests read recorded progress lines
(tests/controlplane/data/); this keeps them honest. Every line the command prints must be one
the operator understands, the recorded lines must have the real lines' shape, and a refusal's
reason must reach status.import.message.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nbd_operator.config import OperatorConfig
from nbd_operator.import_job import import_job
from nbd_operator.import_progress import JobOutcome, import_status, last_progress
from nbd_operator.spec import parse_spec

from tests.http_origin import Origin
from tests.import_helpers import run_import

RECORDED = Path(__file__).resolve().parents[1] / "controlplane" / "data"
CONFIG = OperatorConfig(server_image="registry.example/kube-nbd:test")
SIZE = 12 * 2**20 + 512


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Origin]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "disk.img").write_bytes(os.urandom(SIZE))
    with Origin(root) as o:
        yield o


def job_args(url: str, dest: Path, **image: Any) -> list[str]:
    """The import Job's arguments with the remote and the claim's mount moved here."""
    body = {
        "metadata": {"name": "disk", "namespace": "storage", "uid": "u-1"},
        "spec": {"source": {"image": {"url": "https://images.example/disk.img", **image}},
                 "size": "1Gi"},
    }  # fmt: skip
    container = import_job(parse_spec(body), CONFIG)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["nbdserver"] and container["args"][0] == "import"
    swap = {"https://images.example/disk.img": url, "/data/disk.img": str(dest)}
    return [swap.get(a, a) for a in container["args"][1:]]


def test_a_real_import_becomes_a_succeeded_status_with_its_checksum(
    origin: Origin, tmp_path: Path
) -> None:
    digest = hashlib.sha256((tmp_path / "www" / "disk.img").read_bytes()).hexdigest()
    url = origin.url("disk.img")
    res = run_import(*job_args(url, tmp_path / "disk.img", sha256=digest))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines, res.stderr
    for line in lines:  # every line is one the operator reads, a running status on its own
        progress = last_progress(line)
        assert progress is not None, line
        running = import_status(JobOutcome("Running", attempts=1), progress)
        assert running["phase"] in ("Downloading", "Converting", "Verifying"), running
    status = import_status(JobOutcome("Succeeded", attempts=1), last_progress(res.stdout))
    assert status == {
        "phase": "Succeeded",
        "bytes": SIZE,
        "totalBytes": SIZE,
        "percent": 100,
        "attempts": 1,
        "sha256": digest,
        "message": f"imported {SIZE} bytes from {url}",
    }


def test_a_refused_import_puts_the_importers_reason_in_status(
    origin: Origin, tmp_path: Path
) -> None:
    res = run_import(*job_args(origin.url("missing.img"), tmp_path / "disk.img"))
    assert res.returncode == 2, res.stderr  # the Job's podFailurePolicy fails it at once
    outcome = JobOutcome("Failed", "PodFailurePolicy", "Container importer exited 2", 1)
    status = import_status(outcome, last_progress(res.stdout))
    assert status["phase"] == "Failed"
    assert "404" in status["message"], status


def test_the_recorded_lines_have_the_real_lines_shape(origin: Origin, tmp_path: Path) -> None:
    ok = run_import(*job_args(origin.url("disk.img"), tmp_path / "a.img"))
    refused = run_import(*job_args(origin.url("missing.img"), tmp_path / "b.img"))
    real = [json.loads(line) for line in (ok.stdout + refused.stdout).splitlines()]
    shapes = {line["phase"]: set(line) for line in real}
    assert {"downloading", "done", "failed"} <= set(shapes), shapes
    for path in sorted(RECORDED.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            recorded = json.loads(line)
            assert set(recorded) == shapes[recorded["phase"]], (path.name, recorded)
