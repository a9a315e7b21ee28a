"""The operator, run for real (kopf's reactor with our registry) against the API substitute:
creation, updates (resize, shrink refusal, rolling), deletion with and without attachments."""

from __future__ import annotations

from typing import Any

import nbd_api
from operator_harness import (
    NS,
    FakeApiServer,
    add_node,
    api_server,
    bind_claim,
    condition,
    export,
    mark_available,
    running_operator,
)

GiB = 2**30


def phase_is(server: FakeApiServer, name: str, phase: str) -> Any:
    obj = server.current("nbdexports", NS, name)
    return obj if obj and (obj.get("status") or {}).get("phase") == phase else None


def events(server: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in server.all("events", NS) if e.get("reason") == reason]


def args_of(server: FakeApiServer, name: str) -> list[str]:
    dep = server.current("deployments", NS, f"{name}-nbd") or {}
    containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])
    return list(containers[0].get("args", []))


async def test_a_memory_export_becomes_ready_once_its_server_is_available() -> None:
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("scratch", {"source": {"memory": {}}, "size": "1Gi"}))
        dep = await server.wait_for(lambda: server.current("deployments", NS, "scratch-nbd"))
        assert await server.wait_for(lambda: server.current("services", NS, "scratch-nbd"))
        pending = await server.wait_for(lambda: phase_is(server, "scratch", "Provisioning"))
        assert condition(pending, "ServerAvailable")["status"] == "False"
        assert condition(pending, "Ready")["status"] == "False"

        await mark_available(client, "scratch-nbd")
        obj = await server.wait_for(lambda: phase_is(server, "scratch", "Ready"))
        status = obj["status"]
        assert status["uri"] == f"nbd://scratch-nbd.{NS}.svc:10809/scratch"
        assert status["sizeBytes"] == GiB
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert (status["readOnly"], status["accessMode"], status["tls"]) == (
            False,
            "ReadWriteOnce",
            False,
        )
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Ready": "True",
            "SourceBound": "True",
            "ServerAvailable": "True",
            "SpecValid": "True",
        }
        # Ownership, our own finalizer and annotation prefix (nothing under kopf's default).
        owner = dep["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"]) == ("NBDExport", obj["metadata"]["uid"])
        assert obj["metadata"]["finalizers"] == [nbd_api.FINALIZER]
        keys = set(obj["metadata"].get("annotations", {}))
        assert keys and all(k.startswith("nbd.dev/") for k in keys), keys
        # The agent's typed view reads exactly this.
        view = nbd_api.ExportStatus.from_object(obj)
        assert view.usable and view.size_bytes == GiB
        await server.wait_for(lambda: events(server, "ServerCreated"))
        ready_event = (await server.wait_for(lambda: events(server, "Ready")))[0]
        assert ready_event["message"] == f"serving {status['uri']}"
        assert ready_event["involvedObject"]["uid"] == obj["metadata"]["uid"]


async def test_a_claim_template_waits_for_binding_then_grows_and_refuses_to_shrink() -> None:
    spec = {"source": {"volumeClaimTemplate": {"volumeMode": "Block"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("vol", spec))
        claim = await server.wait_for(
            lambda: server.current("persistentvolumeclaims", NS, "vol-nbd-data")
        )
        assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
        await server.wait_for(lambda: server.current("deployments", NS, "vol-nbd"))
        await mark_available(client, "vol-nbd")
        obj = await server.wait_for(
            lambda: (
                (o := phase_is(server, "vol", "Provisioning"))
                and condition(o, "ServerAvailable")["status"] == "True"
                and o
            )
        )
        assert condition(obj, "SourceBound")["reason"] == "ClaimPending"

        await bind_claim(client, "vol-nbd-data")
        await server.wait_for(lambda: phase_is(server, "vol", "Ready"))

        # Growth: the claim is asked for more, the status reports the new size.
        await client.patch("NBDExport", NS, "vol", {"spec": {"size": "2Gi"}})
        await server.wait_for(
            lambda: (
                (server.current("persistentvolumeclaims", NS, "vol-nbd-data") or {})["spec"][
                    "resources"
                ]["requests"]["storage"]
                == "2Gi"
            )
        )
        grown = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "vol"))
                and o["status"].get("sizeBytes") == 2 * GiB
                and o["status"].get("observedGeneration") == o["metadata"]["generation"]
                and o
            )
        )
        assert grown["metadata"]["generation"] == 2
        await server.wait_for(lambda: events(server, "ClaimResizing"))

        # Shrink: refused with a condition and an Event; the served size stays.
        await client.patch("NBDExport", NS, "vol", {"spec": {"size": "1Gi"}})
        refused = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "vol"))
                and condition(o, "SpecValid").get("reason") == "ShrinkRefused"
                and o
            )
        )
        assert refused["status"]["sizeBytes"] == 2 * GiB
        assert condition(refused, "SpecValid")["status"] == "False"
        assert "at least 2147483648" in condition(refused, "SpecValid")["message"]
        pvc = server.current("persistentvolumeclaims", NS, "vol-nbd-data") or {}
        assert pvc["spec"]["resources"]["requests"]["storage"] == "2Gi"
        await server.wait_for(lambda: events(server, "ShrinkRefused"))


