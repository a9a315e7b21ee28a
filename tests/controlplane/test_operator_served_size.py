"""status.sizeBytes (kubectl's Size column) for exports whose size only the server knows: a host
device, an image import in a format other than raw (the virtual size is in the image header),
a read-only stream (the remote's size). The operator reads the size nbdserver announces at start
from the head of the serving pod's log, and a clone of such an export is sized from it.

The server pod's log is the REAL nbdserver's: each test runs ``nbdserver serve`` with the exact
command line of the Deployment the operator made (the image path moved to a temporary file, the
port to a free one on 127.0.0.1) and hands what it wrote to the API substitute as the pod's log.
A host device is played by a sparse file (the server sizes both the same way, by seeking to the
end); a qcow2 image is made by qemu-img.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nbd_api import parse_quantity
from nbd_operator.served_size import HEAD_BYTES, announced_size, next_size, serving_pod
from operator_harness import (
    NS,
    FakeApiServer,
    JobController,
    add_node,
    api_server,
    bind_claim,
    condition,
    export,
    mark_available,
    running_operator,
    start_server_pod,
)

from tests.http_origin import Origin
from tests.interop.security_helpers import serve, wait_for

MiB, GiB = 2**20, 2**30
# Where the Deployment's command line reads its data; the test serves a local file instead.
IN_POD_PATHS = ("/dev/nbd-backing", "/data/disk.img")


# --- the pure parts ------------------------------------------------------------------------------
def test_the_announcement_is_found_among_log_lines_and_a_cut_line_is_skipped() -> None:
    line = json.dumps({"export": "disk", "sizeBytes": 5 * MiB, "readOnly": True})
    log = "2026-01-01 INFO nbdserver.server: export 'disk': /x, 5242880 bytes\n" + line + "\n"
    assert announced_size(log, "disk") == 5 * MiB
    assert announced_size(log, "other") is None  # another export's line is not this one's
    assert announced_size(log[: log.index(line) + 20], "disk") is None  # cut by limitBytes
    odd = '{"export": "disk", "sizeBytes": true}\n[1]\n{"export": "disk", "sizeBytes": -1}\n'
    assert announced_size(odd, "disk") is None
    assert 0 < len(log) < HEAD_BYTES


def test_a_failed_read_keeps_the_size_and_a_shrink_is_told() -> None:
    assert next_size(None, 10) == (10, False)
    assert next_size(10, None) == (10, False)  # never cleared by a read that found nothing
    assert next_size(10, 12) == (12, False)  # growth is recorded as it is
    assert next_size(10, 8) == (8, True)  # a shrink is recorded, and told


def test_the_serving_pod_is_the_ready_one_not_a_terminating_one() -> None:
    def pod(name: str, ready: bool, created: str, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
        if deleting:
            meta["deletionTimestamp"] = created
        cond = [{"type": "Ready", "status": "True" if ready else "False"}]
        return {"metadata": meta, "status": {"conditions": cond}}

    pods = [pod("old", True, "2026-01-01T00:00:01Z", deleting=True), pod("new", False, "2")]
    assert serving_pod(pods) is None
    pods.append(pod("newer", True, "2026-01-01T00:00:03Z"))
    assert serving_pod(pods)["metadata"]["name"] == "newer"  # type: ignore[index]


# --- the operator, fed by the real server ------------------------------------------------------
def real_server_log(deployment: dict[str, Any], data: str, tmp_path: Path) -> str:
    """What nbdserver writes when started with ``deployment``'s command line over ``data``,
    once it has announced its export (stopped afterwards)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["nbdserver"] and container["args"][0] == "serve"
    args = [data if a in IN_POD_PATHS else a for a in container["args"][1:]]
    with serve(args, tmp_path) as srv:
        wait_for(lambda: '"sizeBytes"' in srv.log(), 20, "nbdserver to announce its export")
        return srv.log()


async def server_log(server: FakeApiServer, name: str, data: str, tmp_path: Path) -> str:
    dep = await server.wait_for(lambda: server.current("deployments", NS, f"{name}-nbd"))
    return await asyncio.to_thread(real_server_log, dep, data, tmp_path)


def status(server: FakeApiServer, name: str) -> dict[str, Any]:
    return dict((server.current("nbdexports", NS, name) or {}).get("status") or {})


def events(server: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in server.all("events", NS) if e.get("reason") == reason]


async def touch_deployment(client: Any, name: str, mark: str) -> None:
    """Play the Deployment controller noticing a pod change (an event the operator watches)."""
    cond = {"type": "Available", "status": "True", "reason": mark}
    patch = {"status": {"conditions": [cond]}}
    await client.patch("Deployment", NS, name, patch, subresource="status")


def version(server: FakeApiServer, name: str) -> str:
    return str((server.current("nbdexports", NS, name) or {})["metadata"]["resourceVersion"])


def sparse(path: Path, size: int) -> str:
    with path.open("wb") as f:
        f.truncate(size)
    return str(path)


