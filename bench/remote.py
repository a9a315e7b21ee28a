"""Serving an image over HTTP: nbdserver's http backend against nbdkit's curl plugin, both
reading the same file from the same local nginx, as ratios.

    .venv/bin/python -m bench.remote [--image-size 256M] [--runtime 5] [--markdown FILE]

For each pair (nbdserver alone / nbdkit curl alone; nbdserver ``--cache-size`` in memory /
nbdkit ``--filter=cache``; nbdserver ``--cache-size --cache-dir`` / the same nbdkit) and each
workload (sequential 1 MiB reads at depth 8, random 4 KiB reads at depth 32): a fresh server is
timed cold, then, after one whole sequential pass has filled its cache, warm. Ratios are
nbdserver/nbdkit (above 1.00x: nbdserver is faster). nbdkit's cache filter keeps blocks in a
temporary file (page cache), as ``--cache-dir`` does; the memory cache is the other flavour.

What it must not do: reach anything but 127.0.0.1, or leave nginx or a server running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.peers import DEFAULT_NBDSERVER, HOST, ServerSpec, free_port, start_server, wait_until
from bench.workloads import Workload, fio_command, parse_fio_json

WORKLOADS = (
    Workload("seq-read", "read", "1M", 8, description="sequential read 1 MiB, depth 8"),
    Workload("rand-read", "randread", "4k", 32, metric="IOPS", description="random 4 KiB, qd32"),
)
_NGINX = """daemon off; pid {d}/nginx.pid; error_log {d}/error.log; worker_processes 2;
events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;
  uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
  server {{ listen {host}:{port}; root {root}; }} }}
"""


@dataclass(frozen=True)
class RemoteSpec(ServerSpec):
    """A server reading ``url`` (the image argument of ``start_server`` is not used)."""

    url: str = ""
    params: tuple[str, ...] = ()  # nbdkit: plugin and filter parameters, after the plugin

    def command(self, image: Path, port: int, workdir: Path) -> list[str]:
        if self.name.startswith("nbdserver"):
            return [self.binary, "serve", self.url, "--bind", HOST, "--port", str(port),
                    *self.extra_args]  # fmt: skip
        return [self.binary, "-f", "-i", HOST, "-p", str(port), *self.extra_args,
                "curl", f"url={self.url}", *self.params]  # fmt: skip


@contextlib.contextmanager
def nginx(root: Path, workdir: Path) -> Iterator[int]:
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_NGINX.format(d=workdir, host=HOST, port=port, root=root))
    proc = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(conf), "-e", "stderr"],
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: _listening(port), time.monotonic() + 10, "nginx")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


def fio(workload: Workload, uri: str, size: int, runtime: float, workdir: Path) -> float:
    out = workdir / f"{workload.name}.json"
    cmd = fio_command(workload, uri, runtime, size, str(out), ramp_time=0)
    subprocess.run(cmd, check=True, capture_output=True, timeout=runtime + 120)
    return parse_fio_json(out.read_text(), workload).figure(workload)


def fill(uri: str) -> None:
    """One whole sequential pass, so every block is in the server's cache."""
    subprocess.run(["nbdcopy", uri, "null:"], check=True, timeout=600)


def pairs(
    url: str, nbdserver: str, cache: str, cache_dir: Path
) -> list[tuple[str, RemoteSpec, RemoteSpec]]:
    cached = ("--cache-size", cache)
    nbdkit_cache = (f"cache-max-size={cache}", "cache-on-read=true")
    nbdkit_cached = RemoteSpec(
        "nbdkit", "nbdkit", url=url, extra_args=("--filter=cache",), params=nbdkit_cache
    )
    return [
        (
            "uncached",
            RemoteSpec("nbdserver", nbdserver, url=url),
            RemoteSpec("nbdkit", "nbdkit", url=url),
        ),
        (f"cache {cache}", RemoteSpec("nbdserver", nbdserver, url=url, extra_args=cached),
         nbdkit_cached),
        (f"disk cache {cache}",
         RemoteSpec("nbdserver", nbdserver, url=url,
                    extra_args=(*cached, "--cache-dir", str(cache_dir))),
         nbdkit_cached),
    ]  # fmt: skip


def measure(spec: RemoteSpec, w: Workload, size: int, runtime: float, d: Path) -> tuple[float, ...]:
    server = start_server(spec, d / "unused", d / spec.name)
    try:
        cold = fio(w, server.uri, size, runtime, d)
        fill(server.uri)
        warm = fio(w, server.uri, size, runtime, d)
    finally:
        server.stop()
    return cold, warm


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=256 << 20)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--cache-size", default="512M")
    p.add_argument("--nbdserver", default=DEFAULT_NBDSERVER)
    p.add_argument("--markdown", metavar="FILE")
    args = p.parse_args(argv)
    for tool in ("nginx", "nbdkit", "fio", "nbdcopy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.remote needs {tool}")
    lines = [
        "| setup | workload | figure | nbdserver cold | nbdkit cold | ratio | "
        "nbdserver warm | nbdkit warm | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        d = Path(tmp)
        d.chmod(0o755)  # nginx's workers run as another user
        (d / "www").mkdir(mode=0o755)
        with open(d / "www" / "disk.img", "wb") as f:
            for _ in range(args.image_size // (1 << 20)):
                f.write(os.urandom(1 << 20))
        with nginx(d / "www", d) as port:
            url = f"http://{HOST}:{port}/disk.img"
            (d / "cache").mkdir()
            for setup, ours, theirs in pairs(url, args.nbdserver, args.cache_size, d / "cache"):
                for w in WORKLOADS:
                    a = measure(ours, w, args.image_size, args.runtime, d)
                    b = measure(theirs, w, args.image_size, args.runtime, d)
                    row = (
                        f"| {setup} | {w.name} | {w.metric} | {a[0]:.0f} | {b[0]:.0f} | "
                        f"{a[0] / b[0]:.2f}x | {a[1]:.0f} | {b[1]:.0f} | {a[1] / b[1]:.2f}x |"
                    )
                    print(row, flush=True)
                    lines.append(row)
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
