"""The operator with inputs that are missing or wrong: it reports Failed with a reason that says
what to fix, and recovers by itself once fixed. Also: drift repair and copy-on-write clones."""

from __future__ import annotations

from typing import Any

from operator_harness import (
    NS,
    FakeApiServer,
    api_server,
    condition,
    export,
    mark_available,
    running_operator,
)


def failed_with(server: FakeApiServer, name: str, reason: str) -> Any:
    obj = server.current("nbdexports", NS, name)
    failed = obj is not None and (obj.get("status") or {}).get("phase") == "Failed"
    return obj if failed and condition(obj, "SourceBound").get("reason") == reason else None


def warned(server: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in server.all("events", NS)
        if e.get("reason") == reason and e.get("type") == "Warning"
    ]


def status_writes(server: FakeApiServer, name: str) -> list[Any]:
    return [
        r
        for r in list(server)
        if r.subresource == "status" and r.name == name and str(r.method.value) == "PATCH"
    ]


async def test_a_missing_claim_fails_clearly_and_recovers_when_created() -> None:
    spec = {"source": {"persistentVolumeClaim": {"claimName": "images"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("fromclaim", spec))
        obj = await server.wait_for(lambda: failed_with(server, "fromclaim", "ClaimNotFound"))
        assert f"PersistentVolumeClaim {NS}/images does not exist" in obj["status"]["message"]
        assert obj["status"]["reason"] == "ClaimNotFound"  # kubectl get's Reason column
        assert condition(obj, "Ready")["status"] == "False"
        assert server.current("deployments", NS, "fromclaim-nbd") is None
        await server.wait_for(lambda: warned(server, "ClaimNotFound"))
        # kopf retries and fails the same way again (a second status write) ...
        await server.wait_for(lambda: len(status_writes(server, "fromclaim")) >= 2)

        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "images", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "2Gi"}},
            },
            "status": {"phase": "Bound", "capacity": {"storage": "2Gi"}},
        }
        await client.create(claim)
        dep = await server.wait_for(lambda: server.current("deployments", NS, "fromclaim-nbd"))
        volume = dep["spec"]["template"]["spec"]["volumes"][0]
        assert volume["persistentVolumeClaim"]["claimName"] == "images"
        await mark_available(client, "fromclaim-nbd")
        ready = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "fromclaim"))
                and o["status"].get("phase") == "Ready"
                and o
            )
        )
        assert condition(ready, "SourceBound")["reason"] == "ClaimBound"
        assert "reason" not in ready["status"]  # the Reason column empties once it is Ready
        assert ready["status"]["sizeBytes"] == 2**30  # the Size column: what is served
        # ... without repeating the Event (Events are posted in order: ServerCreated came later).
        await server.wait_for(
            lambda: [e for e in server.all("events", NS) if e.get("reason") == "ServerCreated"]
        )
        assert len(warned(server, "ClaimNotFound")) == 1


async def test_a_claim_of_the_wrong_volume_mode_is_reported() -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "raw", "namespace": NS},
        "spec": {"volumeMode": "Block", "accessModes": ["ReadWriteOnce"]},
    }
    spec = {"source": {"persistentVolumeClaim": {"claimName": "raw"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(claim)
        await client.create(export("mismatch", spec))
        obj = await server.wait_for(lambda: failed_with(server, "mismatch", "VolumeModeMismatch"))
        assert "is Block, the export says Filesystem" in obj["status"]["message"]


async def test_a_missing_tls_secret_fails_and_recovers_with_an_nbds_uri() -> None:
    spec = {
        "source": {"memory": {}},
        "size": "1Gi",
        "tls": {"secretName": "tls-pair", "requireClientCertificate": True},
    }
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": "tls-pair", "namespace": NS},
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
    }
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("secure", spec))
        obj = await server.wait_for(lambda: failed_with(server, "secure", "TLSSecretNotFound"))
        assert "tls-pair does not exist" in obj["status"]["message"]

        # Present but without the CA that client certificates need: still a clear failure.
        await client.create(secret)
        obj = await server.wait_for(lambda: failed_with(server, "secure", "TLSSecretIncomplete"))
        assert "lacks ca.crt" in obj["status"]["message"]

        await client.patch("Secret", NS, "tls-pair", {"data": {"ca.crt": "Y2E="}})
        dep = await server.wait_for(lambda: server.current("deployments", NS, "secure-nbd"))
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert "--tls-ca" in container["args"]
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "secure"))
                and o["status"].get("phase") == "Provisioning"
                and o
            )
        )
        assert obj["status"]["uri"] == f"nbds://secure-nbd.{NS}.svc:10809/secure"


async def test_a_host_device_on_an_unknown_node_recovers_when_the_node_joins() -> None:
    spec = {"source": {"hostDevice": {"nodeName": "node-x", "path": "/dev/sdc"}}}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("hostdisk", spec))
        obj = await server.wait_for(lambda: failed_with(server, "hostdisk", "NodeNotFound"))
        assert "node node-x does not exist" in obj["status"]["message"]
        await client.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-x"}})
        dep = await server.wait_for(lambda: server.current("deployments", NS, "hostdisk-nbd"))
        pod = dep["spec"]["template"]["spec"]
        assert pod["affinity"]["nodeAffinity"]