async def test_spec_changes_roll_the_server_with_the_new_command_line() -> None:
    spec = {"source": {"memory": {}}, "size": "64Mi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("roll", spec))
        await server.wait_for(lambda: args_of(server, "roll"))
        assert "--qos-read-iops" not in args_of(server, "roll")

        change = {"qos": {"readIOPS": 100}, "size": "128Mi", "allowedClients": ["10.1.0.0/16"]}
        await client.patch("NBDExport", NS, "roll", {"spec": change})
        await server.wait_for(lambda: "--qos-read-iops" in args_of(server, "roll"))
        args = args_of(server, "roll")
        assert args[args.index("--size") + 1] == str(128 * 2**20)
        assert args[args.index("--allow") + 1] == "10.1.0.0/16"
        policy = await server.wait_for(
            lambda: server.current("networkpolicies", NS, "roll-nbd-clients")
        )
        assert policy["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.1.0.0/16"}}]
        dep = server.current("deployments", NS, "roll-nbd") or {}
        assert dep["metadata"]["generation"] == 2  # one rollout, not one per field

        # Dropping allowedClients removes the policy: every client may connect again.
        await client.patch("NBDExport", NS, "roll", {"spec": {"allowedClients": None}})
        await server.wait_for(
            lambda: server.current("networkpolicies", NS, "roll-nbd-clients") is None
        )


async def test_deletion_removes_the_children_and_the_claim_it_created() -> None:
    spec = {"source": {"volumeClaimTemplate": {}}, "size": "1Gi", "allowedClients": ["10.0.0.0/8"]}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("gone", spec))
        await server.wait_for(lambda: server.current("networkpolicies", NS, "gone-nbd-clients"))
        await server.wait_for(
            lambda: (server.current("nbdexports", NS, "gone") or {}).get("status")
        )
        await client.delete("NBDExport", NS, "gone")
        await server.wait_for(lambda: server.current("nbdexports", NS, "gone") is None)
        assert server.current("deployments", NS, "gone-nbd") is None
        assert server.current("services", NS, "gone-nbd") is None
        assert server.current("networkpolicies", NS, "gone-nbd-clients") is None
        assert server.current("persistentvolumeclaims", NS, "gone-nbd-data") is None


async def test_a_retained_claim_outlives_its_export_without_an_owner() -> None:
    spec = {"source": {"volumeClaimTemplate": {"reclaimPolicy": "Retain"}}, "size": "1Gi"}
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("keep", spec))
        await server.wait_for(lambda: server.current("persistentvolumeclaims", NS, "keep-nbd-data"))
        await server.wait_for(
            lambda: (server.current("nbdexports", NS, "keep") or {}).get("status")
        )
        await client.delete("NBDExport", NS, "keep")
        await server.wait_for(lambda: server.current("nbdexports", NS, "keep") is None)
        claim = server.current("persistentvolumeclaims", NS, "keep-nbd-data")
        assert claim is not None
        assert "ownerReferences" not in claim["metadata"]
        assert claim["metadata"]["annotations"]["nbd.dev/retained-from"] == f"{NS}/keep"
        assert server.current("deployments", NS, "keep-nbd") is None


