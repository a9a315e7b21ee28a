"""The operator at hundreds of NBDExports: reconcile cost, create-to-Provisioning latency, RSS.

Why it exists: DESIGN.md section 5 asks for the operator's reconcile latency and memory at
hundreds of exports. No kube-apiserver runs here and kmock (the tests' substitute) answers in
15-100 ms per request, growing with the number of objects, so it would measure itself. Two
honest measurements instead:

1. ``pure``: the reconcile path without I/O (spec parsing, every manifest builder, status
   computation) per export, at 100/300/1000 exports.
2. ``operator``: the real ``nbd-operator`` (its console entry point, kopf and all, in its own
   process) against ``FastApi`` below: an in-memory API server with dict indexes and a watch
   history, just what kopf and the operator use (discovery, list, watch with resume, get,
   create, merge and JSON patch with the resourceVersion test, status subresource, generation,
   finalizers and deletion, events). Exports are inserted into its store directly (no client
   HTTP competing for the two cores); the store timestamps the first status write that says
   Provisioning. Reported: per-export latency (median, p95, max) for a burst of N exports and
   for single exports created one at a time next to N existing ones, the operator's requests
   per export, and its peak RSS (VmHWM of the process).

What it must not do: pretend to be Kubernetes (no admission, no RBAC, no garbage collector, no
controllers: Deployments never become available, so Provisioning, not Ready, is the end point),
or run in the test suite (it is a benchmark: ``python -m bench.operator_scale``).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.operator_fakeapi import NS, FastApi, app

ROOT = Path(__file__).resolve().parents[1]
SPECS: list[dict[str, Any]] = [
    {"source": {"memory": {}}, "size": "1Gi"},
    {"source": {"volumeClaimTemplate": {"storageClassName": "fast"}}, "size": "10Gi"},
    {
        "source": {"persistentVolumeClaim": {"claimName": "images"}},
        "size": "2Gi",
        "allowedClients": ["10.0.0.0/8"],
    },
    {"source": {"memory": {}}, "size": "64Mi", "qos": {"readIOPS": 100}, "connections": 4},
]


def _vm(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def export(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "nbd.dev/v1alpha1",
        "kind": "NBDExport",
        "metadata": {"name": name, "namespace": NS},
        "spec": copy.deepcopy(spec),
    }


async def _until(api: FastApi, check: Callable[[], bool], timeout: float, what: str) -> None:
    async with api.changed:
        try:
            await asyncio.wait_for(api.changed.wait_for(check), timeout)
        except TimeoutError:
            raise SystemExit(f"timed out after {timeout}s waiting for {what}") from None


async def _quiet(api: FastApi, timeout: float, still: float = 0.5) -> float:
    """Seconds until no request has arrived for ``still`` seconds (a benchmark's settle
    wait: sampling the request counter is the point here, not synchronisation)."""
    loop = asyncio.get_running_loop()
    t0, seen = loop.time(), -1
    while api.requests != seen:
        if loop.time() - t0 > timeout:
            raise SystemExit("the operator never went quiet")
        seen = api.requests
        await asyncio.sleep(still)
    return loop.time() - t0 - still


async def measure_operator(n: int, singles: int, timeout: float) -> dict[str, Any]:
    """The real operator process against FastApi: a burst of ``n``, then ``singles`` more."""
    api = FastApi()
    api.create("persistentvolumeclaims", NS, {"metadata": {"name": "images"}, "spec": {}})
    # Watches end when kopf disconnects (handler cancellation), so shutdown does not wait.
    runner = web.AppRunner(app(api), handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    tmp = Path(tempfile.mkdtemp(prefix="opscale-"))
    (tmp / "config").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "b",
                "clusters": [{"name": "b", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "b", "context": {"cluster": "b", "user": "u"}}],
            }
        )
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp),
        "KUBECONFIG": str(tmp / "config"),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "api")),
    }
    code = "import sys; from nbd_operator.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        env=env,
        cwd=tmp,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _until(api, lambda: "nbdexports" in api.watching, 60, "the operator's watch")
        idle_rss = _vm(proc.pid, "VmRSS")
        t0, before = time.monotonic(), api.requests
        for i in range(n):
            api.create("nbdexports", NS, export(f"x{i}", SPECS[i % len(SPECS)]))
        await api._notify()
        await _until(api, lambda: len(api.provisioning_at) >= n, timeout, f"{n} exports")
        burst_wall, burst_requests = time.monotonic() - t0, api.requests - before
        burst = [api.provisioning_at[f"x{i}"] - api.created_at[f"x{i}"] for i in range(n)]
        # The burst's follow-up work (children's watch events, status refreshes) finishes
        # first, so the singles see an operator with n exports at rest, not a backlog.
        settle = await _quiet(api, timeout)
        single: list[float] = []
        for i in range(singles):
            name = f"s{i}"
            api.create("nbdexports", NS, export(name, SPECS[i % len(SPECS)]))
            await api._notify()
            await _until(api, lambda n=name: n in api.provisioning_at, timeout, name)  # type: ignore[misc]
            single.append(api.provisioning_at[name] - api.created_at[name])
        return {
            "settle": settle,
            "n": n,
            "burst": burst,
            "burst_wall": burst_wall,
            "single": single,
            "requests_per_export": burst_requests / n,
            "idle_rss": idle_rss,
            "peak_rss": _vm(proc.pid, "VmHWM"),
            "now_rss": _vm(proc.pid, "VmRSS"),
        }
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await runner.cleanup()


def measure_pure(n: int, rounds: int = 3) -> float:
    """Seconds per export of parse + every builder + status, best of ``rounds``."""
    sys.path[:0] = [p for p in (str(ROOT / "operator"), str(ROOT / "api")) if p not in sys.path]
    from nbd_operator import manifests
    from nbd_operator.config import OperatorConfig
    from nbd_operator.spec import parse_spec
    from nbd_operator.status import Observed, compute_status

    config = OperatorConfig(server_metrics_port=9100)
    bodies = []
    for i in range(n):
        body = export(f"x{i}", SPECS[i % len(SPECS)])
        body["metadata"].update(uid=f"u{i}", generation=1)
        bodies.append(body)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for body in bodies:
            spec = parse_spec(body)
            dep = manifests.deployment(spec, config)
            manifests.service(spec)
            manifests.network_policy(spec, config.server_metrics_port)
            if spec.source_kind == "volumeClaimTemplate":
                manifests.persistent_volume_claim(spec)
            obs = Observed(name=spec.name, namespace=NS, generation=1, spec=spec, deployment=dep)
            compute_status(obs, "2026-01-01T00:00:00Z")
        best = min(best, time.perf_counter() - t0)
    return best / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--pure", default="100,300,1000", help="export counts for the pure path")
    parser.add_argument("--exports", default="200,500", help="export counts for the operator")
    parser.add_argument(
        "--singles", type=int, default=20, help="one-at-a-time exports after each burst"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait")
    args = parser.parse_args(argv)
    print("pure reconcile path (parse + Deployment/Service/NetworkPolicy/PVC + status), best of 3")
    print(f"{'exports':>8} {'us/export':>10} {'total ms':>9}")
    for n in (int(x) for x in args.pure.split(",") if x):
        per = measure_pure(n)
        print(f"{n:>8} {per * 1e6:>10.1f} {per * n * 1e3:>9.1f}")
    print("\nreal nbd-operator process vs FastApi: create -> status.phase Provisioning (ms);")
    print("burst: n at once; settle: until the operator is idle; single: one at a time after")
    print(
        f"{'exports':>8} {'burst p50':>9} {'p95':>7} {'max':>7} {'wall s':>7} {'exp/s':>6} "
        f"{'req/exp':>7} {'settle s':>8} {'single p50':>10} {'p95':>6} {'idle MiB':>8} "
        f"{'peak MiB':>8}"
    )
    for n in (int(x) for x in args.exports.split(",") if x):
        r = asyncio.run(measure_operator(n, args.singles, args.timeout))
        b, s = r["burst"], r["single"] or [float("nan")]
        print(
            f"{n:>8} {statistics.median(b) * 1e3:>9.0f} {_pct(b, 0.95) * 1e3:>7.0f} "
            f"{max(b) * 1e3:>7.0f} {r['burst_wall']:>7.1f} {n / r['burst_wall']:>6.1f} "
            f"{r['requests_per_export']:>7.1f} {r['settle']:>8.1f} "
            f"{statistics.median(s) * 1e3:>10.1f} "
            f"{_pct(s, 0.95) * 1e3:>6.1f} {r['idle_rss'] / 2**20:>8.1f} "
            f"{r['peak_rss'] / 2**20:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
