"""Attach an export to /dev/nbdN (handshake in userspace, then NBD_CMD_CONNECT) and detach it.

Why it exists: this is the agent's core promise, used by the CLI and the CSI node plugin. Every
step that succeeded is undone if a later one fails, so a failed attach leaves no device
configured and no socket open.

Order of steps (and what undoes each): resolve the netlink family (nothing to undo); open and
negotiate every connection (close them); pick a device and CONNECT (DISCONNECT); check the
kernel took the size (DISCONNECT). Our copies of the socket fds are closed at the end either
way: the kernel holds its own references.

What it must not do: keep running after returning (staying attached across server restarts is
persist.py's job), or detach a device that is mounted unless forced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field

from nbd_agent import devices, handshake
from nbd_agent.devices import Backend
from nbd_agent.errors import (
    AgentError,
    DataChanged,
    DeviceBusy,
    DeviceNotFound,
    ExportChanged,
    HandshakeError,
    NetlinkError,
    NoFreeDevice,
    UsageError,
)
from nbd_agent.handshake import ExportInfo, Target
from nbd_agent.netlink import NbdNetlink
from nbd_agent.tlsproxy import TlsProxy
from nbdserver.protocol.constants import TransmissionFlag

log = logging.getLogger("nbd_agent.attach")

KERNEL_SENDS = (
    TransmissionFlag.NBD_FLAG_SEND_FLUSH
    | TransmissionFlag.NBD_FLAG_SEND_FUA
    | TransmissionFlag.NBD_FLAG_SEND_TRIM
    | TransmissionFlag.NBD_FLAG_SEND_WRITE_ZEROES
)


@dataclass
class AttachOptions:
    device: int | None = None  # None: the first free device
    connections: int = 1
    read_only: bool = False
    timeout: int | None = None  # per-request timeout in seconds (kernel default if None)
    dead_conn_timeout: int | None = None  # seconds I/O waits for a reconnect; None: fail at once
    connect_timeout: float = 10.0  # reaching the server and the handshake
    allow_tls_proxy: bool = False  # nbds:// needs a process that stays (persist mode)
    expect_identity: str = ""  # re-attaching a consumer: the identity it saw (CSI restage)
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)


@dataclass
class Attachment:
    index: int
    target: Target
    info: ExportInfo
    backend: Backend
    proxies: list[TlsProxy] = field(default_factory=list)  # nbds:// only; keep them running

    @property
    def device(self) -> str:
        return f"/dev/nbd{self.index}"


def kernel_flags(info: ExportInfo, read_only: bool) -> int:
    """Server flags as the kernel must see them (read-only if either side says so)."""
    flags = info.flags | TransmissionFlag.NBD_FLAG_HAS_FLAGS
    if read_only:
        flags |= TransmissionFlag.NBD_FLAG_READ_ONLY
    return int(flags)


def open_connections(
    target: Target, count: int, opts: AttachOptions, expected: ExportInfo | None = None
) -> tuple[list[socket.socket], ExportInfo]:
    """Negotiate ``count`` connections that all describe the same export, then ask its
    identity (after the data connections, so a restart in between shows as a new identity).
    On a reconnect the export must be the one the kernel knows (``check_unchanged``)."""
    socks: list[socket.socket] = []
    info: ExportInfo | None = None
    try:
        for _ in range(count):
            sock, this = handshake.open_export(
                target, timeout=opts.connect_timeout, tls_context=opts.tls_context
            )
            socks.append(sock)
            if info is not None and (this.size, this.flags) != (info.size, info.flags):
                raise HandshakeError(f"{target.describe()}: connections disagree on the export")
            info = this
        assert info is not None
        identity = handshake.export_identity(
            target, timeout=opts.connect_timeout, tls_context=opts.tls_context
        )
        info = dataclasses.replace(info, identity=identity)
        if expected is not None:
            check_unchanged(expected, info, target)
        if count > 1 and not info.multi_conn and not (opts.read_only or info.read_only):
            raise UsageError(
                f"{target.describe()}: the server does not advertise NBD_FLAG_CAN_MULTI_CONN, "
                "so more than one writable connection could lose data; use --connections 1"
            )
        return socks, info
    except BaseException:
        close_all(socks)
        raise


def kernel_size_matches(kernel_bytes: int, export_size: int) -> bool:
    """The kernel shows an export's size rounded down to whole sectors (older kernels: to whole
    blocks, at most 4096 bytes)."""
    return kernel_bytes % 512 == 0 and export_size - 4096 < kernel_bytes <= export_size


def grew(before: ExportInfo, now: ExportInfo) -> bool:
    """Whether the export is larger than the kernel's device (an adopted device knows its size
    only as the kernel shows it)."""
    if before.from_sysfs:
        return now.size > before.size and not kernel_size_matches(before.size, now.size)
    return now.size > before.size


def check_identity(expected: str, now: str, target: Target) -> None:
    """DataChanged unless the server tells the identity recorded at attach (if one was)."""
    if expected and now != expected:
        told = f"identity {now}" if now else "no identity"
        raise DataChanged(
            f"{target.describe()}: the export's identity changed from {expected} to {told}; "
            "it serves different data now (a restarted memory export, a lost overlay)"
        )


def check_unchanged(before: ExportInfo, now: ExportInfo, target: Target) -> None:
    """Raise unless ``now`` is the data the kernel's consumer saw as ``before``: the same
    identity (DataChanged otherwise, for good), not smaller (DataChanged), no less writable,
    the same commands. A size that only grew is fine: the caller resizes the device."""
    where = target.describe()
    check_identity(before.identity, now.identity, target)
    if not before.identity:
        log.warning("%s tells no export identity: only size and flags are checked", where)
    if now.size < before.size:  # the kernel's view of a size never exceeds the export's
        raise DataChanged(f"{where}: the export shrank from {before.size} to {now.size} bytes")
    if now.read_only and not before.read_only:
        raise ExportChanged(f"{where}: the export became read-only")
    # RECONFIGURE cannot change the flags the kernel was given: a command it would still send
    # (flush, FUA, trim, write zeroes) must still be supported. New flags are harmless.
    lost = before.flags & ~now.flags & KERNEL_SENDS
    if lost:
        names = ", ".join(f.name or "?" for f in TransmissionFlag if f & lost)
        raise ExportChanged(f"{where}: the server no longer supports {names}")


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def kernel_sockets(
    target: Target, socks: list[socket.socket]
) -> tuple[list[socket.socket], list[TlsProxy]]:
    """The sockets to hand to the kernel: the negotiated ones, or for TLS one end of a
    socketpair per connection with a running proxy behind it."""
    if not target.tls:
        return socks, []
    proxies = [
        TlsProxy(s, name=f"{target.describe()}#{i}").start()  # type: ignore[arg-type]
        for i, s in enumerate(socks)
    ]
    return [p.kernel_end for p in proxies], proxies


def close_proxies(proxies: list[TlsProxy]) -> None:
    for proxy in proxies:
        proxy.close()


def attach(uri: str | Target, opts: AttachOptions, nl: NbdNetlink | None = None) -> Attachment:
    """Attach ``uri`` to a device; return the Attachment. Raises AgentError subclasses."""
    target = handshake.parse_uri(uri) if isinstance(uri, str) else uri
    if opts.connections < 1:
        raise UsageError("--connections must be at least 1")
    if target.tls and not opts.allow_tls_proxy:
        raise UsageError(
            f"{target.uri}: TLS exports need a process that stays (use --persist): "
            "the kernel cannot speak TLS"
        )
    own_nl = nl is None
    nl = nl or NbdNetlink()
    try:
        if opts.device is not None and not devices.device_node_exists(opts.device):
            raise DeviceNotFound(f"/dev/nbd{opts.device} does not exist")
        socks, info = open_connections(target, opts.connections, opts)
        try:
            check_identity(opts.expect_identity, info.identity, target)
        except DataChanged:
            close_all(socks)
            raise
        if not info.identity:
            log.warning(
                "%s tells no export identity: a reconnect can check only size and flags",
                target.describe(),
            )
        ksocks, proxies = kernel_sockets(target, socks)
        try:
            attachment = connect_sockets(nl, target, info, ksocks, opts)
        except BaseException:
            close_proxies(proxies)
            raise
        finally:
            close_all(ksocks)  # the kernel holds its own references now (or nothing did)
        attachment.proxies = proxies
        return attachment
    finally:
        if own_nl:
            nl.close()


def connect_sockets(
    nl: NbdNetlink,
    target: Target,
    info: ExportInfo,
    socks: list[socket.socket],
    opts: AttachOptions,
) -> Attachment:
    """CONNECT the negotiated sockets to the requested or first free device, then verify."""
    read_only = opts.read_only or info.read_only
    backend = Backend(target.uri, len(socks), read_only, info.identity)
    candidates = [opts.device] if opts.device is not None else devices.free_indexes(nl)
    for index in candidates:
        try:
            got = nl.connect(
                index=index,
                fds=[s.fileno() for s in socks],
                size_bytes=info.size,
                block_size_bytes=info.block_size,
                server_flags=kernel_flags(info, read_only),
                timeout=opts.timeout,
                dead_conn_timeout=opts.dead_conn_timeout,
                backend_identifier=backend.identifier(),
            )
        except NetlinkError as exc:
            if exc.errno == errno.EBUSY:
                if opts.device is not None:
                    raise DeviceBusy(f"/dev/nbd{index} is already in use") from exc
                continue  # someone took it between STATUS and CONNECT: try the next one
            raise AgentError(f"the kernel refused to attach /dev/nbd{index}: {exc}") from exc
        attachment = Attachment(got, target, info, backend)
        try:
            verify(attachment)
        except BaseException:
            _disconnect_quietly(nl, got)
            raise
        return attachment
    raise NoFreeDevice("no free nbd device (every /dev/nbdN is attached)")


def verify(attachment: Attachment, deadline_s: float = 5.0) -> None:
    """The kernel must show the export's size on the device."""
    want = attachment.info.size
    deadline = time.monotonic() + deadline_s
    while True:
        got = devices.describe(attachment.index, True).size_bytes
        if kernel_size_matches(got, want):
            return
        if time.monotonic() > deadline:
            raise AgentError(f"{attachment.device} shows {got} bytes, the export has {want}")
        time.sleep(0.02)  # sysfs has no change notification we could wait on here


