"""Prometheus metrics for the server, served on ``--metrics-port`` in the text format.

Why: operators need to see per-export traffic, latency, errors, connections and TLS handshakes
without attaching a debugger, in the format every monitoring stack scrapes.

Hot-path cost: each connection owns a ``ConnStats`` of plain lists and ints that only its own
thread writes; no lock is taken per request. The registry holds a lock only when a connection
opens or closes (to fold its counts into the export's totals) and when a scrape renders. A scrape
may read a live connection's counters mid-update; Prometheus counters tolerate that (the next
scrape is exact). With metrics off the edge holds no ``ConnStats`` and pays nothing.

It must not: import anything outside the standard library, or serve anything but ``/metrics``.
"""

from __future__ import annotations

import errno as errno_mod
import socket
import threading
from bisect import bisect_left
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: NBD command numbers (doc/proto.md) to label values; the index is the command.
COMMANDS = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status")
(
    CMD_READ,
    CMD_WRITE,
    CMD_DISC,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_CACHE,
    CMD_WRITE_ZEROES,
    CMD_BLOCK_STATUS,
) = range(8)
#: Latency bucket upper bounds in seconds (a ``+Inf`` bucket follows).
LATENCY_BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)  # fmt: skip
BOUNDS_NS = tuple(int(b * 1e9) for b in LATENCY_BOUNDS)
_NCMD = len(COMMANDS)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: The error values NBD allows on the wire, by their names in doc/proto.md.
WIRE_ERRNO = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC", 75: "EOVERFLOW",
              95: "ENOTSUP", 108: "ESHUTDOWN"}  # fmt: skip


class ConnStats:
    """Counters of one connection (or one worker thread): written by one thread only."""

    __slots__ = ("buckets", "bytes", "errors", "export", "latency_ns", "ops")

    def __init__(self, export: str) -> None:
        self.export = export
        self.ops = [0] * _NCMD
        self.bytes = [0] * _NCMD
        self.latency_ns = [0] * _NCMD
        self.buckets = [[0] * (len(BOUNDS_NS) + 1) for _ in range(_NCMD)]
        self.errors: dict[tuple[int, str], int] = {}

    def record(self, cmd: int, nbytes: int, elapsed_ns: int, err: int = 0) -> None:
        """One finished request: ``nbytes`` moved, ``elapsed_ns`` from receipt to reply."""
        self.ops[cmd] += 1
        self.bytes[cmd] += nbytes
        self.latency_ns[cmd] += elapsed_ns
        self.buckets[cmd][bisect_left(BOUNDS_NS, elapsed_ns)] += 1
        if err:
            key = (cmd, errno_mod.errorcode.get(err, str(err)))
            self.errors[key] = self.errors.get(key, 0) + 1

    def fold_into(self, total: ConnStats) -> None:
        for i in range(_NCMD):
            total.ops[i] += self.ops[i]
            total.bytes[i] += self.bytes[i]
            total.latency_ns[i] += self.latency_ns[i]
            tb, sb = total.buckets[i], self.buckets[i]
            for j in range(len(sb)):
                tb[j] += sb[j]
        for key, n in self.errors.items():
            total.errors[key] = total.errors.get(key, 0) + n