async def test_deletion_waits_while_a_node_has_the_export_attached() -> None:
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("busy", {"source": {"memory": {}}, "size": "1Gi"}))
        await server.wait_for(lambda: server.current("deployments", NS, "busy-nbd"))
        await mark_available(client, "busy-nbd")
        await server.wait_for(lambda: phase_is(server, "busy", "Ready"))

        # The agent on node-a attaches: the operator mirrors the Lease into status.
        await add_node(client, "node-a")
        lease = nbd_api.attachment_lease(NS, "busy", "node-a", "/dev/nbd3", "ReadWrite")
        await client.create(lease)
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "busy"))
                and o["status"].get("attachmentCount") == 1
                and o
            )
        )
        entry = obj["status"]["attachments"][0]
        assert (entry["nodeName"], entry["device"], entry["mode"]) == (
            "node-a",
            "/dev/nbd3",
            "ReadWrite",
        )

        await client.delete("NBDExport", NS, "busy")
        blocked = await server.wait_for(
            lambda: (
                (o := phase_is(server, "busy", "Terminating"))
                and condition(o, "Ready").get("reason") == "DetachPending"
                and o
            )
        )
        assert "node-a" in blocked["status"]["message"]
        await server.wait_for(lambda: events(server, "DeletionBlocked"))
        assert server.current("deployments", NS, "busy-nbd") is not None  # still serving node-a

        # The node detaches: deletion proceeds by itself.
        await client.delete("Lease", NS, lease["metadata"]["name"])
        await server.wait_for(lambda: server.current("nbdexports", NS, "busy") is None)
        assert server.current("deployments", NS, "busy-nbd") is None
        assert len(events(server, "DeletionBlocked")) == 1  # one Event, not one per retry


async def test_deletion_finishes_as_soon_as_the_last_attachment_lease_goes() -> None:
    # The fallback re-check is a minute away: only the Lease watch can finish this in time.
    async with api_server() as (server, client), running_operator(server, detach_poll_delay=60):
        await client.create(export("prompt", {"source": {"memory": {}}, "size": "1Gi"}))
        await server.wait_for(lambda: server.current("deployments", NS, "prompt-nbd"))
        leases = [
            nbd_api.attachment_lease(NS, "prompt", node, "/dev/nbd0", "ReadOnly")
            for node in ("node-a", "node-b")
        ]
        for lease in leases:
            await add_node(client, lease["spec"]["holderIdentity"])
            await client.create(lease)
        await client.delete("NBDExport", NS, "prompt")
        await server.wait_for(lambda: events(server, "DeletionBlocked"))

        # One node detaches: still blocked, and the message now names only the other.
        await client.delete("Lease", NS, leases[0]["metadata"]["name"])
        blocked = await server.wait_for(
            lambda: (
                (o := phase_is(server, "prompt", "Terminating"))
                and o["status"]["message"].endswith(": node-b")
                and o
            )
        )
        assert server.current("deployments", NS, "prompt-nbd") is not None
        assert blocked["status"]["attachmentCount"] == 1

        await client.delete("Lease", NS, leases[1]["metadata"]["name"])
        await server.wait_for(lambda: server.current("nbdexports", NS, "prompt") is None, 5)
        assert server.current("deployments", NS, "prompt-nbd") is None


async def test_a_raw_block_claim_reports_the_claims_capacity_as_its_size() -> None:
    """No spec.size (the device's size is the claim's): the Size column still says something."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "raw", "namespace": NS},
        "spec": {"volumeMode": "Block", "accessModes": ["ReadWriteOnce"]},
        "status": {"phase": "Bound", "capacity": {"storage": "3Gi"}},
    }
    spec = {"source": {"persistentVolumeClaim": {"claimName": "raw", "volumeMode": "Block"}}}
    async with api_server() as (server, client), running_operator(server):
        await client.create(claim)
        await client.create(export("rawdisk", spec))
        await server.wait_for(lambda: server.current("deployments", NS, "rawdisk-nbd"))
        await mark_available(client, "rawdisk-nbd")
        obj = await server.wait_for(lambda: phase_is(server, "rawdisk", "Ready"))
        assert obj["status"]["sizeBytes"] == 3 * GiB
