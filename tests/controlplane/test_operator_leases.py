"""Leases left by nodes that no longer exist: the operator removes them (and says so), and
leaves alone every Lease whose node is still there, run for real against the API substitute."""

from __future__ import annotations

from typing import Any

import nbd_api
from operator_harness import NS, FakeApiServer, add_node, api_server, export, running_operator


def lease_names(server: FakeApiServer) -> set[str]:
    return {lease["metadata"]["name"] for lease in server.all("leases", NS)}


def stale_events(server: FakeApiServer) -> list[dict[str, Any]]:
    return [e for e in server.all("events", NS) if e.get("reason") == "StaleLeaseRemoved"]


async def test_a_lease_of_a_node_that_does_not_exist_is_removed_with_an_event() -> None:
    async with api_server() as (server, client):
        await add_node(client, "alive")
        await client.create(export("disk", {"source": {"memory": {}}, "size": "1Gi"}))
        # Left over from before the operator started: a vanished node's write lock and
        # attachment, next to a live node's attachment.
        gone_writer = nbd_api.writer_lease(NS, "disk", "gone")
        gone_attach = nbd_api.attachment_lease(NS, "disk", "gone", "/dev/nbd0", "ReadWrite")
        alive = nbd_api.attachment_lease(NS, "disk", "alive", "/dev/nbd1", "ReadOnly")
        for lease in (gone_writer, gone_attach, alive):
            await client.create(lease)
        async with running_operator(server):
            await server.wait_for(lambda: lease_names(server) == {alive["metadata"]["name"]})
            await server.wait_for(lambda: len(stale_events(server)) == 2)
            messages = sorted(e["message"] for e in stale_events(server))
            assert messages == [
                f"deleted attachment Lease {gone_attach['metadata']['name']}: its node gone "
                "no longer exists",
                f"deleted writer Lease {gone_writer['metadata']['name']}: its node gone "
                "no longer exists",
            ]
            assert all(e["type"] == "Warning" for e in stale_events(server))
            assert stale_events(server)[0]["involvedObject"]["name"] == "disk"
            # The status mirrors only the live node's attachment.
            obj = await server.wait_for(
                lambda: (
                    (o := server.current("nbdexports", NS, "disk"))
                    and (o.get("status") or {}).get("attachmentCount") == 1
                    and o
                )
            )
            assert obj["status"]["attachments"][0]["nodeName"] == "alive"

            # A new Lease naming a node that does not exist goes too (the agent's node was
            # deleted between its Node lookup and the Lease write, say).
            late = nbd_api.writer_lease(NS, "other", "ghost")
            await client.create(late)
            await server.wait_for(lambda: late["metadata"]["name"] not in lease_names(server))
            assert len(stale_events(server)) == 2  # no export "other" to post an Event on
            assert alive["metadata"]["name"] in lease_names(server)


async def test_a_node_leaving_the_cluster_releases_its_leases_and_unblocks_deletion() -> None:
    async with api_server() as (server, client), running_operator(server, detach_poll_delay=60):
        for node in ("node-a", "node-b"):
            await add_node(client, node)
        await client.create(export("busy", {"source": {"memory": {}}, "size": "1Gi"}))
        await client.create(export("calm", {"source": {"memory": {}}, "size": "1Gi"}))
        held = [
            nbd_api.writer_lease(NS, "busy", "node-a"),
            nbd_api.attachment_lease(NS, "busy", "node-a", "/dev/nbd0", "ReadWrite"),
        ]
        other = nbd_api.attachment_lease(NS, "calm", "node-b", "/dev/nbd0", "ReadWrite")
        for lease in (*held, other):
            await client.create(lease)
        await client.delete("NBDExport", NS, "busy")
        await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "busy"))
                and (o.get("status") or {}).get("phase") == "Terminating"
            )
        )
        assert lease_names(server) == {lease["metadata"]["name"] for lease in (*held, other)}

        # node-a is removed from the cluster (its VM is gone): its Leases go, the deletion
        # that waited for it completes, node-b's attachment stays.
        await client.delete("Node", None, "node-a")
        await server.wait_for(lambda: server.current("nbdexports", NS, "busy") is None, 5)
        assert lease_names(server) == {other["metadata"]["name"]}
        assert server.current("deployments", NS, "busy-nbd") is None
        assert server.current("nbdexports", NS, "calm") is not None
