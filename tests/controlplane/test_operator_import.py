"""The operator's image import against the API substitute: the Job starts, progress read from
the import pod's log lands in status.import, a failed attempt is retried by the Job and the
next one resumes, the server starts only once the Job succeeded, and a Job that gave up says
why in status and Events.

The Job controller and the kubelet are played by ``operator_harness.JobController``. The
importer's lines are recorded ones (tests/controlplane/data/import-*.jsonl, written to the
``nbdserver import --progress json`` contract: that command is not on this branch yet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from operator_harness import (
    NS,
    FakeApiServer,
    JobController,
    api_server,
    bind_claim,
    condition,
    export,
    mark_available,
    running_operator,
)

DATA = Path(__file__).parent / "data"
URL = "https://images.example/disk.img"
SHA = "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"
GiB = 2**30


def recorded(name: str) -> list[str]:
    lines = (DATA / name).read_text().splitlines()
    assert all(json.loads(line)["phase"] for line in lines)  # the contract's shape
    return lines


def imported(server: FakeApiServer, name: str) -> dict[str, Any]:
    obj = server.current("nbdexports", NS, name) or {}
    return dict((obj.get("status") or {}).get("import") or {})


def events(server: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in server.all("events", NS) if e.get("reason") == reason]


async def test_an_import_reports_progress_survives_a_failed_attempt_and_then_serves() -> None:
    spec = {"source": {"image": {"url": URL, "sha256": SHA}}, "size": "2Gi", "readOnly": True}
    async with api_server() as (server, client), running_operator(server, import_poll_interval=0.1):
        await client.create(export("golden", spec))
        job = await server.wait_for(lambda: server.current("jobs", NS, "golden-nbd-import"))
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["import", URL] and args[args.index("--sha256") + 1] == SHA
        assert job["metadata"]["ownerReferences"][0]["name"] == "golden"
        await server.wait_for(lambda: events(server, "ImportStarted"))
        obj = await server.wait_for(
            lambda: (
                condition(server.current("nbdexports", NS, "golden"), "SourceBound").get("reason")
                == "Importing"
                and server.current("nbdexports", NS, "golden")
            )
        )
        assert obj["status"]["phase"] == "Provisioning"
        assert obj["status"]["import"]["phase"] == "Pending"
        await bind_claim(client, "golden-nbd-data")

        jobs = JobController(server, client, "golden-nbd-import")
        await jobs.start_pod()
        first = recorded("import-progress.jsonl")
        jobs.write(*first[:2])
        await server.wait_for(lambda: imported(server, "golden").get("bytes") == 256 * 2**20)
        st = imported(server, "golden")
        assert st["phase"] == "Downloading" and st["percent"] == 25
        assert st["totalBytes"] == GiB and st["rateBytesPerSecond"] == 50 * 2**20
        assert st["attempts"] == 1
        message = (server.current("nbdexports", NS, "golden") or {})["status"]["message"]
        assert message == f"importing {URL}: downloading, 25% of {GiB} bytes, at 52428800 B/s"
        assert server.current("deployments", NS, "golden-nbd") is None

        # The attempt fails (its last word says why); the Job starts another, which resumes.
        jobs.write(first[2])
        await jobs.pod_failed()
        await jobs.start_pod()
        st = await server.wait_for(
            lambda: (s := imported(server, "golden")).get("attempts") == 2 and s
        )
        assert st["phase"] == "Retrying"  # the new pod has not written a line yet
        retrying = await server.wait_for(lambda: events(server, "ImportRetrying"))
        assert "connection reset by peer" in retrying[0]["message"]
        second = recorded("import-resumed.jsonl")
        jobs.write(*second[:2])
        await server.wait_for(lambda: imported(server, "golden").get("percent") == 75)
        assert server.current("deployments", NS, "golden-nbd") is None

        # Verified and done: only the Job's success starts the server.
        jobs.write(*second[2:])
        await server.wait_for(lambda: imported(server, "golden").get("phase") == "Verifying")
        assert server.current("deployments", NS, "golden-nbd") is None
        await jobs.succeed()
        dep = await server.wait_for(lambda: server.current("deployments", NS, "golden-nbd"))
        server_args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert server_args[:2] == ["serve", "/data/disk.img"]
        assert server_args[server_args.index("--format") + 1] == "raw"
        assert "--size" not in server_args
        await mark_available(client, "golden-nbd")
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "golden"))
                and o.get("status", {}).get("phase") == "Ready"
                and o
            )
        )
        assert obj["status"]["import"] == {
            "phase": "Succeeded",
            "bytes": GiB,
            "totalBytes": GiB,
            "percent": 100,
            "message": "imported",
            "attempts": 2,
            "sha256": SHA,
        }
        assert obj["status"]["sizeBytes"] == GiB  # a raw import serves what it copied
        assert condition(obj, "SourceBound")["reason"] == "Imported"
        done = await server.wait_for(lambda: events(server, "ImportSucceeded"))
        assert SHA in done[0]["message"]
        assert len(events(server, "ImportStarted")) == 1


async def test_an_import_that_gives_up_fails_with_its_reason_and_restarts_when_asked() -> None:
    spec = {"source": {"image": {"url": URL + ".missing"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server, import_poll_interval=0.1):
        await client.create(export("broken", spec))
        await server.wait_for(lambda: server.current("jobs", NS, "broken-nbd-import"))
        jobs = JobController(server, client, "broken-nbd-import")
        await jobs.start_pod()
        jobs.write(*recorded("import-not-found.jsonl"))
        await jobs.pod_failed()
        # Exit 2 is permanent: the pod failure policy fails the Job at once.
        await jobs.give_up("PodFailurePolicy")
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "broken"))
                and o.get("status", {}).get("phase") == "Failed"
                and o
            )
        )
        assert obj["status"]["reason"] == "ImportFailed"
        assert "HTTP 404 Not Found" in obj["status"]["message"]
        assert "delete Job broken-nbd-import" in obj["status"]["message"]
        assert obj["status"]["import"]["phase"] == "Failed"
        assert obj["status"]["import"]["attempts"] == 1
        warned = await server.wait_for(lambda: events(server, "ImportFailed"))
        assert warned[0]["type"] == "Warning" and "HTTP 404" in warned[0]["message"]
        assert server.current("deployments", NS, "broken-nbd") is None

        # Deleting the failed Job is the way to try again: a new Job starts.
        old_uid = server.current("jobs", NS, "broken-nbd-import")["metadata"]["uid"]  # type: ignore[index]
        await client.delete("Job", NS, "broken-nbd-import")
        await server.wait_for(
            lambda: (
                (j := server.current("jobs", NS, "broken-nbd-import"))
                and j["metadata"]["uid"] != old_uid
            )
        )
        await server.wait_for(lambda: len(events(server, "ImportStarted")) == 2)
        # Progress is read again (the timer stopped at Failed and runs once more).
        again = JobController(server, client, "broken-nbd-import")
        await again.start_pod()
        again.write(recorded("import-progress.jsonl")[1])
        await server.wait_for(lambda: imported(server, "broken").get("phase") == "Downloading")


async def test_an_import_waits_for_its_secret_and_passes_its_keys_on() -> None:
    spec = {
        "source": {
            "image": {"s3": {"bucket": "golden", "key": "d.qcow2"}, "secretRef": {"name": "s3"}}
        },
        "size": "1Gi",
        "format": "qcow2",
    }
    async with api_server() as (server, client), running_operator(server, import_poll_interval=0.1):
        await client.create(export("s3disk", spec))
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "s3disk"))
                and o.get("status", {}).get("reason") == "ImageSecretNotFound"
                and o
            )
        )
        assert obj["status"]["phase"] == "Failed"
        assert server.current("jobs", NS, "s3disk-nbd-import") is None
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3", "namespace": NS},
            "data": {
                "AWS_ACCESS_KEY_ID": "QQ==",
                "AWS_SECRET_ACCESS_KEY": "Qg==",
                "ca.crt": "Qw==",
            },
        }
        await client.create(secret)
        job = await server.wait_for(lambda: server.current("jobs", NS, "s3disk-nbd-import"))
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert [e["name"] for e in container["env"]] == [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ]
        args = container["args"]
        assert args[:3] == ["import", "s3://golden/d.qcow2", "/data/disk.img"]
        assert args[args.index("--format") + 1] == "qcow2"
        assert args[args.index("--output-format") + 1] == "same"
        assert args[args.index("--ca-bundle") + 1] == "/etc/nbd/image-ca/ca.crt"


async def test_a_writable_stream_serves_the_remote_over_an_overlay_claim() -> None:
    spec = {"source": {"image": {"url": URL, "mode": "stream", "cacheSize": "64Mi"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("live", spec))
        dep = await server.wait_for(lambda: server.current("deployments", NS, "live-nbd"))
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["serve", URL]
        assert args[args.index("--copy-on-write") + 1] == "persistent"
        assert args[args.index("--cache-size") + 1] == str(64 * 2**20)
        overlay = await server.wait_for(
            lambda: server.current("persistentvolumeclaims", NS, "live-nbd-overlay")
        )
        assert overlay["metadata"]["ownerReferences"][0]["name"] == "live"
        assert server.current("jobs", NS, "live-nbd-import") is None
        await mark_available(client, "live-nbd")
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "live"))
                and o.get("status", {}).get("phase") == "Ready"
                and o
            )
        )
        assert condition(obj, "SourceBound")["reason"] == "Streaming"
        assert "import" not in obj["status"]


async def test_an_imported_export_can_be_cloned_and_a_stream_cannot() -> None:
    spec = {"source": {"image": {"url": URL}}, "size": "2Gi", "readOnly": True}
    async with api_server() as (server, client), running_operator(server, import_poll_interval=0.1):
        await client.create(export("golden", spec))
        await server.wait_for(lambda: server.current("jobs", NS, "golden-nbd-import"))
        jobs = JobController(server, client, "golden-nbd-import")
        await jobs.start_pod()
        jobs.write(recorded("import-resumed.jsonl")[-1])
        await jobs.succeed()
        await server.wait_for(lambda: server.current("deployments", NS, "golden-nbd"))
        await client.create(export("copy", {"source": {"export": {"name": "golden"}}}))
        dep = await server.wait_for(lambda: server.current("deployments", NS, "copy-nbd"))
        pod = dep["spec"]["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "golden-nbd-data"
        args = pod["containers"][0]["args"]
        assert args[:2] == ["serve", "/data/disk.img"]
        assert args[args.index("--copy-on-write") + 1] == "persistent"
        overlay = await server.wait_for(
            lambda: server.current("persistentvolumeclaims", NS, "copy-nbd-overlay")
        )
        assert overlay["spec"]["resources"]["requests"]["storage"] == "1088Mi"  # 1 GiB + room

        stream = {"source": {"image": {"url": URL, "mode": "stream"}}, "readOnly": True}
        await client.create(export("live", stream))
        await client.create(export("livecopy", {"source": {"export": {"name": "live"}}}))
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "livecopy"))
                and o.get("status", {}).get("reason") == "BaseNotCloneable"
                and o
            )
        )
        assert obj["status"]["phase"] == "Failed"