class Metrics:
    """The registry: finished connections' totals, live connections, server-wide counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, ConnStats] = {}
        self._live: set[ConnStats] = set()
        self.connections_open = 0
        self.connections_total = 0
        self.refused: dict[str, int] = {}
        self.tls_handshakes: dict[str, int] = {"ok": 0, "failed": 0}
        self.wire_errors: dict[tuple[str, int], int] = {}

    # Connection lifecycle: a lock here is per connection, not per request.
    def connection_opened(self) -> None:
        with self._lock:
            self.connections_open += 1
            self.connections_total += 1

    def connection_closed(self) -> None:
        with self._lock:
            self.connections_open -= 1

    def connection_refused(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    def tls_handshake(self, ok: bool) -> None:
        with self._lock:
            self.tls_handshakes["ok" if ok else "failed"] += 1

    def wire_error(self, export: str, errno: int) -> None:
        """An error reply was sent (the error path only, so a lock is fine here)."""
        with self._lock:
            key = (export, errno)
            self.wire_errors[key] = self.wire_errors.get(key, 0) + 1

    def open_stats(self, export: str) -> ConnStats:
        stats = ConnStats(export)
        with self._lock:
            self._live.add(stats)
        return stats

    def close_stats(self, stats: ConnStats) -> None:
        with self._lock:
            self._live.discard(stats)
            total = self._totals.get(stats.export)
            if total is None:
                total = self._totals[stats.export] = ConnStats(stats.export)
            stats.fold_into(total)

    def snapshot(self) -> dict[str, ConnStats]:
        """Per-export sums of finished and live connections."""
        with self._lock:
            out: dict[str, ConnStats] = {}
            for stats in (*self._totals.values(), *self._live):
                agg = out.get(stats.export)
                if agg is None:
                    agg = out[stats.export] = ConnStats(stats.export)
                stats.fold_into(agg)
            return out

    def render(self) -> str:
        return "".join(_render(self, self.snapshot()))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_LE = (*(repr(float(b)) for b in LATENCY_BOUNDS), "+Inf")


def _render(m: Metrics, per_export: dict[str, ConnStats]) -> Iterable[str]:
    yield "# HELP nbdserver_connections_open Client connections currently open.\n"
    yield "# TYPE nbdserver_connections_open gauge\n"
    yield f"nbdserver_connections_open {m.connections_open}\n"
    yield "# HELP nbdserver_connections_accepted_total Client connections accepted.\n"
    yield "# TYPE nbdserver_connections_accepted_total counter\n"
    yield f"nbdserver_connections_accepted_total {m.connections_total}\n"
    yield "# HELP nbdserver_connections_refused_total Connections closed before negotiation.\n"
    yield "# TYPE nbdserver_connections_refused_total counter\n"
    for reason, n in sorted(m.refused.items()):
        yield f'nbdserver_connections_refused_total{{reason="{_esc(reason)}"}} {n}\n'
    yield "# HELP nbdserver_tls_handshakes_total TLS handshakes after NBD_OPT_STARTTLS.\n"
    yield "# TYPE nbdserver_tls_handshakes_total counter\n"
    for result, n in sorted(m.tls_handshakes.items()):
        yield f'nbdserver_tls_handshakes_total{{result="{result}"}} {n}\n'

    rows = sorted(per_export.items())
    yield "# HELP nbdserver_requests_total Transmission requests answered.\n"
    yield "# TYPE nbdserver_requests_total counter\n"
    for export, s in rows:
        for i, cmd in enumerate(COMMANDS):
            if s.ops[i]:
                labels = f'export="{_esc(export)}",command="{cmd}"'
                yield f"nbdserver_requests_total{{{labels}}} {s.ops[i]}\n"
    yield "# HELP nbdserver_bytes_total Payload bytes moved by reads and writes.\n"
    yield "# TYPE nbdserver_bytes_total counter\n"
    for export, s in rows:
        for i, cmd in enumerate(COMMANDS):
            if s.bytes[i]:
                labels = f'export="{_esc(export)}",command="{cmd}"'
                yield f"nbdserver_bytes_total{{{labels}}} {s.bytes[i]}\n"
    yield "# HELP nbdserver_errors_total Error replies sent, by NBD errno.\n"
    yield "# TYPE nbdserver_errors_total counter\n"
    for (export, errno), n in sorted(m.wire_errors.items()):
        name = WIRE_ERRNO.get(errno, str(errno))
        yield f'nbdserver_errors_total{{export="{_esc(export)}",errno="{name}"}} {n}\n'
    yield "# HELP nbdserver_backend_errors_total Backend failures, by command and OS errno.\n"
    yield "# TYPE nbdserver_backend_errors_total counter\n"
    for export, s in rows:
        for (cmd_i, name), n in sorted(s.errors.items()):
            labels = f'export="{_esc(export)}",command="{COMMANDS[cmd_i]}",errno="{name}"'
            yield f"nbdserver_backend_errors_total{{{labels}}} {n}\n"
    yield "# HELP nbdserver_request_duration_seconds Time from request receipt to reply.\n"
    yield "# TYPE nbdserver_request_duration_seconds histogram\n"
    for export, s in rows:
        for i, cmd in enumerate(COMMANDS):
            if not s.ops[i]:
                continue
            labels = f'export="{_esc(export)}",command="{cmd}"'
            running = 0
            for le, n in zip(_LE, s.buckets[i], strict=True):
                running += n
                yield f'nbdserver_request_duration_seconds_bucket{{{labels},le="{le}"}} {running}\n'
            yield f"nbdserver_request_duration_seconds_sum{{{labels}}} {s.latency_ns[i] / 1e9!r}\n"
            yield f"nbdserver_request_duration_seconds_count{{{labels}}} {s.ops[i]}\n"


class CountingReplies:
    """Stands in for a connection's reply encoder and counts every error reply it encodes.

    Only ``error`` is intercepted; the other encoders are the inner encoder's own bound methods,
    so successful replies cost nothing extra.
    """

    def __init__(self, inner: Any, metrics: Metrics, export: str) -> None:
        self._inner = inner
        self._inner_error = inner.error
        self._metrics = metrics
        self._export = export
        for name in ("ok", "read", "block_status"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def error(self, cookie: int, errno: int, *args: Any, **kwargs: Any) -> Any:
        self._metrics.wire_error(self._export, errno)
        return self._inner_error(cookie, errno, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics  # set on the subclass made by serve_metrics

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics lives here")
            return
        body = self.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes every few seconds would drown the connection log


class _DualStackHTTPServer(ThreadingHTTPServer):
    """Listens on every IPv6 address and, through v4-mapped addresses, every IPv4 one."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class MetricsServer:
    """The HTTP endpoint in a daemon thread; ``close`` stops it and frees the port.
    ``host`` None: every address, IPv6 and IPv4 (IPv4 only where IPv6 is missing)."""

    def __init__(self, metrics: Metrics, port: int, host: str | None = None) -> None:
        handler = type("MetricsHandler", (_Handler,), {"metrics": metrics})
        server: type[ThreadingHTTPServer] = ThreadingHTTPServer
        if host is None or ":" in host:
            if socket.has_ipv6:
                server, host = _DualStackHTTPServer, host or "::"
            else:
                host = "0.0.0.0"
        self.httpd = server((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
