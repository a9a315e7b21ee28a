"""When to reconnect which device: a pure state machine with an injected clock, no I/O.

Why it exists: the rules of staying attached are easy to get subtly wrong (hammering a dead
server, never retrying after a refused handshake, losing a LINK_DEAD that arrives during an
attempt), so they live here where unit tests drive them with fake time.

Rules:
* A device is HEALTHY or RECONNECTING. LINK_DEAD (or adoption by a restarted agent, which cannot
  know what happened while it was away) makes it RECONNECTING with an attempt due now.
* A failed attempt schedules the next one after an exponential backoff (capped); attempts never
  stop on their own: a pod's volume must come back whenever its server does. Only ``forget``
  (the device was detached) ends the watch.
* A successful RECONFIGURE makes it HEALTHY and reports how long the device was without a link.
* A LINK_DEAD during RECONNECTING changes nothing (an attempt is already scheduled), but one
  during the attempt itself is remembered: after that attempt succeeds, another one is due at
  once, because the kernel may have marked a second socket dead after we handed the first.

What it must not do: sleep, open sockets, or read the clock itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class LinkState(Enum):
    HEALTHY = "healthy"
    RECONNECTING = "reconnecting"


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.05
    factor: float = 2.0
    maximum: float = 0.25  # a down server gets at most 4 connect()s a second per device

    def delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failed attempts (failures >= 1)."""
        return min(self.maximum, self.initial * self.factor ** max(0, failures - 1))


@dataclass
class Watch:
    index: int
    state: LinkState = LinkState.HEALTHY
    failures: int = 0
    next_attempt: float | None = None
    dead_since: float | None = None
    in_attempt: bool = False
    dead_during_attempt: bool = False
    last_error: str | None = None


@dataclass
class Reconnector:
    backoff: Backoff = field(default_factory=Backoff)
    watches: dict[int, Watch] = field(default_factory=dict)

    def watch(self, index: int, now: float, *, verify: bool = False) -> Watch:
        """Start watching; ``verify`` (adoption) schedules an attempt right away."""
        w = self.watches.setdefault(index, Watch(index))
        if verify:
            self._mark_dead(w, now)
        return w

    def forget(self, index: int) -> None:
        self.watches.pop(index, None)

    def link_dead(self, index: int, now: float) -> bool:
        """Handle LINK_DEAD; False if the device is not ours."""
        w = self.watches.get(index)
        if w is None:
            return False
        if w.in_attempt:
            w.dead_during_attempt = True
        elif w.state is LinkState.HEALTHY:
            self._mark_dead(w, now)
        return True

    def _mark_dead(self, w: Watch, now: float) -> None:
        w.state = LinkState.RECONNECTING
        w.failures = 0
        w.next_attempt = now
        w.dead_since = now if w.dead_since is None else w.dead_since

    def due(self, now: float) -> list[Watch]:
        """Devices whose attempt is due, marked as in an attempt."""
        out = []
        for w in self.watches.values():
            waiting = w.state is LinkState.RECONNECTING and not w.in_attempt
            if waiting and w.next_attempt is not None and w.next_attempt <= now:
                w.in_attempt = True
                w.dead_during_attempt = False
                out.append(w)
        return out

    def failed(self, index: int, now: float, error: str) -> float:
        """An attempt failed; returns the delay until the next one."""
        w = self.watches[index]
        w.in_attempt = False
        w.failures += 1
        w.last_error = error
        delay = self.backoff.delay(w.failures)
        w.next_attempt = now + delay
        return delay

    def succeeded(self, index: int, now: float) -> float:
        """RECONFIGURE went through; returns the seconds the device was without a link."""
        w = self.watches[index]
        outage = now - (w.dead_since if w.dead_since is not None else now)
        w.in_attempt = False
        w.failures = 0
        w.last_error = None
        if w.dead_during_attempt:
            w.dead_during_attempt = False
            w.next_attempt = now
        else:
            w.state = LinkState.HEALTHY
            w.next_attempt = None
            w.dead_since = None
        return outage

    def next_deadline(self) -> float | None:
        pending: Iterable[float] = (
            w.next_attempt
            for w in self.watches.values()
            if w.state is LinkState.RECONNECTING and not w.in_attempt and w.next_attempt is not None
        )
        return min(pending, default=None)
