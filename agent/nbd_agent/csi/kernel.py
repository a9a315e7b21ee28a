"""``Attacher`` over the agent's kernel attach layer, with one thread keeping devices attached.

Why it exists: the CSI node service runs its calls in gRPC's thread pool, while the agent's
attach layer is plain blocking calls (``attach.attach``/``attach.detach``, each on its own
netlink socket) and its reconnect engine (``persist.Keeper``) must be driven from a single
thread. This class adapts the first and owns the second: attaches and detaches happen in the
calling thread; "keep this device", "forget it" and "adopt it" are handed to the keeper thread
through a queue, which applies them between its LINK_DEAD waits (``nbds://`` devices also keep
their TLS bridge threads in this process). Devices are attached with a
dead-connection timeout, so while the keeper reconnects after a server restart the kernel holds
I/O instead of failing it.

What it must not do: mount, format or know volumes; call Keeper methods from any thread but its
own; detach a device that is still in use (the attach layer refuses, and so do we).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from nbd_agent import attach, devices, persist
from nbd_agent.csi.attacher import as_csi
from nbd_agent.errors import AgentError, DeviceNotFound
from nbd_agent.netlink import NbdNetlink
from nbd_agent.reconnect import LinkState

log = logging.getLogger(__name__)
_STEP = 0.2  # longest wait of the keeper loop before it looks at its queue again
_LISTEN_WAIT = 10.0  # how long an attach waits for the keeper thread to listen


class KernelAttacher:
    """The real ``Attacher``. ``start()`` launches the keeper thread, ``close()`` stops it
    (devices stay attached: a restarted agent adopts them)."""

    def __init__(
        self,
        *,
        dead_conn_timeout: int = persist.DEFAULT_DEAD_CONN_TIMEOUT,
        timeout: int | None = None,
    ) -> None:
        self._dead_conn_timeout = dead_conn_timeout
        self._timeout = timeout
        self._requests: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper: persist.Keeper | None = None
        self._listening = threading.Event()  # the keeper hears LINK_DEAD from now on
        self._states: dict[int, LinkState] = {}  # snapshot published by the keeper thread
        self._refused: dict[int, str] = {}  # device index -> why it was not reattached
        self._states_lock = threading.Lock()
        # Told (in the keeper thread) when a device is refused: the node plugin's Event.
        self.on_refused: Callable[[str, str], None] | None = None

    # ---- keeper thread ----

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nbd-keeper", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with NbdNetlink() as nl:
                    keeper = persist.Keeper(nl, attach.AttachOptions())
                    keeper.on_refused = self._refuse
                    self._keeper = keeper
                    self._listening.set()
                    try:
                        self._loop(keeper)
                    finally:
                        self._listening.clear()
                        keeper.close()
                        self._keeper = None
            except AgentError as exc:  # e.g. the nbd module is not loaded yet
                log.warning("keeper: %s; retrying", exc)
                self._stop.wait(2.0)

    def _loop(self, keeper: persist.Keeper) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    what, arg = self._requests.get_nowait()
                except queue.Empty:
                    break
                if what == "keep":
                    assert isinstance(arg, attach.Attachment)
                    keeper.keep(arg)
                elif what == "forget":
                    assert isinstance(arg, int)
                    keeper.forget(arg)  # also closes the device's TLS bridges
                elif what == "adopt":
                    assert isinstance(arg, str)
                    keeper.adopt(uri=arg)
            keeper.step(_STEP)
            with self._states_lock:
                self._states = {i: w.state for i, w in keeper.reconnector.watches.items()}

    def _refuse(self, index: int, reason: str) -> None:
        with self._states_lock:
            self._refused[index] = reason
        if self.on_refused is not None:
            self.on_refused(f"/dev/nbd{index}", reason)

    # ---- Attacher ----

    def ready(self) -> tuple[bool, str]:
        try:
            with NbdNetlink():
                pass
        except AgentError as exc:
            return False, str(exc)
        return True, ""

    def max_devices(self) -> int:
        return sum(1 for _ in Path("/sys/block").glob("nbd*"))

    def attach(self, uri: str, read_only: bool, connections: int, identity: str = "") -> str:
        opts = attach.AttachOptions(
            expect_identity=identity,
            connections=connections,
            read_only=read_only,
            timeout=self._timeout,
            dead_conn_timeout=self._dead_conn_timeout,
            # This process stays (it is the node's daemon), so nbds:// exports can run through
            # the attach layer's userspace TLS bridge; the keeper keeps the bridges.
            allow_tls_proxy=True,
        )
        # Attach only once the keeper listens: a link that dies right after CONNECT must reach
        # it (bounded: without a keeper the device still attaches, unprotected, as before).
        self._listening.wait(_LISTEN_WAIT)
        try:
            attachment = attach.attach(uri, opts)
        except AgentError as exc:
            raise as_csi(exc, f"attaching {uri}") from exc
        with self._states_lock:
            self._refused.pop(attachment.index, None)  # a new attachment, a new story
        self._requests.put(("keep", attachment))
        log.info("attached %s at %s", uri, attachment.device)
        return attachment.device

    def identity(self, device: str) -> str:
        backend = devices.describe(devices.device_index(device), True).backend
        return backend.identity if backend is not None else ""

    def refusal(self, device: str) -> str:
        with self._states_lock:
            return self._refused.get(devices.device_index(device), "")

    def detach(self, device: str) -> None:
        index = devices.device_index(device)
        self._requests.put(("forget", index))
        try:
            attach.detach(device)
        except DeviceNotFound:
            return  # not attached: already done
        except AgentError as exc:
            raise as_csi(exc, f"detaching {device}") from exc

    def attached_devices(self, uri: str) -> dict[str, bool]:
        try:
            with NbdNetlink() as nl:
                found = devices.list_devices(nl)
        except AgentError:
            return {}
        return {
            d.path: d.backend.read_only
            for d in found
            if d.connected and d.backend is not None and d.backend.uri == uri
        }

    def is_attached(self, device: str, uri: str) -> bool:
        try:
            index = devices.device_index(device)
            with NbdNetlink() as nl:
                connected = devices.is_connected(nl, index)
        except AgentError:
            return False
        backend = devices.describe(index, connected).backend
        return connected and backend is not None and backend.uri == uri

    def is_alive(self, device: str) -> bool:
        index = devices.device_index(device)
        with self._states_lock:
            state = self._states.get(index)
        return state is not LinkState.RECONNECTING and self.is_attached_any(index)

    @staticmethod
    def is_attached_any(index: int) -> bool:
        try:
            with NbdNetlink() as nl:
                return devices.is_connected(nl, index)
        except AgentError:
            return False

    def adopt(self, device: str, uri: str) -> None:
        self._requests.put(("adopt", uri))
