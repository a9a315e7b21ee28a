"""The operator, run for real against the API substitute: create, update, delete."""

from __future__ import annotations

from operator_harness import (
    NS,
    api_server,
    condition,
    export,
    mark_available,
    running_operator,
)


async def test_memory_export_gets_server_service_and_ready_status() -> None:
    async with api_server() as (server, client), running_operator(server):
        await client.create(export("scratch", {"source": {"memory": {}}, "size": "1Gi"}))
        await server.wait_for(lambda: server.current("deployments", NS, "scratch-nbd"))
        await server.wait_for(lambda: server.current("services", NS, "scratch-nbd"))
        await mark_available(client, "scratch-nbd")
        obj = await server.wait_for(
            lambda: (
                (o := server.current("nbdexports", NS, "scratch"))
                and o.get("status", {}).get("phase") == "Ready"
                and o
            )
        )
        assert obj["status"]["uri"] == f"nbd://scratch-nbd.{NS}.svc:10809/scratch"
        assert condition(obj, "Ready")["status"] == "True"
