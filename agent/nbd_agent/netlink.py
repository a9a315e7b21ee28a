"""The kernel's ``nbd`` generic netlink family: its messages (as data) and the one socket edge.

Why it exists: the agent hands connected sockets to the kernel with NBD_CMD_CONNECT, replaces
dead ones with NBD_CMD_RECONFIGURE, tears devices down with NBD_CMD_DISCONNECT, lists them with
NBD_CMD_STATUS and hears about dead links on the ``nbd_mc_group`` multicast group. Constants
carry the names of include/uapi/linux/nbd-netlink.h and nbd.h. This is the only module of the
agent that opens a netlink socket.

What it must not do: talk NBD to a server, touch sysfs, or decide policy (which device, when to
reconnect): callers do that. Socket fds in NBD_ATTR_SOCKETS are numbers in *this* process's
fd table; the kernel takes its own reference during the call, so callers may close theirs after.
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from nbd_agent import genl
from nbd_agent.errors import FamilyMissing, NetlinkError
from nbd_agent.genl import Attr, AttrSpace, NlaType

# include/uapi/linux/nbd-netlink.h
NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 0x1
NBD_GENL_MCAST_GROUP_NAME = "nbd_mc_group"

NBD_ATTR_INDEX = 1
NBD_ATTR_SIZE_BYTES = 2
NBD_ATTR_BLOCK_SIZE_BYTES = 3
NBD_ATTR_TIMEOUT = 4
NBD_ATTR_SERVER_FLAGS = 5
NBD_ATTR_CLIENT_FLAGS = 6
NBD_ATTR_SOCKETS = 7
NBD_ATTR_DEAD_CONN_TIMEOUT = 8
NBD_ATTR_DEVICE_LIST = 9
NBD_ATTR_BACKEND_IDENTIFIER = 10

NBD_DEVICE_ITEM = 1
NBD_DEVICE_INDEX = 1
NBD_DEVICE_CONNECTED = 2

NBD_SOCK_ITEM = 1
NBD_SOCK_FD = 1

# include/uapi/linux/nbd.h: client flags for NBD_ATTR_CLIENT_FLAGS.
NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1


class NbdCmd(IntEnum):
    NBD_CMD_UNSPEC = 0
    NBD_CMD_CONNECT = 1
    NBD_CMD_DISCONNECT = 2
    NBD_CMD_RECONFIGURE = 3
    NBD_CMD_LINK_DEAD = 4
    NBD_CMD_STATUS = 5


NBD_SOCK = AttrSpace("nbd_sock", [Attr(NBD_SOCK_FD, "fd", NlaType.U32)])
NBD_DEVICE = AttrSpace(
    "nbd_device",
    [
        Attr(NBD_DEVICE_INDEX, "index", NlaType.U32),
        Attr(NBD_DEVICE_CONNECTED, "connected", NlaType.U8),
    ],
)
# Types follow the kernel's nbd_attr_policy (u32 index, u64 for sizes, times and flags).
NBD_ATTRS = AttrSpace(
    "nbd",
    [
        Attr(NBD_ATTR_INDEX, "index", NlaType.U32),
        Attr(NBD_ATTR_SIZE_BYTES, "size_bytes", NlaType.U64),
        Attr(NBD_ATTR_BLOCK_SIZE_BYTES, "block_size_bytes", NlaType.U64),
        Attr(NBD_ATTR_TIMEOUT, "timeout", NlaType.U64),
        Attr(NBD_ATTR_SERVER_FLAGS, "server_flags", NlaType.U64),
        Attr(NBD_ATTR_CLIENT_FLAGS, "client_flags", NlaType.U64),
        Attr(NBD_ATTR_SOCKETS, "sockets", NlaType.NESTED_LIST, NBD_SOCK, NBD_SOCK_ITEM),
        Attr(NBD_ATTR_DEAD_CONN_TIMEOUT, "dead_conn_timeout", NlaType.U64),
        Attr(NBD_ATTR_DEVICE_LIST, "device_list", NlaType.NESTED_LIST, NBD_DEVICE, NBD_DEVICE_ITEM),
        Attr(NBD_ATTR_BACKEND_IDENTIFIER, "backend_identifier", NlaType.STRING),
    ],
)


@dataclass(frozen=True)
class DeviceStatus:
    """One entry of NBD_CMD_STATUS: the device index and whether it holds a configuration."""

    index: int
    connected: bool


def connect_attrs(
    *,
    fds: list[int],
    size_bytes: int,
    block_size_bytes: int | None = None,
    server_flags: int | None = None,
    index: int | None = None,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    client_flags: int | None = None,
    backend_identifier: str | None = None,
) -> dict[str, Any]:
    """The attribute dict of NBD_CMD_CONNECT (None means: let the kernel choose its default)."""
    if not fds:
        raise ValueError("NBD_CMD_CONNECT needs at least one socket")
    return {
        "index": index,
        "size_bytes": size_bytes,
        "block_size_bytes": block_size_bytes,
        "timeout": timeout,
        "server_flags": server_flags,
        "client_flags": client_flags,
        "sockets": [{"fd": fd} for fd in fds],
        "dead_conn_timeout": dead_conn_timeout,
        "backend_identifier": backend_identifier,
    }


def encode_request(family_id: int, cmd: NbdCmd, attrs: dict[str, Any], seq: int) -> bytes:
    """A complete NBD family request with NLM_F_ACK, so every command gets a definite answer."""
    return genl.pack_genl(
        family_id,
        cmd,
        NBD_GENL_VERSION,
        genl.encode_attrs(NBD_ATTRS, attrs),
        seq=seq,
        flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK,
    )


def parse_status(attrs: dict[str, Any]) -> list[DeviceStatus]:
    return [
        DeviceStatus(int(item["index"]), bool(item.get("connected", 0)))
        for item in attrs.get("device_list", [])
        if "index" in item
    ]


class NbdNetlink:
    """A netlink socket bound to the ``nbd`` family. Use as a context manager.

    Raises FamilyMissing at construction when the family is not registered (module not loaded).
    """

    def __init__(self, *, recv_timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, genl.NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._sock.settimeout(recv_timeout)
            self._seq = int.from_bytes(os.urandom(2), "little")
            family = self._get_family(NBD_GENL_FAMILY_NAME)
            self.family_id: int = int(family["family_id"])
            self.mcast_groups: dict[str, int] = {
                g["name"]: int(g["id"]) for g in family.get("mcast_groups", []) if "name" in g
            }
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _transact(self, request: bytes, seq: int, what: str) -> list[genl.NlMsg]:
        """Send one request; collect its replies until the ACK (or raise on an error)."""
        self._sock.send(request)
        replies: list[genl.NlMsg] = []
        while True:
            for msg in genl.parse_messages(self._sock.recv(65536)):
                if msg.seq != seq:
                    continue  # a late answer to an earlier, timed-out request
                if msg.type == genl.NLMSG_ERROR:
                    code = msg.error_code()
                    if code == 0:
                        return replies
                    raise NetlinkError(f"{what}: {os.strerror(-code)}", -code)
                if msg.type == genl.NLMSG_DONE:
                    return replies
                replies.append(msg)

    def _get_family(self, name: str) -> dict[str, Any]:
        seq = self._next_seq()
        request = genl.pack_genl(
            genl.GENL_ID_CTRL,
            genl.CTRL_CMD_GETFAMILY,
            1,
            genl.encode_attrs(genl.CTRL_ATTRS, {"family_name": name}),
            seq=seq,
            flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK,
        )
        try:
            replies = self._transact(request, seq, f"resolving genl family {name!r}")
        except NetlinkError as exc:
            if exc.errno == errno_mod.ENOENT:
                raise FamilyMissing(
                    f"the kernel has no {name!r} generic netlink family: "
                    "load the nbd module (modprobe nbd)"
                ) from exc
            raise
        for msg in replies:
            _, _, attrs = msg.genl()
            decoded = genl.decode_attrs(genl.CTRL_ATTRS, attrs)
            if "family_id" in decoded:
                return decoded
        raise FamilyMissing(f"the genl controller did not describe family {name!r}")

    def request(self, cmd: NbdCmd, attrs: dict[str, Any]) -> list[dict[str, Any]]:
        """Send one NBD command; return the decoded attributes of each reply message."""
        seq = self._next_seq()
        msgs = self._transact(encode_request(self.family_id, cmd, attrs, seq), seq, cmd.name)
        return [genl.decode_attrs(NBD_ATTRS, m.genl()[2]) for m in msgs]

    def connect(self, **kwargs: Any) -> int:
        """NBD_CMD_CONNECT (see connect_attrs for the arguments); returns the device index."""
        replies = self.request(NbdCmd.NBD_CMD_CONNECT, connect_attrs(**kwargs))
        for reply in replies:
            if "index" in reply:
                return int(reply["index"])
        raise NetlinkError("NBD_CMD_CONNECT: the kernel did not say which device", 0)

    def disconnect(self, index: int) -> None:
        self.request(NbdCmd.NBD_CMD_DISCONNECT, {"index": index})

    def reconfigure(
        self,
        index: int,
        fds: list[int],
        *,
        backend_identifier: str | None = None,
        timeout: int | None = None,
        dead_conn_timeout: int | None = None,
        size_bytes: int | None = None,
    ) -> None:
        """NBD_CMD_RECONFIGURE: the kernel puts each fd in place of a socket it marked dead and
        ignores the rest (it never replaces a live socket); ``size_bytes`` resizes the device
        (kernels since 5.3). The backend identifier must equal the one given at CONNECT."""
        self.request(
            NbdCmd.NBD_CMD_RECONFIGURE,
            {
                "index": index,
                "sockets": [{"fd": fd} for fd in fds],
                "backend_identifier": backend_identifier,
                "timeout": timeout,
                "dead_conn_timeout": dead_conn_timeout,
                "size_bytes": size_bytes,
            },
        )

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        """NBD_CMD_STATUS for one device or (index None) all of them."""
        out: list[DeviceStatus] = []
        for reply in self.request(NbdCmd.NBD_CMD_STATUS, {"index": index}):
            out.extend(parse_status(reply))
        return out

    def link_dead_listener(self) -> LinkDeadListener:
        group = self.mcast_groups.get(NBD_GENL_MCAST_GROUP_NAME)
        if group is None:
            raise FamilyMissing(f"the nbd family has no {NBD_GENL_MCAST_GROUP_NAME!r} group")
        return LinkDeadListener(self.family_id, group)


class LinkDeadListener:
    """A socket joined to ``nbd_mc_group``; ``fileno()`` is pollable, ``read()`` returns the
    indexes of devices whose links the kernel just declared dead."""

    def __init__(self, family_id: int, group_id: int) -> None:
        self.family_id = family_id
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, genl.NETLINK_GENERIC)
        try:
            self._sock.bind((0, 0))
            self._sock.setsockopt(genl.SOL_NETLINK, genl.NETLINK_ADD_MEMBERSHIP, group_id)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float | None) -> list[int]:
        """Wait up to ``timeout`` seconds for one datagram; [] on timeout."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return []
        return parse_link_dead(self.family_id, data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkDeadListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_link_dead(family_id: int, data: bytes) -> list[int]:
    """Device indexes named by the NBD_CMD_LINK_DEAD messages in one datagram."""
    out = []
    for msg in genl.parse_messages(data):
        if msg.type != family_id:
            continue
        cmd, _, attrs = msg.genl()
        if cmd == NbdCmd.NBD_CMD_LINK_DEAD:
            decoded = genl.decode_attrs(NBD_ATTRS, attrs)
            if "index" in decoded:
                out.append(int(decoded["index"]))
    return out
