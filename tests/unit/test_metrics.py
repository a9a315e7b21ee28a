"""Metrics: counts are exact, the exposition parses with prometheus_client, the endpoint serves."""

from __future__ import annotations

import errno
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nbdserver.backends.memory import MemoryBackend
from nbdserver.filters.stats import StatsFilter
from nbdserver.metrics import CMD_READ, CMD_WRITE, Metrics, MetricsServer


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counts_of_live_and_closed_connections_add_up_per_export_and_command() -> None:
    m = Metrics()
    a = m.open_stats("disk")
    b = m.open_stats("disk")
    a.record(CMD_READ, 4096, 30_000)
    a.record(CMD_WRITE, 512, 2_000_000)
    b.record(CMD_READ, 8192, 40_000)
    m.close_stats(a)  # folded into the export's totals; b is still live
    b.record(CMD_WRITE, 0, 10_000, err=errno.ENOSPC)
    got = _samples(m.render())
    rd = (("command", "read"), ("export", "disk"))
    wr = (("command", "write"), ("export", "disk"))
    assert got[("nbdserver_requests_total", rd)] == 2
    assert got[("nbdserver_bytes_total", rd)] == 12288
    assert got[("nbdserver_requests_total", wr)] == 2
    assert got[("nbdserver_bytes_total", wr)] == 512
    err = (("command", "write"), ("errno", "ENOSPC"), ("export", "disk"))
    assert got[("nbdserver_backend_errors_total", err)] == 1
    # Histogram: both reads under 50 us, one write at 2 ms lands in the 2.5 ms bucket.
    assert got[("nbdserver_request_duration_seconds_bucket", (*rd, ("le", "5e-05")))] == 2
    assert got[("nbdserver_request_duration_seconds_bucket", (*wr, ("le", "0.001")))] == 1
    assert got[("nbdserver_request_duration_seconds_bucket", (*wr, ("le", "0.0025")))] == 2
    assert got[("nbdserver_request_duration_seconds_count", wr)] == 2
    assert got[("nbdserver_request_duration_seconds_sum", wr)] == pytest.approx(0.00201)


def test_connection_tls_and_refusal_counters() -> None:
    m = Metrics()
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.connection_refused("acl")
    m.tls_handshake(True)
    m.tls_handshake(False)
    m.tls_handshake(False)
    got = _samples(m.render())
    assert got[("nbdserver_connections_open", ())] == 1
    assert got[("nbdserver_connections_accepted_total", ())] == 2
    assert got[("nbdserver_connections_refused_total", (("reason", "acl"),))] == 1
    assert got[("nbdserver_tls_handshakes_total", (("result", "failed"),))] == 2
    assert got[("nbdserver_tls_handshakes_total", (("result", "ok"),))] == 1


def test_export_names_are_escaped_in_labels() -> None:
    m = Metrics()
    s = m.open_stats('we"ird\\name\n')
    s.record(CMD_READ, 1, 1)
    got = _samples(m.render())
    assert got[("nbdserver_requests_total", (("command", "read"), ("export", 'we"ird\\name\n')))]


def test_stats_filter_times_every_call_and_counts_errors() -> None:
    m = Metrics()
    stats = m.open_stats("mem")
    f = StatsFilter(MemoryBackend(1 << 16), stats)
    f.pwrite(b"x" * 1000, 0, False)
    f.pread(memoryview(bytearray(300)), 0)
    f.zero(0, 4096, True, False, False)
    f.trim(0, 4096, False)
    f.flush()
    f.extents(0, 4096)
    f.cache(0, 4096)

    class Failing(MemoryBackend):
        def pread(self, buf: memoryview, offset: int) -> None:
            raise OSError(errno.EIO, "boom")

    failing = StatsFilter(Failing(4096), stats)
    with pytest.raises(OSError):
        failing.pread(memoryview(bytearray(10)), 0)
    m.close_stats(stats)
    got = _samples(m.render())
    counts = {
        dict(labels)["command"]: v
        for (name, labels), v in got.items()
        if name == "nbdserver_requests_total"
    }
    assert counts == {
        "read": 2,
        "write": 1,
        "write_zeroes": 1,
        "trim": 1,
        "flush": 1,
        "block_status": 1,
        "cache": 1,
    }
    err = (("command", "read"), ("errno", "EIO"), ("export", "mem"))
    assert got[("nbdserver_backend_errors_total", err)] == 1
    assert f.fileno() is None


def test_endpoint_serves_metrics_and_404s_elsewhere() -> None:
    m = Metrics()
    m.connection_opened()
    server = MetricsServer(m, 0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = r.read().decode()
        assert _samples(body)[("nbdserver_connections_open", ())] == 1
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/other", timeout=5)
        assert exc.value.code == 404
    finally:
        server.close()


def test_scrapes_during_traffic_never_break_the_format() -> None:
    m = Metrics()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            s = m.open_stats("busy")
            for _ in range(200):
                s.record(CMD_READ, 4096, 1000)
            m.close_stats(s)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        last = 0.0
        for _ in range(50):
            got = _samples(m.render())
            now = got.get(
                ("nbdserver_requests_total", (("command", "read"), ("export", "busy"))), 0
            )
            assert now >= last  # counters never go backwards
            last = now
    finally:
        stop.set()
        t.join()


def test_error_replies_are_counted_by_wire_errno_and_other_replies_pass_through() -> None:
    from nbdserver.metrics import CountingReplies
    from nbdserver.protocol.transmission import ReplyEncoder

    m = Metrics()
    inner = ReplyEncoder(structured=False, extended=False)
    counting = CountingReplies(inner, m, "disk")
    assert counting.ok(7, 0) == inner.ok(7, 0)
    assert counting.error(8, errno.EINVAL, 0, "bad") == inner.error(8, errno.EINVAL, 0, "bad")
    counting.error(9, errno.EINVAL, 0, "bad")
    counting.error(10, 95, 0, "no")
    got = _samples(m.render())
    assert got[("nbdserver_errors_total", (("errno", "EINVAL"), ("export", "disk")))] == 2
    assert got[("nbdserver_errors_total", (("errno", "ENOTSUP"), ("export", "disk")))] == 1
