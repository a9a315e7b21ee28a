"""attach() undoes every completed step when a later one fails (owner: agent engineer).

The kernel side is a recording stand-in for NbdNetlink (the real one is exercised in UML by
tests/kernel/test_agent_failures.py); the NBD side is a real nbdserver on loopback.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator

import pytest
from nbd_agent import attach, devices
from nbd_agent.errors import AgentError, DeviceBusy, NetlinkError, NoFreeDevice, UsageError
from nbd_agent.netlink import DeviceStatus


class RecordingNetlink:
    """Answers like the kernel would, from a script; records every call."""

    def __init__(
        self,
        free: list[int],
        busy: frozenset[int] | set[int] = frozenset(),
        fail: int | None = None,
    ):
        self.free, self.busy, self.fail = free, set(busy), fail
        self.calls: list[tuple[str, object]] = []
        self.fds_seen: list[list[int]] = []

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        return [DeviceStatus(i, False) for i in self.free]

    def connect(self, *, index: int, fds: list[int], **_kernel_attrs: object) -> int:
        self.calls.append(("connect", index))
        self.fds_seen.append(list(fds))
        if index in self.busy:
            raise NetlinkError("NBD_CMD_CONNECT: busy", errno.EBUSY)
        if self.fail is not None:
            raise NetlinkError("NBD_CMD_CONNECT: invalid", self.fail)
        return index

    def disconnect(self, index: int) -> None:
        self.calls.append(("disconnect", index))


@pytest.fixture
def server() -> Iterator[str]:
    """A minimal fixed-newstyle server answering NBD_OPT_GO for any export (nbdserver's
    protocol codecs), so the real handshake runs."""
    from nbdserver.protocol import wire
    from nbdserver.protocol.constants import HandshakeFlag, Option, OptionReply
    from nbdserver.protocol.constants import TransmissionFlag as TF

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    accepted: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(conn)
            conn.sendall(wire.pack_greeting(HandshakeFlag.NBD_FLAG_FIXED_NEWSTYLE))
            conn.recv(4)
            head = conn.recv(16)
            _, option, length = wire.OPTION_HEADER.unpack(head)
            while length:
                length -= len(conn.recv(length))
            if option != Option.NBD_OPT_GO:  # the identity probe: a server without any
                conn.sendall(wire.pack_option_reply(option, OptionReply.NBD_REP_ERR_UNSUP))
                conn.close()
                continue
            flags = TF.NBD_FLAG_HAS_FLAGS | TF.NBD_FLAG_SEND_FLUSH | TF.NBD_FLAG_CAN_MULTI_CONN
            conn.sendall(
                wire.pack_option_reply(
                    option, OptionReply.NBD_REP_INFO, wire.pack_info_export(1 << 20, flags)
                )
                + wire.pack_option_reply(option, OptionReply.NBD_REP_ACK)
            )

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"nbd://127.0.0.1:{listener.getsockname()[1]}/disk"
    finally:
        stop.set()
        t.join(5)
        listener.close()
        for c in accepted:
            c.close()


@pytest.fixture(autouse=True)
def device_nodes(monkeypatch):
    # There are no /dev/nbdN on the test machine; pretend nbd0..nbd3 exist.
    monkeypatch.setattr(devices, "device_node_exists", lambda i: 0 <= i < 4)


def _fds_closed(fds: list[int]) -> bool:
    import os

    for fd in fds:
        try:
            os.fstat(fd)
        except OSError:
            continue
        return False
    return True


def test_a_failed_check_after_connect_disconnects_and_closes_the_sockets(server, monkeypatch):
    nl = RecordingNetlink(free=[0, 1])

    def bad_verify(attachment: attach.Attachment, deadline_s: float = 5.0) -> None:
        raise AgentError("sysfs shows the wrong size")

    monkeypatch.setattr(attach, "verify", bad_verify)
    with pytest.raises(AgentError, match="wrong size"):
        attach.attach(server, attach.AttachOptions(connections=2), nl=nl)  # type: ignore[arg-type]
    assert nl.calls == [("connect", 0), ("disconnect", 0)]
    assert len(nl.fds_seen[0]) == 2 and _fds_closed(nl.fds_seen[0])


def test_a_device_taken_meanwhile_makes_attach_try_the_next_free_one(server, monkeypatch):
    monkeypatch.setattr(attach, "verify", lambda a, deadline_s=5.0: None)
    nl = RecordingNetlink(free=[1, 2], busy={1})
    result = attach.attach(server, attach.AttachOptions(), nl=nl)  # type: ignore[arg-type]
    assert result.index == 2
    assert nl.calls == [("connect", 1), ("connect", 2)]
    assert _fds_closed(nl.fds_seen[-1])  # our copies are closed; the kernel holds its own


def test_every_device_busy_is_no_free_device_and_nothing_stays_open(server):
    nl = RecordingNetlink(free=[0, 1], busy={0, 1})
    with pytest.raises(NoFreeDevice):
        attach.attach(server, attach.AttachOptions(), nl=nl)  # type: ignore[arg-type]
    assert [c for c in nl.calls if c[0] == "disconnect"] == []
    assert all(_fds_closed(fds) for fds in nl.fds_seen)


def test_a_requested_busy_device_is_device_busy(server):
    nl = RecordingNetlink(free=[], busy={3})
    with pytest.raises(DeviceBusy, match="/dev/nbd3"):
        attach.attach(server, attach.AttachOptions(device=3), nl=nl)  # type: ignore[arg-type]
    assert nl.calls == [("connect", 3)]


def test_a_kernel_refusal_is_reported_and_closes_the_sockets(server):
    nl = RecordingNetlink(free=[0], fail=errno.EINVAL)
    with pytest.raises(AgentError, match="refused to attach /dev/nbd0"):
        attach.attach(server, attach.AttachOptions(), nl=nl)  # type: ignore[arg-type]
    assert _fds_closed(nl.fds_seen[0])


def test_tls_without_a_staying_process_is_refused_before_anything_happens():
    nl = RecordingNetlink(free=[0])
    with pytest.raises(UsageError, match="--persist"):
        attach.attach("nbds://127.0.0.1:1/x", attach.AttachOptions(), nl=nl)  # type: ignore[arg-type]
    assert nl.calls == []
