"""A private buildah: its own configuration and image storage, owned and removed by one test run.

Why it exists: the image tier builds the real Dockerfile with Debian's buildah, and nothing of that
may touch the machine's own container state or depend on it. Every setting buildah reads comes
from files written here (containers.conf: runc, cgroupfs, rlimits no higher than this process's
own; storage.conf: overlay storage under the run's folder; registries.conf: no registry is ever
searched, so a short image name can only mean an image already in this storage; policy.json).
``close`` removes containers, images, the storage's mounts and the folder, so an interrupted run
leaves no locks or mounts behind for the next one.

What it must not do: name a registry or a Debian mirror (the base comes from ``base_image``),
or pass the machine's TLS trust into an image (the CA bundle is only bind-mounted into the build's
RUN steps, see HOST_CA_BUNDLE).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# The machine's CA bundle, bind-mounted over the base's own in every RUN step of the build: pip
# inside reaches PyPI through whatever TLS trust this machine needs, which a bare base lacks.
# The target exists in the base, so the mount leaves no trace in a layer (a mount target the
# base lacks would stay behind as an empty file). Debian's pip, which the stand-in's ensurepip
# installs, and pip 24.2 or newer (truststore) both read the system bundle.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class ImageError(RuntimeError):
    """A buildah or runc step failed: the message says which command and why."""


def _limit(which: int) -> str:
    soft, hard = resource.getrlimit(which)
    top = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    return f"{min(soft, top) if soft != resource.RLIM_INFINITY else top}:{top}"


@dataclass
class BuildahStore:
    """buildah with configuration and storage under ``root``; ``close`` removes all of it."""

    root: Path

    def __post_init__(self) -> None:
        if shutil.which("buildah") is None or shutil.which("runc") is None:
            raise ImageError(
                "buildah and runc are needed to build the image: scripts/apt-packages.txt lists "
                "them, scripts/setup.sh installs them"
            )
        conf = self.root / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.root / "storage"}"\n'
            f'runroot = "{self.root / "run"}"\n'
        )
        # Rlimits a container asks for must not exceed this process's own: the runtime cannot
        # raise a hard limit, and buildah's default nofile (1048576) may exceed it. (Its default
        # nproc, 32768, is left alone: asking for the host's own nproc is refused.)
        ulimits = [f"nofile={_limit(resource.RLIMIT_NOFILE)}"]
        (conf / "containers.conf").write_text(
            "[containers]\n"
            f"default_ulimits = {json.dumps(ulimits)}\n"
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
        )
        (conf / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "enforcing"\n'
        )
        (conf / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')

    @property
    def env(self) -> dict[str, str]:
        conf = self.root / "conf"
        return {
            **os.environ,
            "CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(conf / "registries.conf"),
            "BUILDAH_ISOLATION": "oci",
            "BUILDAH_RUNTIME": "runc",
            "TMPDIR": str(self._tmp()),
        }

    def _tmp(self) -> Path:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        return tmp

    def buildah(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> str:
        """Run ``buildah ARGS`` against this store; its stdout, or ImageError with the reason."""
        proc = subprocess.run(
            ["buildah", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
            cwd=cwd,
        )
        if proc.returncode != 0:
            output = (proc.stderr + proc.stdout).strip()
            raise ImageError(f"buildah {' '.join(args[:3])} ... failed: {output[-2000:]}")
        return proc.stdout

    def build(self, context: Path, tag: str, build_args: dict[str, str]) -> str:
        """``buildah bud --format docker`` of context's Dockerfile as it is; the build's log."""
        arguments = [f"--build-arg={key}={value}" for key, value in build_args.items()]
        return self.buildah(
            "bud",
            "--format=docker",  # docker format keeps HEALTHCHECK; OCI format drops it
            "--pull=never",  # the base must be the stand-in in this store, never a registry
            f"--signature-policy={self.root / 'conf' / 'policy.json'}",
            "--network=host",
            f"--volume={HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
            *arguments,
            f"--tag={tag}",
            str(context),
            timeout=420,
        )

    def inspect_image(self, image: str) -> dict[str, object]:
        data: dict[str, object] = json.loads(self.buildah("inspect", "--type=image", image))
        return data

    def layer_sizes(self, image: str) -> list[int]:
        """Uncompressed size of each layer, base first (the store keeps layers uncompressed)."""
        manifest = json.loads(str(self.inspect_image(image)["Manifest"]))
        return [int(layer["size"]) for layer in manifest["layers"]]

    def mounted_container(self, image: str) -> tuple[str, Path]:
        """A working container of ``image`` and its root filesystem, mounted on the host."""
        policy = f"--signature-policy={self.root / 'conf' / 'policy.json'}"
        name = self.buildah("from", "--pull=never", policy, image).strip()
        return name, Path(self.buildah("mount", name).strip())

    def close(self) -> None:
        """Remove every container and image, unmount what the storage mounted, delete root."""
        if not self.root.exists():
            return
        for args in (("umount", "--all"), ("rm", "--all"), ("rmi", "--all", "--force")):
            # A failure here still leaves the unmounts and the removal below to run.
            with contextlib.suppress(ImageError, subprocess.TimeoutExpired):
                self.buildah(*args, timeout=120)
        for mountpoint in sorted(_mounts_under(self.root), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mountpoint], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        points = [line.split()[4] for line in mountinfo]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]
