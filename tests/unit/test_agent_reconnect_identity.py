"""The keeper's reconnect decisions about the data behind a device: the same identity gets its
sockets back, a larger export also resizes the device, and another identity or a smaller export
gets no socket at all (the device is disconnected so its I/O fails, and the reason is kept).

The kernel is a recording stand-in; the server side is the result ``open_connections`` would
return (its handshake and identity probe are covered by tests/interop/test_export_identity.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from nbd_agent import attach, handshake, persist
from nbd_agent.attach import Attachment, AttachOptions
from nbd_agent.devices import Backend
from nbd_agent.errors import DataChanged
from nbd_agent.handshake import ExportInfo
from nbd_agent.netlink import DeviceStatus

MiB = 1 << 20
URI = "nbd://127.0.0.1:10809/disk"


class Listener:
    def __init__(self) -> None:
        self.pending: list[int] = []

    def read(self, timeout: float | None) -> list[int]:
        out, self.pending = self.pending, []
        return out

    def close(self) -> None:
        pass


class KernelStandIn:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, dict[str, object]]] = []

    def link_dead_listener(self) -> Listener:
        self.listener = Listener()
        return self.listener

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        return [DeviceStatus(0, True)]

    def reconfigure(self, index: int, fds: list[int], **attrs: object) -> None:
        self.calls.append(("reconfigure", index, attrs))

    def disconnect(self, index: int) -> None:
        self.calls.append(("disconnect", index, {}))


@pytest.fixture
def kernel() -> KernelStandIn:
    return KernelStandIn()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ExportInfo]]:
    """What the server answers on the next reconnect (the real checks run on it)."""
    answers: list[ExportInfo] = []
    opened: list[socket.socket] = []

    def open_connections(
        target: handshake.Target, count: int, opts: AttachOptions, expected: ExportInfo
    ) -> tuple[list[socket.socket], ExportInfo]:
        info = answers.pop(0)
        attach.check_unchanged(expected, info, target)
        ours, theirs = socket.socketpair()
        opened.extend((ours, theirs))
        return [ours], info

    monkeypatch.setattr(attach, "open_connections", open_connections)
    yield answers
    for s in opened:
        s.close()


def kept(kernel: KernelStandIn, identity: str = "file-1") -> persist.Keeper:
    keeper = persist.Keeper(kernel)  # type: ignore[arg-type]
    info = ExportInfo(8 * MiB, 0, None, identity=identity)
    target = handshake.parse_uri(URI)
    keeper.keep(Attachment(0, target, info, Backend(URI, 1, False, identity)))
    return keeper


def reconnect(keeper: persist.Keeper) -> None:
    keeper.reconnector.link_dead(0, keeper.clock())
    keeper._attempt(0)


def test_the_same_identity_gets_its_sockets_back(
    kernel: KernelStandIn, serve: list[ExportInfo]
) -> None:
    keeper = kept(kernel)
    serve.append(ExportInfo(8 * MiB, 0, None, identity="file-1"))
    reconnect(keeper)
    assert [c[0] for c in kernel.calls] == ["reconfigure"]
    assert kernel.calls[0][2].get("size_bytes") is None
    assert "id=file-1" in str(kernel.calls[0][2]["backend_identifier"])


def test_another_identity_gets_no_socket_and_the_device_is_disconnected_with_the_reason(
    kernel: KernelStandIn, serve: list[ExportInfo]
) -> None:
    keeper = kept(kernel)
    reported: list[tuple[int, str]] = []
    keeper.on_refused = lambda index, why: reported.append((index, why))
    serve.append(ExportInfo(8 * MiB, 0, None, identity="mem-2"))
    reconnect(keeper)
    assert kernel.calls == [("disconnect", 0, {})]
    assert "identity changed from file-1 to identity mem-2" in keeper.refused[0]
    assert reported == [(0, keeper.refused[0])] and 0 not in keeper.kept


def test_a_server_that_no_longer_tells_the_identity_is_refused_too(
    kernel: KernelStandIn, serve: list[ExportInfo]
) -> None:
    keeper = kept(kernel)
    serve.append(ExportInfo(8 * MiB, 0, None))
    reconnect(keeper)
    assert kernel.calls == [("disconnect", 0, {})] and "no identity" in keeper.refused[0]


def test_a_grown_export_resizes_the_device_and_a_shrunk_one_is_refused(
    kernel: KernelStandIn, serve: list[ExportInfo]
) -> None:
    keeper = kept(kernel)
    serve.append(ExportInfo(12 * MiB, 0, None, identity="file-1"))
    reconnect(keeper)
    # Sockets first, then the size: the kernel resizes with its queue frozen, which waits for
    # the I/O held since the link died; only the new socket lets that I/O complete.
    reconfigures = [c[2].get("size_bytes") for c in kernel.calls if c[0] == "reconfigure"]
    assert reconfigures == [None, 12 * MiB]
    serve.append(ExportInfo(10 * MiB, 0, None, identity="file-1"))
    reconnect(keeper)
    assert kernel.calls[-1] == ("disconnect", 0, {}) and "shrank" in keeper.refused[0]


def test_servers_without_identities_keep_todays_checks_with_a_warning(
    kernel: KernelStandIn, serve: list[ExportInfo], caplog: pytest.LogCaptureFixture
) -> None:
    keeper = kept(kernel, identity="")
    serve.append(ExportInfo(8 * MiB, 0, None))
    with caplog.at_level(logging.WARNING):
        reconnect(keeper)
    assert kernel.calls[-1][0] == "reconfigure"
    assert "tells no export identity" in caplog.text


def test_a_restage_that_finds_another_identity_fails_before_any_device_is_touched() -> None:
    target = handshake.parse_uri(URI)
    attach.check_identity("", "mem-1", target)  # nothing recorded: nothing to compare
    attach.check_identity("mem-1", "mem-1", target)
    with pytest.raises(DataChanged, match="from mem-1 to identity mem-2"):
        attach.check_identity("mem-1", "mem-2", target)


def test_the_backend_identifier_keeps_the_identity_for_adoption() -> None:
    backend = Backend(URI, 2, True, "cow-abc")
    parsed = Backend.parse(backend.identifier())
    assert parsed == backend
    assert Backend.parse(Backend(URI, 1, False).identifier()) == Backend(URI, 1, False, "")


def test_a_link_that_dies_before_the_device_is_handed_to_the_keeper_is_still_reconnected(
    kernel: KernelStandIn, serve: list[ExportInfo]
) -> None:
    keeper = persist.Keeper(kernel)  # type: ignore[arg-type]
    kernel.listener.pending.append(0)  # LINK_DEAD arrives before keep() (another thread)
    keeper.step(0)
    info = ExportInfo(8 * MiB, 0, None, identity="file-1")
    keeper.keep(Attachment(0, handshake.parse_uri(URI), info, Backend(URI, 1, False, "file-1")))
    serve.append(info)
    keeper.step(0)
    assert [c[0] for c in kernel.calls] == ["reconfigure"]


def test_an_adopted_device_is_checked_against_the_identity_in_its_backend_identifier(
    kernel: KernelStandIn, serve: list[ExportInfo], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbd_agent import devices

    recorded = Backend(URI, 1, False, "file-1").identifier()
    device = devices.Device(0, True, 8 * MiB, False, recorded, None)
    monkeypatch.setattr(devices, "list_devices", lambda nl: [device])
    keeper = persist.Keeper(kernel)  # type: ignore[arg-type]
    assert keeper.adopt() == [0]  # a restarted agent: it verifies the link at once
    assert keeper.kept[0].expected.identity == "file-1"
    serve.append(ExportInfo(8 * MiB, 0, None, identity="mem-9"))
    keeper.step(0)
    assert kernel.calls == [("disconnect", 0, {})] and "from file-1" in keeper.refused[0]
