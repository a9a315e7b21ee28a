"""Leader election on a Lease (nbd_operator.leader) against the API substitute: one candidate
leads, a clean stop hands over at once, a crashed leader is replaced only after the lease
duration, racing writers cannot both win, and a leader that loses the Lease stops working."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nbd_operator import leader
from nbd_operator.kube import Conflict, Kube
from operator_harness import NS, FakeApiServer, api_server

FAST = leader.Timing(lease_duration=1.0, renew_deadline=0.6, retry_period=0.05)
LEASE = "nbd-operator-leader"


def holder(server: FakeApiServer) -> str | None:
    lease = server.current("leases", NS, LEASE) or {}
    return (lease.get("spec") or {}).get("holderIdentity")


class Candidate:
    """An operator replica: its work runs while it leads, until told to finish or to stop."""

    def __init__(self, client: Kube, identity: str) -> None:
        self.elector = leader.Elector(client, NS, LEASE, identity, FAST)
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.cancelled = False
        self.task: asyncio.Task[bool] | None = None

    async def work(self) -> None:
        self.started.set()
        try:
            await self.finish.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def run(self) -> Candidate:
        self.task = asyncio.create_task(leader.lead(self.elector, self.work))
        return self


@contextlib.asynccontextmanager
async def candidates(client: Kube, *names: str) -> AsyncIterator[list[Candidate]]:
    running = [Candidate(client, name).run() for name in names]
    try:
        yield running
    finally:
        for c in running:
            assert c.task is not None
            c.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await c.task


async def first_started(cands: list[Candidate], timeout: float = 5) -> Candidate:
    waits = {asyncio.ensure_future(c.started.wait()): c for c in cands}
    done, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for p in pending:
        p.cancel()
    assert done, "nobody became leader"
    return waits[done.pop()]


async def test_one_candidate_leads_and_a_clean_stop_hands_over_at_once() -> None:
    async with api_server() as (server, client), candidates(client, "pod-a", "pod-b") as cands:
        first = await first_started(cands)
        second = next(c for c in cands if c is not first)
        assert holder(server) == first.elector.identity
        # The follower keeps trying but never starts while the leader renews.
        await server.wait_for(
            lambda: (
                (server.current("leases", NS, LEASE) or {}).get("spec", {}).get("renewTime")
                != (server.current("leases", NS, LEASE) or {}).get("spec", {}).get("acquireTime")
            )
        )
        assert not second.started.is_set()

        first.finish.set()  # a clean stop (SIGTERM): the Lease is released, not left to expire
        assert first.task is not None and await asyncio.wait_for(first.task, 5) is True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(second.started.wait(), 5)
        assert loop.time() - t0 < FAST.lease_duration  # no waiting for expiry
        lease = server.current("leases", NS, LEASE) or {}
        assert lease["spec"]["holderIdentity"] == second.elector.identity
        assert lease["spec"]["leaseTransitions"] == 1


async def test_a_crashed_leader_is_replaced_only_after_the_lease_duration() -> None:
    async with api_server() as (server, client):
        crashed = leader.Elector(client, NS, LEASE, "pod-a", FAST)
        assert await crashed.try_acquire_or_renew()  # ...and then it never renews again
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        successor = leader.Elector(client, NS, LEASE, "pod-b", FAST)
        assert not await successor.try_acquire_or_renew()
        await asyncio.wait_for(successor.acquire(), 10)
        assert loop.time() - t0 >= FAST.lease_duration
        assert holder(server) == "pod-b"


async def test_two_candidates_racing_for_the_lease_cannot_both_win() -> None:
    async with api_server() as (server, client):
        free = leader.Elector(client, NS, LEASE, "nobody", FAST)
        assert await free.try_acquire_or_renew()
        await free.release()
        assert holder(server) is None
        for _ in range(5):
            racers = [leader.Elector(client, NS, LEASE, f"pod-{i}", FAST) for i in range(3)]
            wins = await asyncio.gather(*(r.try_acquire_or_renew() for r in racers))
            assert sum(wins) == 1, wins
            winner = racers[wins.index(True)]
            assert holder(server) == winner.identity
            await winner.release()
        # The substitute enforces the resourceVersion precondition the protocol relies on.
        stale = {"metadata": {"resourceVersion": "1"}, "spec": {"holderIdentity": "x"}}
        with pytest.raises(Conflict):
            await client.patch("Lease", NS, LEASE, stale)


async def test_a_leader_that_loses_its_lease_stops_working() -> None:
    async with api_server() as (server, client), candidates(client, "pod-a") as (only,):
        await asyncio.wait_for(only.started.wait(), 5)
        # Someone else takes the Lease (a partition healed the other way, an admin): every
        # renewal now finds another holder, and after the renew deadline the work is stopped.
        await client.patch("Lease", NS, LEASE, {"spec": {"holderIdentity": "intruder"}})
        assert only.task is not None
        assert await asyncio.wait_for(only.task, 5) is False
        assert only.cancelled  # its work was stopped, not left running
        assert holder(server) == "intruder"  # and it did not release someone else's Lease


def test_the_timing_must_let_a_leader_stop_before_its_lease_expires() -> None:
    with pytest.raises(ValueError):
        leader.Timing(lease_duration=10, renew_deadline=15, retry_period=2)