async def test_a_host_devices_size_comes_from_its_server_kept_grown_and_a_shrink_told(
    tmp_path: Path,
) -> None:
    spec = {"source": {"hostDevice": {"nodeName": "n1", "path": "/dev/sdb"}}, "readOnly": True}
    async with api_server() as (server, client), running_operator(server):
        await add_node(client, "n1")
        await client.create(export("dev", spec))
        log = await server_log(server, "dev", sparse(tmp_path / "sdb", 5 * MiB + 4096), tmp_path)
        pod = await start_server_pod(server, client, "dev-nbd", log)
        await mark_available(client, "dev-nbd")
        st = await server.wait_for(
            lambda: (s := status(server, "dev")).get("sizeBytes") and s["phase"] == "Ready" and s
        )
        assert st["sizeBytes"] == 5 * MiB + 4096
        assert st["phase"] == "Ready"

        # The pod is gone (a read finds no serving pod): the recorded size stays.
        await client.delete("Pod", NS, pod)
        assert server.current("pods", NS, pod) is None
        before = version(server, "dev")
        await touch_deployment(client, "dev-nbd", "gone")
        await server.wait_for(lambda: version(server, "dev") != before)  # reconciled since
        assert status(server, "dev")["sizeBytes"] == 5 * MiB + 4096

        # A new pod over a grown device: recorded, no warning.
        grown = sparse(tmp_path / "sdb", 9 * MiB)
        pod = await start_server_pod(
            server, client, "dev-nbd", await server_log(server, "dev", grown, tmp_path)
        )
        await touch_deployment(client, "dev-nbd", "grown")
        await server.wait_for(lambda: status(server, "dev").get("sizeBytes") == 9 * MiB)
        assert not events(server, "SizeShrank")

        # A smaller device: what is served is recorded, with a Warning Event saying so.
        await client.delete("Pod", NS, pod)
        small = sparse(tmp_path / "sdb2", 2 * MiB)
        await start_server_pod(
            server, client, "dev-nbd", await server_log(server, "dev", small, tmp_path)
        )
        await touch_deployment(client, "dev-nbd", "shrunk")
        await server.wait_for(lambda: status(server, "dev").get("sizeBytes") == 2 * MiB)
        shrank = await server.wait_for(lambda: events(server, "SizeShrank"))
        assert shrank[0]["type"] == "Warning" and str(9 * MiB) in shrank[0]["message"]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
async def test_a_qcow2_import_reports_its_virtual_size_and_a_clone_is_sized_from_it(
    tmp_path: Path,
) -> None:
    image = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "3G"], check=True)
    assert image.stat().st_size < MiB  # the header says 3 GiB; the file is tiny
    url = "https://images.example/vm.qcow2"
    # spec.size is the claim's room for the file, smaller than the disk it describes.
    spec = {"source": {"image": {"url": url}}, "format": "qcow2", "size": "1Gi", "readOnly": True}
    async with api_server() as (server, client), running_operator(server, import_poll_interval=0.1):
        await client.create(export("vm", spec))
        await client.create(export("vm-clone", {"source": {"export": {"name": "vm"}}}))
        await server.wait_for(lambda: server.current("jobs", NS, "vm-nbd-import"))
        await bind_claim(client, "vm-nbd-data")
        jobs = JobController(server, client, "vm-nbd-import")
        await jobs.start_pod()
        await jobs.succeed()
        await server.wait_for(
            lambda: (
                condition(server.current("nbdexports", NS, "vm-clone"), "Ready").get("reason")
                == "BaseNotReady"
            )
        )
        log = await server_log(server, "vm", str(image), tmp_path)
        await start_server_pod(server, client, "vm-nbd", log)
        await mark_available(client, "vm-nbd")
        st = await server.wait_for(
            lambda: (s := status(server, "vm")).get("sizeBytes") and s["phase"] == "Ready" and s
        )
        assert st["sizeBytes"] == 3 * GiB  # the virtual size, not the file's nor the room
        assert st["phase"] == "Ready"
        # The room being smaller than the disk is no shrink of anything (seen by the next
        # reconciliation, the first to start from the recorded size).
        before = version(server, "vm")
        await touch_deployment(client, "vm-nbd", "again")
        await server.wait_for(lambda: version(server, "vm") != before)
        assert condition(server.current("nbdexports", NS, "vm"), "SpecValid")["status"] == "True"
        room = (server.current("persistentvolumeclaims", NS, "vm-nbd-data") or {})["spec"]
        assert parse_quantity(room["resources"]["requests"]["storage"]) < 2 * GiB

        overlay = await server.wait_for(
            lambda: server.current("persistentvolumeclaims", NS, "vm-clone-nbd-overlay")
        )
        storage = parse_quantity(overlay["spec"]["resources"]["requests"]["storage"])
        assert storage == 3 * GiB + 3 * GiB // 32  # the base's size plus the overlay's room


async def test_a_read_only_streams_size_is_the_remotes(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    sparse(root / "disk.img", 7 * MiB + 512)
    with Origin(root) as origin:
        url = origin.url("disk.img")
        spec = {"source": {"image": {"url": url, "mode": "stream"}}, "readOnly": True}
        async with api_server() as (server, client), running_operator(server):
            await client.create(export("remote", spec))
            log = await server_log(server, "remote", url, tmp_path)
            await start_server_pod(server, client, "remote-nbd", log)
            await mark_available(client, "remote-nbd")
            st = await server.wait_for(
                lambda: (
                    (s := status(server, "remote")).get("sizeBytes") and s["phase"] == "Ready" and s
                )
            )
            assert st["sizeBytes"] == 7 * MiB + 512
            assert st["phase"] == "Ready"
