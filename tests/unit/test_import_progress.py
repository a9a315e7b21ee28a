"""The import's progress reporter: JSON lines at most once per interval plus every phase and a
final line; the bar only on a terminal (fake clock, in-memory streams)."""

from __future__ import annotations

import io
import json

from nbdserver.importer.progress import Progress, render_bar


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_come_at_most_once_a_second_and_every_phase_change() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress("json", out=out, err=io.StringIO(), clock=clock)
    p.phase("downloading", 0, 1000)
    for i in range(1, 11):
        clock.now += 0.25
        p.advance(i * 100)
    p.phase("verifying", 1000, 1000)
    p.finish("done", "imported", sha256="ab" * 32)
    got = lines(out)
    assert [g["phase"] for g in got] == ["downloading"] * 3 + ["verifying", "done"]
    assert [g["bytes"] for g in got[:3]] == [0, 400, 800]
    assert got[1]["rateBytesPerSecond"] == 400 and got[1]["totalBytes"] == 1000
    assert got[-1]["sha256"] == "ab" * 32 and "sha256" not in got[0]


def test_a_resumed_phase_counts_its_rate_from_where_it_resumed() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress("json", out=out, err=io.StringIO(), clock=clock)
    p.phase("downloading", 500, 1000, "resuming at byte 500")
    clock.now += 2
    p.advance(700)
    assert lines(out)[-1]["rateBytesPerSecond"] == 100
    assert lines(out)[0]["message"] == "resuming at byte 500"


def test_the_bar_is_drawn_on_a_terminal_only() -> None:
    plain, tty, out = io.StringIO(), Tty(), io.StringIO()
    Progress("bar", out=out, err=plain).phase("downloading", 0, 10)
    assert plain.getvalue() == "" and out.getvalue() == ""
    p = Progress("bar", out=out, err=tty)
    p.phase("downloading", 5, 10)
    p.finish("done", "imported")
    assert tty.getvalue().startswith("\r[") and tty.getvalue().endswith("\n")
    assert out.getvalue() == ""


def test_the_bar_shows_share_sizes_rate_and_phase() -> None:
    line = render_bar("downloading", 512 * 1024 * 1024, 1024**3, 80 * 1024 * 1024)
    assert line.startswith("[" + "#" * 15 + "-" * 15 + "]")
    assert " 50.0%  512.0 MiB / 1.0 GiB  80.0 MiB/s  downloading" in line
