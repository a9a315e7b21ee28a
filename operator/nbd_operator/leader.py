"""Leader election on a coordination.k8s.io Lease, so several operator replicas can run and
only one reconciles.

Why it exists: kopf's own answer (peering) needs kopf's peering CRDs and freezes every replica
that shares the highest priority, which is exactly what identical Deployment replicas do. The
Lease protocol Kubernetes' own controllers use needs nothing but a Lease: the holder renews
``spec.renewTime``; a candidate takes the Lease over only when the record has not changed for
``leaseDurationSeconds`` *as measured on its own clock* (clock skew between nodes does not
matter); every write carries the ``resourceVersion`` it read, so of two candidates writing the
same record the API server accepts one and answers 409 Conflict to the other.

What it must not do: reconcile anything, or let the work run on after a failed renewal:
``lead`` cancels the work once renewals have failed for ``renew_deadline``, which is shorter
than the lease duration, so the old leader has stopped before anyone may take over. (As with
client-go, this assumes the pods' clocks run at about the same *rate*; their offsets do not
matter.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from nbd_operator.kube import Conflict, Kube, KubeError

LOG = logging.getLogger("nbd_operator.leader")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    """client-go's defaults; tests shorten them."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs retry period < renew deadline < lease duration")


class Elector:
    """One candidate: ``identity`` (the pod name) competing for Lease ``namespace/name``."""

    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, timing: Timing = Timing()
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.timing = timing
        self._seen: tuple[Any, ...] | None = None  # the record as last read
        self._seen_at = 0.0  # when it last changed, on our monotonic clock

    def _lease(self, spec: dict[str, Any], version: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if version is not None:
            meta["resourceVersion"] = version  # the precondition: 409 if it moved meanwhile
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": spec,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this candidate holds the Lease afterwards."""
        loop = asyncio.get_running_loop()
        now = _now()
        mine = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_duration)),
            "renewTime": now,
        }
        try:
            lease = await self.kube.get("Lease", self.namespace, self.name)
            if lease is None:
                mine |= {"acquireTime": now, "leaseTransitions": 0}
                await self.kube.create(self._lease(mine))
                self._seen, self._seen_at = None, loop.time()
                return True
            spec = lease.get("spec") or {}
            holder = spec.get("holderIdentity") or ""
            record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
            if record != self._seen:
                self._seen, self._seen_at = record, loop.time()
            duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
            if holder and holder != self.identity and loop.time() < self._seen_at + duration:
                return False  # someone else holds it and has renewed recently enough
            if holder != self.identity:
                transitions = int(spec.get("leaseTransitions") or 0) + 1
                mine |= {"acquireTime": now, "leaseTransitions": transitions}
            version = (lease.get("metadata") or {}).get("resourceVersion")
            patch = self._lease(mine, version)
            await self.kube.patch("Lease", self.namespace, self.name, patch)
        except Conflict:
            return False  # another candidate wrote first
        except (KubeError, aiohttp.ClientError, TimeoutError) as exc:
            # The API unreachable or refusing: not leading this round (a leader that stays
            # cut off gives up after renew_deadline).
            LOG.warning("leader election: %s", exc or type(exc).__name__)
            return False
        return True

    async def acquire(self) -> None:
        """Wait until this candidate leads."""
        while not await self.try_acquire_or_renew():
            # A periodic attempt is the protocol (the holder's renewals are what we observe).
            await asyncio.sleep(self.timing.retry_period)
        LOG.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.name)

    async def keep(self) -> None:
        """Renew until a renewal has failed for ``renew_deadline``; then return (leadership
        is lost or about to be: the caller must stop)."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while loop.time() - last_ok < self.timing.renew_deadline:
            await asyncio.sleep(self.timing.retry_period)
            if await self.try_acquire_or_renew():
                last_ok = loop.time()
        LOG.error("lost the leader Lease %s/%s", self.namespace, self.name)

    async def release(self) -> None:
        """Hand the Lease over at once on a clean stop (an empty holder is free to take)."""
        with contextlib.suppress(KubeError, aiohttp.ClientError, TimeoutError):
            lease = await self.kube.get("Lease", self.namespace, self.name)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            version = (lease.get("metadata") or {}).get("resourceVersion")
            free = {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _now()}
            await self.kube.patch("Lease", self.namespace, self.name, self._lease(free, version))


async def lead(elector: Elector, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
    """Acquire, run ``work()`` while renewing, release. True when ``work`` ended by itself
    (a clean stop; the Lease is handed over), False when leadership was lost (``work`` is
    cancelled at once: reconciling must stop before the Lease can expire for the others)."""
    await elector.acquire()
    keeper = asyncio.create_task(elector.keep())
    worker = asyncio.create_task(work())
    ended = False
    try:
        done, _ = await asyncio.wait({keeper, worker}, return_when=asyncio.FIRST_COMPLETED)
        ended = worker in done
        if ended:
            worker.result()
        return ended
    finally:
        for task in (worker, keeper):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if ended:  # a crashed worker hands over too: a successor need not wait for expiry
            await elector.release()
