"""Progress of an import: JSON lines on stdout (for the operator's Job), or a bar on a terminal.

Why: an import of a large image takes minutes; whoever waits wants bytes, total, rate and the
phase. ``json`` prints at most one line a second plus every phase change and a final line
(``done`` with the sha256, or ``failed`` with the reason); ``bar`` redraws one stderr line,
only when stderr is a terminal (a log file would fill with carriage returns).

Must not: decide anything about the import; it only tells.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

INTERVAL = 1.0
_WIDTH = 30


class Progress:
    """Reports phases and byte counts; ``mode`` is None (silent), ``"json"`` or ``"bar"``."""

    def __init__(
        self,
        mode: str | None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self._mode = mode if mode != "bar" or self._err.isatty() else None
        self._clock = clock
        self._phase = ""
        self._total = 0
        self._done = 0
        self._start = (clock(), 0)  # when and at how many bytes the phase began
        self._last = -INTERVAL

    def phase(self, name: str, done: int, total: int, message: str = "") -> None:
        """A new phase begins at ``done`` of ``total`` bytes; always reported."""
        self._phase, self._done, self._total = name, done, total
        self._start = (self._clock(), done)
        self._emit(message)

    def advance(self, done: int) -> None:
        """``done`` bytes of the phase are through; reported at most once per interval."""
        self._done = done
        if self._clock() - self._last >= INTERVAL:
            self._emit("")

    def finish(self, phase: str, message: str, sha256: str = "", size: int | None = None) -> None:
        """The final line: ``done`` or ``failed`` (``size``: all of it is through)."""
        self._phase = phase
        if size is not None:
            self._done = self._total = size
        self._emit(message, sha256)
        if self._mode == "bar":
            self._err.write("\n")
            self._err.flush()

    def rate(self) -> float:
        began, at = self._start
        elapsed = self._clock() - began
        return (self._done - at) / elapsed if elapsed > 0 else 0.0

    def _emit(self, message: str, sha256: str = "") -> None:
        self._last = self._clock()
        if self._mode == "json":
            line: dict[str, object] = {
                "phase": self._phase,
                "bytes": self._done,
                "totalBytes": self._total,
                "rateBytesPerSecond": round(self.rate()),
                "message": message,
            }
            if sha256:
                line["sha256"] = sha256
            self._out.write(json.dumps(line) + "\n")
            self._out.flush()
        elif self._mode == "bar":
            self._err.write("\r" + render_bar(self._phase, self._done, self._total, self.rate()))
            self._err.flush()


def render_bar(phase: str, done: int, total: int, rate: float) -> str:
    """One terminal line: ``[#####-----]  50%  512.0 MiB / 1.0 GiB  80.0 MiB/s  downloading``."""
    share = done / total if total else 1.0
    filled = int(share * _WIDTH)
    bar = "#" * filled + "-" * (_WIDTH - filled)
    return (
        f"[{bar}] {share * 100:5.1f}%  {human(done)} / {human(total)}  {human(rate)}/s  {phase}"
        "\x1b[K"  # clear what a longer previous line left
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
