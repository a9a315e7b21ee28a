"""``nbd-operator`` through its real entry point: a separate process that logs in from a
kubeconfig (kubernetes_asyncio's loader, as on a developer machine) or the one and context its
flags name, watches all namespaces, serves an export, and stops cleanly on SIGTERM; without a
cluster to log in to it says so in one line and exits 2."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import signal
import socket
import sys
import tomllib

import aiohttp
import nbd_api
import pytest
import yaml
from nbd_operator import login
from operator_harness import NS, api_server, export

ROOT = pathlib.Path(__file__).resolve().parents[2]


def kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_the_command_logs_in_from_kubeconfig_serves_and_stops_on_sigterm(
    tmp_path: pathlib.Path,
) -> None:
    async with api_server() as (server, client):
        config = kubeconfig(tmp_path / "config", str(server.url).rstrip("/"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "KUBECONFIG": str(config),
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "api")),
            "NBD_OPERATOR_SERVER_IMAGE": "example.test/nbd:cli",
        }
        code = "import sys; from nbd_operator.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await client.create(export("viacli", {"source": {"memory": {}}, "size": "1Gi"}))
            dep = await server.wait_for(
                lambda: server.current("deployments", NS, "viacli-nbd"), timeout=60
            )
            image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image == "example.test/nbd:cli"
            # The request carried the kubeconfig's token: kopf's login path was used.
            assert any(r.headers.get("Authorization") == "Bearer not-checked" for r in list(server))
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, output.decode()[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        return resp.status


async def test_with_leader_election_it_stands_by_then_leads_and_hands_the_lease_over(
    tmp_path: pathlib.Path,
) -> None:
    async with api_server() as (server, client):
        # Another replica leads (renewed just now, for an hour).
        held = nbd_api.writer_lease(NS, "x", "other-pod")  # any Lease shape; renamed below
        held["metadata"] = {"name": "ops", "namespace": NS}
        held["spec"] = {
            "holderIdentity": "other-pod",
            "leaseDurationSeconds": 3600,
            "renewTime": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        await client.create(held)
        await client.create(export("elected", {"source": {"memory": {}}, "size": "1Gi"}))
        config = kubeconfig(tmp_path / "config", str(server.url).rstrip("/"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "KUBECONFIG": str(config),
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "api")),
            "POD_NAME": "operator-7f9c-abcde",
            "POD_NAMESPACE": NS,
        }
        port = free_port()
        code = "import sys; from nbd_operator.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "--leader-elect", "--leader-lease", "ops",
            f"--liveness=http://127.0.0.1:{port}/healthz", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            # Standing by: it reads the Lease (its health endpoint is up before that), says it
            # is healthy (a standby pod must be live and ready), and reconciles nothing.
            await server.wait_for(
                lambda: any(
                    r.resource
                    and r.resource.plural == "leases"
                    and r.headers.get("Authorization") == "Bearer not-checked"  # the process's
                    for r in list(server)
                ),
                timeout=60,
            )
            assert await healthz(port) == 200
            assert server.current("deployments", NS, "elected-nbd") is None
            # The leader hands over: this replica takes the Lease and reconciles.
            await client.patch("Lease", NS, "ops", {"spec": {"holderIdentity": None}})
            lease = await server.wait_for(
                lambda: (
                    (o := server.current("leases", NS, "ops"))
                    and o["spec"].get("holderIdentity") == "operator-7f9c-abcde"
                    and o
                ),
                timeout=30,
            )
            assert lease["spec"]["leaseTransitions"] >= 1
            await server.wait_for(
                lambda: server.current("deployments", NS, "elected-nbd"), timeout=60
            )
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, output.decode()[-2000:]
        # A clean stop hands the Lease over instead of leaving it to expire.
        released = server.current("leases", NS, "ops") or {}
        assert not released.get("spec", {}).get("holderIdentity"), released


ENTRY = "import sys; from nbd_operator.entry import main; sys.exit(main())"  # the console script


def bare_env(home: pathlib.Path, **extra: str) -> dict[str, str]:
    """No KUBECONFIG, an empty home, not in a cluster: only what the test adds."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "api")),
        **extra,
    }


