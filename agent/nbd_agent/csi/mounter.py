"""Filesystem side of the node plugin: probe, format, mount, bind, unmount, usage figures.

Why it exists: the CSI node logic needs a handful of operations on devices and paths, each of
which is a well-known tool (blkid, mkfs, mount, umount) or syscall (statvfs). Keeping them here
keeps ``node.py`` readable and puts the one rule that protects data in one place: a device is
formatted only when it is *blank* (no signature blkid knows AND an all-zero head), never when it
holds anything, not even unrecognised bytes.

What it must not do: know about CSI, gRPC, Kubernetes or NBD; decide *whether* to format (the
caller asks ``probe`` first); swallow a tool's failure (every failure raises ``MountError`` with
the tool's own message).
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
# Bytes read from the start of a device to decide it is blank: covers MBR/GPT headers, the ext
# superblock (1 KiB in), XFS (0) and btrfs (64 KiB) superblocks, LVM and md metadata.
_HEAD_BYTES = 1024 * 1024


class MountError(Exception):
    """A mount/format tool failed; the message carries the tool's stderr."""


@dataclass(frozen=True)
class Probe:
    """What is on a device: ``fs_type`` when blkid knows a filesystem, ``other`` when it found a
    non-filesystem signature (partition table, RAID/LVM member), ``dirty`` when the head holds
    non-zero bytes that nobody recognises."""

    fs_type: str = ""
    other: str = ""
    dirty: bool = False

    @property
    def blank(self) -> bool:
        return not (self.fs_type or self.other or self.dirty)


@dataclass(frozen=True)
class Usage:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise MountError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}")
    return proc.stdout


def probe(device: str) -> Probe:
    """Look for any signature on ``device`` (low-level blkid probe, no cache), then for data."""
    proc = subprocess.run(
        ["blkid", "-p", "-o", "export", device], capture_output=True, text=True, check=False
    )
    # blkid -p: 0 = found something, 2 = nothing found, anything else = could not probe.
    if proc.returncode not in (0, 2):
        raise MountError(f"blkid -p {device} failed ({proc.returncode}): {proc.stderr.strip()}")
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    usage = found.get("USAGE", "")
    if found.get("TYPE") and usage in ("filesystem", ""):
        return Probe(fs_type=found["TYPE"])
    if found.get("TYPE") or found.get("PTTYPE"):
        return Probe(other=found.get("TYPE") or f"partition table {found['PTTYPE']}")
    with open(device, "rb") as dev:
        head = dev.read(_HEAD_BYTES)
    return Probe(dirty=head.count(0) != len(head))


def mkfs(device: str, fs_type: str) -> None:
    """Create a filesystem. Callers must have checked ``probe(device).blank`` first."""
    if fs_type == "ext4":
        # nodiscard: discarding a whole network device is slow and gains nothing on a blank one.
        _run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", device])
    elif fs_type == "xfs":
        _run(["mkfs.xfs", "-q", "-K", device])
    else:
        raise MountError(f"unsupported filesystem type {fs_type!r}")


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> dict[str, str]:
    """Every mount point of this mount namespace mapped to its mount options (last one wins)."""
    result: dict[str, str] = {}
    with open("/proc/self/mountinfo") as info:
        for line in info:
            fields = line.split()
            result[_unescape(fields[4])] = fields[5]
    return result


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


def is_read_only_mount(path: str) -> bool:
    options = mount_points().get(os.path.realpath(path), "")
    return "ro" in options.split(",")


def mount(device: str, path: str, fs_type: str, read_only: bool, flags: list[str]) -> None:
    """Mount ``device`` at directory ``path`` (created if missing)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    options = [*flags, "ro" if read_only else "rw"]
    _run(["mount", "-t", fs_type, "-o", ",".join(options), device, path])


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind ``source`` (a directory, or a device node for block volumes) onto ``target``.

    The target is created as a directory or an empty file to match the source. A read-only bind
    needs a second remount: a bind mount ignores ``ro`` on its first call.
    """
    target_path = Path(target)
    if stat.S_ISDIR(os.stat(source).st_mode):
        target_path.mkdir(parents=True, exist_ok=True)
    else:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        target_path.touch(exist_ok=True)
    _run(["mount", "--bind", source, target])
    if read_only:
        try:
            _run(["mount", "-o", "remount,bind,ro", target])
        except MountError:
            unmount(target)
            raise


def unmount(path: str) -> None:
    """Unmount every mount stacked on ``path``; a path that is not mounted is fine."""
    while os.path.exists(path) and is_mounted(path):
        _run(["umount", path])


def remove_path(path: str) -> None:
    """Remove a publish target (file or empty directory) that is no longer mounted."""
    if os.path.isdir(path) and not os.path.islink(path):
        os.rmdir(path)
    elif os.path.lexists(path):
        os.unlink(path)


def set_block_read_only(device: str, read_only: bool) -> None:
    """Mark a block device read-only (BLKROSET) or writable again. A read-only bind mount of a
    device node does not stop writes through it; the device flag does. No-op on anything that is
    not a block device."""
    if not stat.S_ISBLK(os.stat(device).st_mode):
        return
    _run(["blockdev", "--setro" if read_only else "--setrw", device])


def grow_filesystem(device: str, mount_point: str, fs_type: str) -> None:
    """Grow a mounted filesystem to its device's size, online (both tools accept a mounted one;
    xfs_growfs takes the mount point, resize2fs the device)."""
    if fs_type == "ext4":
        _run(["resize2fs", device])
    elif fs_type == "xfs":
        _run(["xfs_growfs", mount_point])
    else:
        raise MountError(f"cannot grow a {fs_type!r} filesystem")


def device_size(device: str) -> int:
    """Size in bytes. For a block device from sysfs: opening a device whose NBD link is down
    could wait for the reconnect, and stats must answer at once."""
    sysfs = Path("/sys/class/block") / Path(device).name / "size"
    if device.startswith("/dev/") and sysfs.exists():
        return int(sysfs.read_text().strip()) * 512
    with open(device, "rb") as dev:
        return dev.seek(0, os.SEEK_END)


def usage(path: str) -> Usage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    free = st.f_bfree * st.f_frsize
    return Usage(
        total_bytes=total,
        available_bytes=st.f_bavail * st.f_frsize,
        used_bytes=total - free,
        total_inodes=st.f_files,
        free_inodes=st.f_ffree,
        used_inodes=st.f_files - st.f_ffree,
    )
