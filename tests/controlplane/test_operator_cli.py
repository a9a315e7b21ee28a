"""``nbd-operator`` through its real entry point: a separate process that logs in from a
kubeconfig (kopf's kubernetes_asyncio path, as on a developer machine), watches all namespaces,
serves an export, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys

import yaml
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


async def test_with_leader_election_it_reconciles_under_its_lease_and_releases_it(
    tmp_path: pathlib.Path,
) -> None:
    async with api_server() as (server, client):
        config = kubeconfig(tmp_path / "config", str(server.url).rstrip("/"))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path),
            "KUBECONFIG": str(config),
            "PYTHONPATH": os.pathsep.join(str(ROOT / p) for p in ("operator", "api")),
            "POD_NAME": "operator-7f9c-abcde",
            "POD_NAMESPACE": NS,
        }
        code = "import sys; from nbd_operator.cli import main; sys.exit(main(sys.argv[1:]))"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, "--leader-elect", "--leader-lease", "ops", env=env,
            cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            lease = await server.wait_for(lambda: server.current("leases", NS, "ops"), timeout=60)
            assert lease["spec"]["holderIdentity"] == "operator-7f9c-abcde"
            await client.create(export("elected", {"source": {"memory": {}}, "size": "1Gi"}))
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