async def run_to_exit(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run the console entry; it must exit on its own well within the timeout."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ENTRY, *args, env=env, cwd=env["HOME"],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_without_any_kubeconfig_it_says_so_in_one_line_and_exits_2(
    tmp_path: pathlib.Path,
) -> None:
    """Not a traceback and a retry every minute: one line, at once, exit 2."""
    code, out, err = await run_to_exit(bare_env(tmp_path))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("nbd-operator: no Kubernetes cluster to connect to")
    assert "KUBECONFIG is unset" in err and "--kubeconfig" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--kubeconfig", "missing.yaml"], "--kubeconfig missing.yaml: no such file"),
        (["--kubeconfig", "config", "--context", "nowhere"], "context nowhere"),
    ],
)
async def test_a_wrong_kubeconfig_or_context_is_one_line_and_exit_2(
    tmp_path: pathlib.Path, args: list[str], says: str
) -> None:
    kubeconfig(tmp_path / "config", "http://127.0.0.1:9")
    code, _, err = await run_to_exit(bare_env(tmp_path), *args)
    assert (code, err.count("\n")) == (2, 1), err
    assert says in err


async def test_version_prints_the_package_version(tmp_path: pathlib.Path) -> None:
    code, out, _ = await run_to_exit(bare_env(tmp_path), "--version")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert (code, out) == (0, f"nbd-operator {project['version']}\n")


async def test_kubeconfig_and_context_flags_choose_the_cluster_and_user(
    tmp_path: pathlib.Path,
) -> None:
    """A kubeconfig elsewhere than KUBECONFIG and ~/.kube/config, whose current context points
    at nothing: --context makes the operator log in to the fake API as that context's user."""
    async with api_server() as (server, client):
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "fake", "cluster": {"server": str(server.url).rstrip("/")}},
                {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}},
            ],
            "users": [
                {"name": "chosen", "user": {"token": "chosen-token"}},
                {"name": "default", "user": {"token": "default-token"}},
            ],
            "contexts": [
                {"name": "current", "context": {"cluster": "nowhere", "user": "default"}},
                {"name": "picked", "context": {"cluster": "fake", "user": "chosen"}},
            ],
            "current-context": "current",
        }
        path = tmp_path / "elsewhere.yaml"
        path.write_text(yaml.safe_dump(config))
        env = bare_env(tmp_path, NBD_OPERATOR_SERVER_IMAGE="example.test/nbd:ctx")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", ENTRY, "--kubeconfig", str(path), "--context", "picked",
            env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            await client.create(export("viactx", {"source": {"memory": {}}, "size": "1Gi"}))
            await server.wait_for(
                lambda: server.current("deployments", NS, "viactx-nbd"), timeout=60
            )
            tokens = {r.headers.get("Authorization") for r in list(server)} - {None}
            assert "Bearer chosen-token" in tokens
            assert "Bearer default-token" not in tokens
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, output.decode()[-2000:]


def test_the_login_source_is_the_flag_then_the_cluster_then_kubeconfig_then_home(
    tmp_path: pathlib.Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token")
    flag = kubeconfig(tmp_path / "flag.yaml", "http://127.0.0.1:9")
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    kubeconfig(home / ".kube" / "config", "http://127.0.0.1:9")
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBECONFIG": "/elsewhere"}

    def find(flag: str | None, context: str | None, env: dict[str, str]) -> login.LoginSource:
        return login.find(flag, context, env, home, token)

    assert find(str(flag), "c", pod) == login.LoginSource(str(flag), "c")
    assert find(None, None, pod) == login.LoginSource(None)  # in a pod: its service account
    assert find(None, "c", pod) == login.LoginSource("/elsewhere", "c")  # a context: kubeconfig
    assert find(None, None, {"KUBECONFIG": "/elsewhere"}) == login.LoginSource("/elsewhere")
    assert find(None, None, {}) == login.LoginSource(str(home / ".kube" / "config"))
    token.unlink()
    assert find(None, None, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).kubeconfig is not None