def _disconnect_quietly(nl: NbdNetlink, index: int) -> None:
    with contextlib.suppress(AgentError):
        nl.disconnect(index)


def detach(device: str | int, *, force: bool = False, nl: NbdNetlink | None = None) -> int:
    """DISCONNECT a device; refuses a mounted/held one unless ``force``. Returns the index."""
    index = device if isinstance(device, int) else devices.device_index(device)
    own_nl = nl is None
    nl = nl or NbdNetlink()
    try:
        status = nl.status(index) if devices.device_node_exists(index) else []
        if not status:
            raise DeviceNotFound(f"/dev/nbd{index} does not exist")
        if not status[0].connected:
            raise DeviceNotFound(f"/dev/nbd{index} is not attached")
        in_use = devices.users(index)
        if in_use and not force:
            raise DeviceBusy(f"/dev/nbd{index} is in use ({', '.join(in_use)}); unmount it first")
        nl.disconnect(index)
        wait_disconnected(nl, index)
        return index
    finally:
        if own_nl:
            nl.close()


def wait_disconnected(nl: NbdNetlink, index: int, deadline_s: float = 10.0) -> None:
    """The kernel drops the configuration once its receive workers have exited."""
    deadline = time.monotonic() + deadline_s
    while devices.is_connected(nl, index):
        if time.monotonic() > deadline:
            raise AgentError(f"/dev/nbd{index} is still configured {deadline_s:.0f}s after detach")
        time.sleep(0.02)  # no notification exists for "config released"
