"""Keep devices attached across server restarts: LINK_DEAD in, handshake + RECONFIGURE out.

Why it exists: the kernel marks a socket dead when its server goes away and, if the device was
attached with a dead-connection timeout, holds the I/O for that long waiting for a new socket.
This module is the long-running side that provides it: it listens on ``nbd_mc_group``, redoes
the handshake with backoff (reconnect.py decides when), checks the export did not change, and
hands the new sockets over with NBD_CMD_RECONFIGURE (resizing the device when the export only
grew). An export that answers with another identity, or smaller, is different data: the device
gets no socket and is disconnected, so its I/O fails rather than reading that data. A restarted
agent adopts the devices it attached earlier (found by their backend identifier, which also
records the identity seen at attach) and verifies their links at once, since it cannot know
what happened while nobody was listening.

What it must not do: detach anything (a device outlives the agent on purpose) except a device
whose server now serves different data, or give up on a device while it is still attached.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nbd_agent import attach, devices, handshake
from nbd_agent.attach import Attachment, AttachOptions
from nbd_agent.devices import Backend
from nbd_agent.errors import AgentError, DataChanged, NetlinkError
from nbd_agent.handshake import ExportInfo, Target
from nbd_agent.netlink import NbdNetlink
from nbd_agent.reconnect import LinkState, Reconnector
from nbd_agent.tlsproxy import TlsProxy
from nbdserver.protocol.constants import TransmissionFlag

log = logging.getLogger("nbd_agent.persist")

DEFAULT_DEAD_CONN_TIMEOUT = 120  # seconds the kernel holds I/O while we reconnect
RESCAN_INTERVAL = 5.0  # how often the daemon looks for devices attached by someone else


@dataclass
class Kept:
    index: int
    target: Target
    backend: Backend
    expected: ExportInfo


class Keeper:
    """Watches devices and reconnects them. Not thread-safe: drive it from one thread."""

    def __init__(
        self,
        nl: NbdNetlink,
        opts: AttachOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nl = nl
        self.opts = opts or AttachOptions()
        self.clock = clock
        self.reconnector = Reconnector()
        self.kept: dict[int, Kept] = {}
        self.outages: list[tuple[int, float]] = []  # (device index, seconds without a link)
        self.proxies: dict[int, list[TlsProxy]] = {}  # nbds:// devices: the running bridges
        self.refused: dict[int, str] = {}  # device index -> why it was not reattached
        self.unwatched_dead: dict[int, bool] = {}  # LINK_DEAD of devices not kept (yet)
        self.on_refused: Callable[[int, str], None] | None = None  # e.g. the CSI plugin's report
        # Subscribe first: a LINK_DEAD between attach and subscription would be lost.
        self.listener = nl.link_dead_listener()

    def close(self) -> None:
        self.listener.close()

    def keep(self, attachment: Attachment) -> None:
        self.kept[attachment.index] = Kept(
            attachment.index, attachment.target, attachment.backend, attachment.info
        )
        self.proxies[attachment.index] = list(attachment.proxies)
        # A link that died between CONNECT and now (another thread attached it) is handled.
        early = self.unwatched_dead.pop(attachment.index, False)
        self.reconnector.watch(attachment.index, self.clock(), verify=early)

    def adopt(self, *, uri: str | None = None, verify: bool = True) -> list[int]:
        """Watch attached devices whose backend identifier is ours (optionally one URI's)."""
        adopted = []
        for dev in devices.list_devices(self.nl):
            backend = dev.backend
            if not dev.connected or backend is None or dev.index in self.kept:
                continue
            if uri is not None and backend.uri != uri:
                continue
            try:
                target = handshake.parse_uri(backend.uri)
            except AgentError as exc:
                log.warning("cannot adopt %s: %s", dev.path, exc)
                continue
            flags = TransmissionFlag.NBD_FLAG_READ_ONLY if dev.read_only else 0
            expected = ExportInfo(
                dev.size_bytes, int(flags), None, from_sysfs=True, identity=backend.identity
            )
            self.kept[dev.index] = Kept(dev.index, target, backend, expected)
            self.reconnector.watch(dev.index, self.clock(), verify=verify)
            log.warning("adopted %s (%s)", dev.path, backend.uri)
            adopted.append(dev.index)
        return adopted

    def step(self, max_wait: float) -> None:
        """Wait for LINK_DEAD (at most until the next due attempt), then run due attempts."""
        now = self.clock()
        deadline = self.reconnector.next_deadline()
        wait = max_wait if deadline is None else max(0.0, min(max_wait, deadline - now))
        for index in self.listener.read(wait):
            watch = self.reconnector.watches.get(index)
            was_healthy = watch is not None and watch.state is LinkState.HEALTHY
            # One LINK_DEAD per dead socket: a multi-connection device sends several.
            if self.reconnector.link_dead(index, self.clock()):
                if was_healthy:
                    log.warning("/dev/nbd%d: link dead, reconnecting", index)
            elif len(self.unwatched_dead) < 4096:  # perhaps attached but not handed over yet
                self.unwatched_dead[index] = True
        for w in self.reconnector.due(self.clock()):
            self._attempt(w.index)

    def _attempt(self, index: int) -> None:
        kept = self.kept[index]
        if not devices.is_connected(self.nl, index):
            log.warning("/dev/nbd%d was detached; no longer watching it", index)
            self._forget(index)
            return
        try:
            socks, info = attach.open_connections(
                kept.target, kept.backend.connections, self.opts, expected=kept.expected
            )
        except DataChanged as exc:
            self._refuse(index, str(exc))
            return
        except AgentError as exc:
            delay = self.reconnector.failed(index, self.clock(), str(exc))
            log.info("/dev/nbd%d: reconnect failed (%s); next try in %.2fs", index, exc, delay)
            return
        grown = attach.grew(kept.expected, info)
        ksocks, proxies = attach.kernel_sockets(kept.target, socks)
        try:
            # Sockets first, the new size in a second RECONFIGURE: the kernel resizes with the
            # queue frozen, which waits for the I/O held since the link died, and that I/O only
            # completes over the new socket (one message would hang until dead_conn_timeout).
            self.nl.reconfigure(
                index, [s.fileno() for s in ksocks], backend_identifier=kept.backend.identifier()
            )
        except NetlinkError as exc:
            attach.close_proxies(proxies)
            if exc.errno == errno.EINVAL and not devices.is_connected(self.nl, index):
                self._forget(index)
                return
            self.reconnector.failed(index, self.clock(), str(exc))
            log.warning("/dev/nbd%d: RECONFIGURE failed: %s", index, exc)
            return
        finally:
            attach.close_all(ksocks)
        if grown and not self._resize(index, kept, info.size):
            info = dataclasses.replace(info, size=kept.expected.size)  # retried next reconnect
        # From now on compare with what the server said (its identity too, if it told one only
        # now; the backend identifier keeps the one seen at attach, the kernel insists on it).
        kept.expected = dataclasses.replace(info, identity=info.identity or kept.expected.identity)
        # Proxies whose socket the kernel did not take see EOF and stop by themselves.
        self.proxies[index] = [p for p in self.proxies.get(index, []) + proxies if p.alive]
        outage = self.reconnector.succeeded(index, self.clock())
        self.outages.append((index, outage))
        log.warning("/dev/nbd%d: reconnected after %.3fs", index, outage)

    def _resize(self, index: int, kept: Kept, size: int) -> bool:
        try:
            self.nl.reconfigure(
                index, [], backend_identifier=kept.backend.identifier(), size_bytes=size
            )
        except NetlinkError as exc:
            log.error("/dev/nbd%d: grew to %d bytes; resize failed: %s", index, size, exc)
            return False
        log.warning("/dev/nbd%d: the export grew to %d bytes; device resized", index, size)
        return True

    def _refuse(self, index: int, reason: str) -> None:
        """Different data answers under the export's name: give the kernel no socket and end
        the device's configuration, so queued and future I/O fails (EIO) instead of reading
        the wrong data. A mounted device keeps its number (the kernel will not reuse it while
        it is held) until it is unmounted and detached."""
        log.error("/dev/nbd%d: %s; not reattaching, the device fails its I/O", index, reason)
        self.refused[index] = reason
        try:
            self.nl.disconnect(index)
        except AgentError as exc:
            log.error("/dev/nbd%d: DISCONNECT failed: %s", index, exc)
        self._forget(index)
        if self.on_refused is not None:
            self.on_refused(index, reason)

    def forget(self, index: int) -> None:
        """Stop watching a device (before detaching it): its TLS bridges, if any, close."""
        self._forget(index)

    def _forget(self, index: int) -> None:
        self.unwatched_dead.pop(index, None)
        attach.close_proxies(self.proxies.pop(index, []))
        self.kept.pop(index, None)
        self.reconnector.forget(index)

    def run(self, stop: threading.Event, *, rescan: bool = False) -> None:
        last_scan = self.clock()
        while not stop.is_set():
            self.step(0.5)
            if rescan and self.clock() - last_scan >= RESCAN_INTERVAL:
                last_scan = self.clock()
                self.adopt(verify=False)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def attach_and_watch(uri: str, opts: AttachOptions) -> int:
    """``nbd-agent attach --persist``: attach (or adopt the device already attached to this
    URI), print the device, then keep it attached until SIGTERM/SIGINT. The device stays."""
    stop = _stop_on_signals()
    opts.allow_tls_proxy = True  # this process stays, so it can carry TLS for the kernel
    with NbdNetlink() as nl:
        keeper = Keeper(nl, opts)
        try:
            adopted = [i for i in keeper.adopt(uri=uri) if opts.device is None or i == opts.device]
            if adopted:
                index = adopted[0]
            else:
                attachment = attach.attach(uri, opts, nl=nl)
                keeper.keep(attachment)
                index = attachment.index
            print(f"/dev/nbd{index}", flush=True)
            keeper.run(stop)
        finally:
            keeper.close()
    return 0


def watch_all(opts: AttachOptions) -> int:
    """``nbd-agent watch``: the daemon. Adopt every device this agent attached, keep them."""
    stop = _stop_on_signals()
    opts.allow_tls_proxy = True
    with NbdNetlink() as nl:
        keeper = Keeper(nl, opts)
        try:
            keeper.adopt()
            keeper.run(stop, rescan=True)
        finally:
            keeper.close()
    return 0
