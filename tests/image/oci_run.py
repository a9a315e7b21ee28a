"""Run a built image with runc as a cluster would: its own user, a read-only root filesystem.

Why it exists: ``buildah run`` cannot make the root filesystem read-only, and the point of the
image tests is to see the image behave as the chart runs it (``readOnlyRootFilesystem``, the
image's numeric USER, no capabilities). So the image's root filesystem (a mounted buildah
container) becomes an OCI bundle whose config is written here from the image's own config (Env,
User, WorkingDir): read-only root, a tmpfs at /data as the writable volume, no new privileges, no
capabilities, and the host's network namespace (so a server inside answers on the host's
127.0.0.1, as with ``hostNetwork``).

What it must not do: leave a container behind: every ``run`` is waited for and every ``serve``
is killed and deleted on exit, even when the test body fails.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.image.buildah_store import ImageError

_ids = itertools.count()


def remove_all_containers(state: Path) -> None:
    """Kill and delete every container whose runc state is under ``state`` (a killed run's too)."""
    runc = ["runc", f"--root={state / 'runc'}"]
    listed = subprocess.run([*runc, "list", "--quiet"], capture_output=True, text=True, check=False)
    for container_id in listed.stdout.split():
        subprocess.run([*runc, "kill", container_id, "KILL"], capture_output=True, check=False)
        subprocess.run([*runc, "delete", "--force", container_id], capture_output=True, check=False)


@dataclass
class Served:
    """A process running in a container, with its stderr lines collected as they come."""

    process: subprocess.Popen[str]
    container_id: str
    runner: ImageRunner
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def wait_for_line(self, pattern: str, deadline_s: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``; ImageError if none before the deadline."""
        end = time.monotonic() + deadline_s
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if match := re.search(pattern, line):
                return match
        raise ImageError(f"no line like {pattern!r} within {deadline_s}s: {self.seen[-20:]}")

    def exec(self, args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
        """Run ``args`` inside the running container (as its user); (exit code, output)."""
        extra = [f"--env={key}={value}" for key, value in env.items()]
        return self.runner.runc("exec", *extra, self.container_id, *args, timeout=timeout)


@dataclass
class ImageRunner:
    """Containers of one image's root filesystem (``rootfs``) and config, state under ``state``."""

    rootfs: Path
    image_config: dict[str, object]
    state: Path

    def _user(self) -> tuple[int, int]:
        user = str(self.image_config.get("User") or "0:0")
        uid, _, gid = user.partition(":")
        if not uid.isdigit() or not (gid or uid).isdigit():
            raise ImageError(f"image USER {user!r} is not numeric uid:gid")
        return int(uid), int(gid or uid)

    def _spec(self, args: list[str], bundle: Path) -> dict[str, object]:
        uid, gid = self._user()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        env = list(self.image_config.get("Env") or [])  # type: ignore[call-overload]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": uid, "gid": gid},
                "args": args,
                "env": env,
                "cwd": str(self.image_config.get("WorkingDir") or "/"),
                "capabilities": {key: [] for key in ("bounding", "effective", "permitted")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": nofile[0], "hard": nofile[1]}],
                "noNewPrivileges": True,
            },
            "root": {"path": str(self.rootfs), "readonly": True},
            "hostname": "kube-nbd-image-test",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                # The one writable place, as a volume would be; owned by the image's user.
                {"destination": "/data", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "size=1g", f"uid={uid}", f"gid={gid}"]},
            ],
            "linux": {
                # No network namespace: the host's, as hostNetwork gives the agent.
                "namespaces": [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")],
                "cgroupsPath": f"/kube-nbd-image-test-{bundle.name}",
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
            },
        }  # fmt: skip

    def _bundle(self, args: list[str]) -> tuple[str, Path]:
        container_id = f"kube-nbd-{os.getpid()}-{next(_ids)}"
        bundle = self.state / "bundles" / container_id
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(self._spec(args, bundle)))
        return container_id, bundle

    def runc(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        proc = subprocess.run(
            ["runc", f"--root={self.state / 'runc'}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return proc.returncode, proc.stdout + proc.stderr

    def run(self, args: list[str], timeout: float = 60) -> tuple[int, str]:
        """Run ``args`` in a fresh container to its end; (exit code, stdout and stderr)."""
        container_id, bundle = self._bundle(args)
        try:
            return self.runc("run", f"--bundle={bundle}", container_id, timeout=timeout)
        finally:
            self.runc("delete", "--force", container_id)

    @contextmanager
    def serve(self, args: list[str]) -> Iterator[Served]:
        """Start ``args`` in a container; stopped (SIGTERM, then deleted) when the block ends."""
        container_id, bundle = self._bundle(args)
        process = subprocess.Popen(
            ["runc", f"--root={self.state / 'runc'}", "run", f"--bundle={bundle}", container_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        served = Served(process, container_id, self)

        def pump() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                served.lines.put(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield served
        finally:
            self.runc("kill", container_id, "TERM")
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.runc("kill", container_id, "KILL")
                process.wait(timeout=20)
            self.runc("delete", "--force", container_id)
            reader.join(timeout=5)
