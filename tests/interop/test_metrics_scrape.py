"""Metrics after known traffic, scraped over HTTP and parsed by prometheus_client's parser.

The traffic comes from nbdsh (libnbd), so the counts are exact: 3 writes of 64 KiB, 5 reads of
4 KiB, one flush, and one write the backend fails (the server runs with a file-size rlimit, so
the file system answers EFBIG, a real I/O error path).
"""

from __future__ import annotations

import resource
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.interop.security_helpers import free_port, run, serve, wait_for

pytestmark = pytest.mark.interop

LIMIT = 1 << 20  # the server may not grow files beyond 1 MiB


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _wait_endpoint(port: int) -> None:
    """The metrics endpoint starts just after the NBD listener: wait for it too."""

    def up() -> bool:
        try:
            _scrape(port)
            return True
        except OSError:
            return False

    wait_for(up, what="the metrics endpoint")


def _l(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def test_counts_bytes_latency_errors_and_connections(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)  # sparse, made before the server's rlimit applies
    mport = free_port()
    args = [str(image), "--name", "disk", "--metrics-port", str(mport),
            "--metrics-bind", "127.0.0.1"]  # fmt: skip
    with serve(args, tmp_path, preexec_fn=_limit_file_size) as srv:
        _wait_endpoint(mport)
        script = (
            f"h.connect_uri('nbd://127.0.0.1:{srv.port}/disk')\n"
            "for i in range(3): h.pwrite(b'm' * 65536, i * 65536)\n"
            "for i in range(5): h.pread(4096, i * 4096)\n"
            "h.flush()\n"
            "try:\n"
            "    h.pwrite(b'x' * 4096, 2 << 20)\n"
            "    print('no error')\n"
            "except nbd.Error as e:\n"
            "    print('errno', e.errno)\n"
            "h.set_strict_mode(0)\n"  # let libnbd send a read past the end
            "try:\n"
            "    h.pread(4096, 4 << 20)\n"
            "except nbd.Error as e:\n"
            "    print('errno', e.errno)\n"
            "h.shutdown()\n"
        )
        r = run(["/usr/bin/python3", "-m", "nbd", "-c", script])
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["errno", "ENOSPC", "errno", "EINVAL"], r.stdout
        wait_for(lambda: _scrape(mport)[("nbdserver_connections_open", _l())] == 0,
                 what="the connection to close")  # fmt: skip
        m = _scrape(mport)
    w, rd, fl = (_l(export="disk", command=c) for c in ("write", "read", "flush"))
    assert m[("nbdserver_requests_total", w)] == 4
    assert m[("nbdserver_bytes_total", w)] == 3 * 65536  # the failed write moved nothing
    assert m[("nbdserver_requests_total", rd)] == 5
    assert m[("nbdserver_bytes_total", rd)] == 5 * 4096
    assert m[("nbdserver_requests_total", fl)] == 1
    efbig = _l(export="disk", command="write", errno="EFBIG")
    assert m[("nbdserver_backend_errors_total", efbig)] == 1  # what the file system said
    assert m[("nbdserver_errors_total", _l(export="disk", errno="ENOSPC"))] == 1  # on the wire
    # Refused by the protocol core before any backend call, and still counted.
    assert m[("nbdserver_errors_total", _l(export="disk", errno="EINVAL"))] == 1
    assert m[("nbdserver_request_duration_seconds_count", w)] == 4
    assert m[("nbdserver_request_duration_seconds_bucket", w | {("le", "+Inf")})] == 4
    assert m[("nbdserver_request_duration_seconds_sum", rd)] > 0
    assert m[("nbdserver_connections_accepted_total", _l())] >= 1
    assert m[("nbdserver_tls_handshakes_total", _l(result="ok"))] == 0


def test_acl_refusals_are_counted(tmp_path: Path) -> None:
    from tests.interop.security_helpers import raw_greeting

    mport = free_port()
    args = ["--backend", "memory", "--size", "1M", "--allow", "127.0.0.2",
            "--metrics-port", str(mport), "--metrics-bind", "127.0.0.1"]  # fmt: skip
    key = ("nbdserver_connections_refused_total", _l(reason="acl"))
    with serve(args, tmp_path) as srv:
        _wait_endpoint(mport)
        # The fixture's one successful readiness probe came from 127.0.0.1: refused, counted.
        wait_for(lambda: _scrape(mport).get(key) == 1, what="the probe's refusal counted")
        before = 1
        for _ in range(3):
            assert raw_greeting("127.0.0.1", srv.port, source="127.0.0.3") == b""
        wait_for(lambda: _scrape(mport).get(key) == before + 3, what="three refusals counted")