async def test_a_deleted_server_deployment_is_put_back() -> None:
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("drift", {"source": {"memory": {}}, "size": "1Gi"}))
        first = await server.wait_for(lambda: server.current("deployments", NS, "drift-nbd"))
        await client.delete("Deployment", NS, "drift-nbd")
        again = await server.wait_for(
            lambda: (
                (d := server.current("deployments", NS, "drift-nbd"))
                and d["metadata"]["uid"] != first["metadata"]["uid"]
                and d
            )
        )
        assert again["spec"]["template"]["spec"]["containers"][0]["args"][:2] == [
            "serve",
            "/scratch/disk.img",
        ]


async def test_a_clone_runs_beside_its_read_only_base_and_refuses_a_writable_one() -> None:
    base = {"source": {"volumeClaimTemplate": {}}, "size": "1Gi", "readOnly": True}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("golden", base))
        await server.wait_for(lambda: server.current("deployments", NS, "golden-nbd"))
        await client.create(export("copy", {"source": {"export": {"name": "golden"}}}))
        dep = await server.wait_for(lambda: server.current("deployments", NS, "copy-nbd"))
        pod = dep["spec"]["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": "golden-nbd-data",
            "readOnly": True,
        }
        args = pod["containers"][0]["args"]
        assert args[args.index("--copy-on-write") + 1] == "persistent"
        assert pod["affinity"]["podAffinity"]
        # The clone's writes live on a claim the operator owns, not in an emptyDir.
        cow = next(v for v in pod["volumes"] if v["name"] == "cow")
        assert cow == {"name": "cow", "persistentVolumeClaim": {"claimName": "copy-nbd-overlay"}}
        overlay = await server.wait_for(
            lambda: server.current("persistentvolumeclaims", NS, "copy-nbd-overlay")
        )
        assert overlay["metadata"]["ownerReferences"][0]["name"] == "copy"
        assert overlay["spec"]["accessModes"] == ["ReadWriteOnce"]

        await client.create(export("writable", {"source": {"memory": {}}, "size": "1Gi"}))
        await client.create(export("badcopy", {"source": {"export": {"name": "writable"}}}))
        obj = await server.wait_for(lambda: failed_with(server, "badcopy", "BaseNotReadOnly"))
        assert "must be readOnly" in obj["status"]["message"]
        assert server.current("deployments", NS, "badcopy-nbd") is None


async def test_a_clone_inherits_its_bases_format() -> None:
    base = {"source": {"volumeClaimTemplate": {}}, "size": "1Gi", "readOnly": True}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("golden", {**base, "format": "qcow2"}))
        await server.wait_for(lambda: server.current("deployments", NS, "golden-nbd"))
        await client.create(export("copy", {"source": {"export": {"name": "golden"}}}))
        dep = await server.wait_for(lambda: server.current("deployments", NS, "copy-nbd"))
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--format") + 1] == "qcow2"
        assert args[args.index("--copy-on-write") + 1] == "persistent"
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "copy"))
                and (o.get("status") or {}).get("format")
                and o
            )
        )
        assert obj["status"]["format"] == "qcow2"  # kubectl get -o wide shows what is served
        golden = server.current("nbdexports", NS, "golden") or {}
        assert golden["status"]["format"] == "qcow2"


async def test_an_invalid_spec_that_slipped_past_the_schema_fails_permanently() -> None:
    async with api_server() as (server, client), running_operator(server):
        # The emulator has no CRD validation; a real API server would have refused this.
        await client.create(export("nosize", {"source": {"memory": {}}}))
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "nosize"))
                and (o.get("status") or {}).get("phase") == "Failed"
                and o
            )
        )
        assert condition(obj, "SpecValid")["reason"] == "InvalidSpec"
        assert "spec.size is required" in condition(obj, "SpecValid")["message"]
        # Fixing the spec is an update: the operator serves it.
        await client.patch("NBDExport", NS, "nosize", {"spec": {"size": "1Gi"}})
        await server.wait_for(lambda: server.current("deployments", NS, "nosize-nbd"))


async def test_an_api_failure_is_reported_and_retried_until_it_passes() -> None:
    async with api_server() as (server, client), running_operator(server):
        server.fail("POST", "deployments", times=2)
        await client.create(export("flaky", {"source": {"memory": {}}, "size": "1Gi"}))
        await server.wait_for(lambda: server.current("deployments", NS, "flaky-nbd"))
        failures = [e for e in server.all("events", NS) if e.get("reason") == "ApplyFailed"]
        assert len(failures) == 2
        assert "HTTP 500" in failures[0]["message"]


async def test_a_restarted_operator_resumes_and_repairs_what_changed_meanwhile() -> None:
    async with api_server() as (server, client):
        async with running_operator(server):
            await client.create(export("resume", {"source": {"memory": {}}, "size": "1Gi"}))
            first = await server.wait_for(lambda: server.current("deployments", NS, "resume-nbd"))
        # While no operator runs, someone deletes the server.
        await client.delete("Deployment", NS, "resume-nbd")
        assert server.current("deployments", NS, "resume-nbd") is None
        async with running_operator(server):
            again = await server.wait_for(lambda: server.current("deployments", NS, "resume-nbd"))
        assert again["metadata"]["uid"] != first["metadata"]["uid"]
