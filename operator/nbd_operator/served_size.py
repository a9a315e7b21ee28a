"""The size an export's server announced: read from the head of the server pod's log.

Why it exists: for some exports only the server knows the size it serves (a host device's, a
qcow2/VMDK/xz image's virtual size in its header, a streamed remote's). At start nbdserver
prints one JSON object per export on a line of its own, ``{"export": NAME, "sizeBytes": N,
...}``; the operator reads the first lines of the server pod's log and records the size in
status.sizeBytes, which a clone's overlay claim is sized from.

What it must not do: I/O. Pods and log text in, a size out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# The announcement comes right after a few start-up log lines; a longer head is never needed.
HEAD_BYTES = 16 * 1024


def announced_size(log: str, export: str) -> int | None:
    """The size announced for ``export`` in a log head (a line cut short by the byte limit,
    or any other line, is skipped)."""
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or obj.get("export") != export:
            continue
        size = obj.get("sizeBytes")
        if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
            return size
    return None


def _ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False  # a terminating pod's log speaks of the server being replaced
    conditions = (pod.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def serving_pod(pods: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The server pod that is serving now: Ready and not terminating (the Deployment
    recreates, so there is at most one; the newest wins if a rollout overlaps)."""
    ready = [p for p in pods if _ready(p)]
    if not ready:
        return None
    return max(ready, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))


def next_size(recorded: int | None, announced: int | None) -> tuple[int | None, bool]:
    """What status.sizeBytes becomes, and whether that is a shrink (to be told, never silent).
    A failed read (None) never clears a recorded size; growth is recorded as it is."""
    if announced is None:
        return recorded, False
    return announced, recorded is not None and announced < recorded
