"""What the kernel's nbd devices look like right now: STATUS from netlink plus sysfs details.

Why it exists: attach needs a free device, detach must refuse a mounted one, ``nbd-agent list``
shows devices with their backends, and a restarted agent finds the devices it attached through
the backend identifier it gave them (visible as /sys/block/nbdN/backend). The identifier format
is defined here, once.

What it must not do: change any device (that is attach.py / netlink.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from nbd_agent.errors import DeviceNotFound
from nbd_agent.netlink import NbdNetlink

SYS_BLOCK = Path("/sys/block")
DEV = Path("/dev")
BACKEND_PREFIX = "kube-nbd:"


@dataclass(frozen=True)
class Backend:
    """What the agent records in the kernel about an attachment, so it can be found again."""

    uri: str
    connections: int
    read_only: bool
    identity: str = ""  # the export identity seen at attach ("" = the server told none)

    def identifier(self) -> str:
        fields = {"c": self.connections, "ro": int(self.read_only), "uri": self.uri}
        if self.identity:
            fields["id"] = self.identity
        return BACKEND_PREFIX + urlencode(fields)

    @classmethod
    def parse(cls, identifier: str) -> Backend | None:
        """The Backend of an identifier this agent wrote; None for anyone else's."""
        if not identifier.startswith(BACKEND_PREFIX):
            return None
        fields = dict(parse_qsl(identifier[len(BACKEND_PREFIX) :]))
        try:
            return cls(fields["uri"], int(fields["c"]), fields["ro"] == "1", fields.get("id", ""))
        except (KeyError, ValueError):
            return None


@dataclass(frozen=True)
class Device:
    index: int
    connected: bool
    size_bytes: int
    read_only: bool
    backend_identifier: str | None
    pid: int | None

    @property
    def path(self) -> str:
        return f"/dev/nbd{self.index}"

    @property
    def backend(self) -> Backend | None:
        return Backend.parse(self.backend_identifier) if self.backend_identifier else None


def device_index(name: str) -> int:
    """Index of ``/dev/nbdN``, ``nbdN`` or ``N``."""
    match = re.fullmatch(r"(?:/dev/)?(?:nbd)?(\d+)", name.strip())
    if not match:
        raise DeviceNotFound(f"{name!r} is not an nbd device (expected /dev/nbdN)")
    return int(match.group(1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def describe(index: int, connected: bool) -> Device:
    base = SYS_BLOCK / f"nbd{index}"
    sectors = _read(base / "size")
    pid = _read(base / "pid")
    return Device(
        index=index,
        connected=connected,
        size_bytes=int(sectors) * 512 if sectors and sectors.isdigit() else 0,
        read_only=_read(base / "ro") == "1",
        backend_identifier=_read(base / "backend") or None,
        pid=int(pid) if pid and pid.isdigit() else None,
    )


def list_devices(nl: NbdNetlink) -> list[Device]:
    return [describe(s.index, s.connected) for s in sorted(nl.status(), key=lambda s: s.index)]


def device_node_exists(index: int) -> bool:
    return (DEV / f"nbd{index}").exists()


def free_indexes(nl: NbdNetlink) -> list[int]:
    """Unconfigured devices that have a device node (a device without one is useless here)."""
    return [
        s.index
        for s in sorted(nl.status(), key=lambda s: s.index)
        if not s.connected and device_node_exists(s.index)
    ]


def is_connected(nl: NbdNetlink, index: int) -> bool:
    return any(s.connected for s in nl.status(index))


def users(index: int) -> list[str]:
    """Why the device may not be detached: mounts and holders (dm, md, ...) of it."""
    out = []
    node = f"/dev/nbd{index}"
    names = {node, f"nbd{index}"}
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                source, target = line.split()[:2]
                if source in names or re.fullmatch(rf"/dev/nbd{index}p\d+", source):
                    out.append(f"mounted on {target}")
    except OSError:
        pass
    holders = SYS_BLOCK / f"nbd{index}" / "holders"
    if holders.is_dir():
        out.extend(f"held by {h}" for h in sorted(os.listdir(holders)))
    return out
