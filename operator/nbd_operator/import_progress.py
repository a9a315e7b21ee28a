"""An image import's progress: the importer's JSON lines and its Job, turned into status.import.

Why it exists: ``nbdserver import --progress json`` prints one JSON object per line (about once
a second, and a final one); the operator reads the import pod's last lines on a timer. What the
Job says (complete, failed, how many pods it started) outranks what a line says: a pod may
print "done" and still be killed before it exits.

What it must not do: I/O. Log text and Job objects in, a status dict out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The importer's phases (the contract) as status.import.phase says them.
_PHASES = {
    "downloading": "Downloading",
    "converting": "Converting",
    "verifying": "Verifying",
    # Printed before the process exits 0; Succeeded is the Job's word only.
    "done": "Verifying",
    # This attempt gave up; while the Job lives, another attempt follows.
    "failed": "Retrying",
}
DONE, FAILED = "Succeeded", "Failed"
# Every key status.import may hold (a merge patch must name a key to remove it).
FIELDS = (
    "phase",
    "bytes",
    "totalBytes",
    "percent",
    "rateBytesPerSecond",
    "message",
    "attempts",
    "sha256",
)


@dataclass(frozen=True)
class JobOutcome:
    state: str  # Running, Succeeded or Failed
    reason: str = ""  # the Job's Failed condition reason (BackoffLimitExceeded, PodFailurePolicy)
    message: str = ""
    attempts: int = 0  # pods started so far


def job_outcome(job: Mapping[str, Any] | None) -> JobOutcome:
    """Read a Job's status as the Job controller writes it."""
    st = (job or {}).get("status") or {}
    attempts = sum(int(st.get(k) or 0) for k in ("active", "succeeded", "failed"))
    for cond in st.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return JobOutcome("Succeeded", attempts=attempts)
        if cond.get("type") == "Failed":
            reason, message = str(cond.get("reason") or ""), str(cond.get("message") or "")
            return JobOutcome("Failed", reason, message, attempts)
    if int(st.get("succeeded") or 0) >= 1:
        return JobOutcome("Succeeded", attempts=attempts)
    return JobOutcome("Running", attempts=attempts)


def last_progress(log: str) -> dict[str, Any] | None:
    """The last complete progress object in a log tail (a line cut short is skipped)."""
    for line in reversed(log.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("phase") in _PHASES:
            return obj
    return None


def current_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The Job's latest attempt: a pod still pending or running, else the one that succeeded,
    else the newest failed one (creation times have whole-second resolution: not enough)."""

    def rank(pod: Mapping[str, Any]) -> tuple[bool, bool, str]:
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        created = str((pod.get("metadata") or {}).get("creationTimestamp") or "")
        return phase in ("Pending", "Running"), phase == "Succeeded", created

    return max(pods, key=rank) if pods else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def import_status(
    outcome: JobOutcome,
    progress: Mapping[str, Any] | None,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """status.import from the Job's outcome and the latest progress line (``previous``, the
    last status.import, fills in what a vanished pod's log can no longer tell)."""
    prev = dict(previous or {})
    status: dict[str, Any] = {"attempts": max(outcome.attempts, int(prev.get("attempts") or 0))}
    for key in ("bytes", "totalBytes", "rateBytesPerSecond"):
        value = _int((progress or {}).get(key))
        if value is None:
            value = _int(prev.get(key))
        if value is not None:
            status[key] = value
    message = (progress or {}).get("message")
    if outcome.state == "Succeeded":
        status["phase"] = DONE
        status.pop("rateBytesPerSecond", None)
        if "totalBytes" in status:
            status["bytes"] = status["totalBytes"]
    elif outcome.state == "Failed":
        status["phase"] = FAILED
        status.pop("rateBytesPerSecond", None)
        # The importer's own reason is the useful one; the Job's says only that it gave up.
        if not message or (progress or {}).get("phase") != "failed":
            message = outcome.message or outcome.reason or "the import Job failed"
    elif progress is not None:
        status["phase"] = _PHASES[str(progress["phase"])]
    else:
        # No line yet from this attempt: after a failed one, the Job is retrying.
        status["phase"] = "Retrying" if status["attempts"] > 1 else "Pending"
        message = message or prev.get("message")
    if message:
        status["message"] = str(message)[:4096]
    if (progress or {}).get("sha256"):
        status["sha256"] = str((progress or {})["sha256"])
    elif prev.get("sha256"):
        status["sha256"] = prev["sha256"]
    total, done = status.get("totalBytes"), status.get("bytes")
    if total and done is not None:
        status["percent"] = min(100, done * 100 // total)
    return status


def describe(location: str, status: Mapping[str, Any]) -> str:
    """One sentence for status.message while the import runs."""
    phase = str(status.get("phase", "Pending"))
    if phase == "Pending":
        return f"importing {location}: waiting for the importer to start"
    done, total = status.get("bytes"), status.get("totalBytes")
    parts = [f"importing {location}: {phase.lower()}"]
    if total:
        parts.append(f"{status.get('percent', 0)}% of {total} bytes")
    elif done is not None:
        parts.append(f"{done} bytes")
    if rate := status.get("rateBytesPerSecond"):
        parts.append(f"at {rate} B/s")
    if phase == "Retrying" and status.get("message"):
        parts.append(f"after: {status['message']}")
    return ", ".join(parts)
