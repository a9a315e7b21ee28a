"""status.import from the importer's progress lines and its Job (pure), and the API
substitute's pods/log as the operator reads it (404 for no pod, 400 before the container
starts, tailLines honoured)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nbd_operator.import_progress import (
    JobOutcome,
    current_pod,
    describe,
    import_status,
    job_outcome,
    last_progress,
)
from nbd_operator.kube import KubeError, NotFound
from operator_harness import NS, api_server

DATA = Path(__file__).parent / "data"
GiB = 2**30


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def test_the_last_complete_line_wins_and_a_cut_line_is_skipped() -> None:
    recorded = lines("import-progress.jsonl")
    log = "\n".join(recorded[:2]) + '\n{"phase": "downloading", "bytes": 3'
    assert last_progress(log) == {
        "phase": "downloading",
        "bytes": 256 * 2**20,
        "totalBytes": GiB,
        "rateBytesPerSecond": 50 * 2**20,
        "message": "",
    }
    assert last_progress("") is None
    assert last_progress("Traceback (most recent call last):\n") is None
    assert last_progress('{"phase": "unheard-of"}') is None


def test_progress_becomes_status_with_a_percentage() -> None:
    status = import_status(
        JobOutcome("Running", attempts=1), last_progress(lines("import-progress.jsonl")[1])
    )
    assert status == {
        "phase": "Downloading",
        "bytes": 256 * 2**20,
        "totalBytes": GiB,
        "rateBytesPerSecond": 50 * 2**20,
        "percent": 25,
        "attempts": 1,
    }
    assert describe("https://x/d.img", status) == (
        "importing https://x/d.img: downloading, 25% of 1073741824 bytes, at 52428800 B/s"
    )


def test_a_failed_attempt_is_retrying_while_the_job_lives_and_failed_once_it_gave_up() -> None:
    failed = last_progress(lines("import-progress.jsonl")[2])
    retrying = import_status(JobOutcome("Running", attempts=1), failed)
    assert retrying["phase"] == "Retrying"
    assert "connection reset" in retrying["message"]
    gave_up = import_status(JobOutcome("Failed", "BackoffLimitExceeded", "limit", 7), failed)
    assert gave_up["phase"] == "Failed" and "connection reset" in gave_up["message"]
    assert "rateBytesPerSecond" not in gave_up
    # The next attempt has written nothing yet: still retrying, with the last attempt's word.
    waiting = import_status(JobOutcome("Running", attempts=2), None, retrying)
    assert waiting["phase"] == "Retrying" and "connection reset" in waiting["message"]
    first = import_status(JobOutcome("Running", attempts=1), None)
    assert first["phase"] == "Pending"
    # No line of its own (the pod never ran): the Job's reason is the message.
    silent = import_status(JobOutcome("Failed", "DeadlineExceeded", "too slow", 1), None)
    assert silent["message"] == "too slow"


def test_done_is_the_jobs_word_and_a_vanished_log_keeps_what_was_known() -> None:
    done = last_progress(lines("import-resumed.jsonl")[-1])
    assert import_status(JobOutcome("Running", attempts=2), done)["phase"] == "Verifying"
    status = import_status(JobOutcome("Succeeded", attempts=2), done)
    assert status["phase"] == "Succeeded" and status["percent"] == 100
    assert status["sha256"].startswith("49bc20df")
    # The pods were cleaned up: the previous status fills in.
    later = import_status(JobOutcome("Succeeded", attempts=0), None, status)
    assert later["sha256"] == status["sha256"] and later["attempts"] == 2
    assert later["bytes"] == GiB


@pytest.mark.parametrize(
    ("conditions", "counts", "state"),
    [
        ([], {"active": 1}, "Running"),
        ([{"type": "Complete", "status": "True"}], {"succeeded": 1, "failed": 1}, "Succeeded"),
        (
            [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}],
            {"failed": 1},
            "Failed",
        ),
        ([{"type": "Failed", "status": "False"}], {"active": 1, "failed": 2}, "Running"),
    ],
)
def test_the_jobs_status_says_how_it_went(
    conditions: list[dict[str, str]], counts: dict[str, int], state: str
) -> None:
    outcome = job_outcome({"status": {"conditions": conditions, **counts}})
    assert outcome.state == state
    assert outcome.attempts == sum(counts.values())


def test_the_current_pod_is_the_live_one_else_the_successful_one() -> None:
    def pod(name: str, phase: str) -> dict[str, object]:
        meta = {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"}
        return {"metadata": meta, "status": {"phase": phase}}

    pods = [pod("a", "Failed"), pod("b", "Running"), pod("c", "Failed")]
    assert current_pod(pods)["metadata"]["name"] == "b"  # type: ignore[index]
    pods = [pod("a", "Failed"), pod("b", "Succeeded")]
    assert current_pod(pods)["metadata"]["name"] == "b"  # type: ignore[index]
    assert current_pod([]) is None


async def test_the_substitute_serves_pod_logs_as_the_api_server_does() -> None:
    async with api_server() as (server, client):
        with pytest.raises(NotFound):
            await client.log(NS, "nopod", "importer", tail_lines=5)
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": NS},
            "spec": {"containers": [{"name": "importer", "image": "i"}]},
        }
        await client.create(pod)
        with pytest.raises(KubeError) as waiting:
            await client.log(NS, "p", "importer", tail_lines=5)
        assert waiting.value.status == 400
        server.write_log(NS, "p", "importer", "one", "two", "three")
        assert await client.log(NS, "p", "importer", tail_lines=2) == "two\nthree\n"
        # limitBytes without tailLines: the head, cut mid-line.
        assert await client.log(NS, "p", "importer", limit_bytes=6) == "one\ntw"
        with pytest.raises(KubeError):
            await client.log(NS, "p", "other", tail_lines=2)
