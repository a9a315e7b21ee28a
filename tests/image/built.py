"""The image as the tests see it: built once from the working tree, and removed with its store.

Why it exists: the fixture (conftest.py) and the tests share this shape; keeping it out of the
conftest means a test imports a plain module, not a conftest. ``build`` commits the stand-in base
(base_image.py), builds the Dockerfile as it is (docker format, REVISION set to the commit),
inspects the result and mounts it for runc; ``remove`` undoes all of it, containers first.

What it must not do: skip. Every failure raises with its reason, so each image test fails.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.image.base_image import ROOT, base_image
from tests.image.buildah_store import BuildahStore
from tests.image.oci_run import ImageRunner, remove_all_containers

TAG = "localhost/kube-nbd:image-test"


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    base: str
    config: dict[str, object]  # the image's Docker config: Env, User, Labels, Healthcheck...
    layer_sizes: list[int]  # uncompressed, base layer first
    build_seconds: float
    runner: ImageRunner

    def path(self, inside: str) -> Path:
        """A path inside the image's root filesystem, read from the host."""
        return self.runner.rootfs / inside.lstrip("/")


def _revision() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() or "unknown"


def build(store: BuildahStore) -> BuiltImage:
    base = base_image(store, ROOT / "Dockerfile")
    started = time.monotonic()
    store.build(ROOT, TAG, {"REVISION": _revision()})
    seconds = time.monotonic() - started
    config = store.inspect_image(TAG)["Docker"]["config"]  # type: ignore[index]
    _, rootfs = store.mounted_container(TAG)
    runner = ImageRunner(rootfs, config, store.root / "oci")
    return BuiltImage(TAG, base, config, store.layer_sizes(TAG), seconds, runner)


def remove(store: BuildahStore) -> None:
    remove_all_containers(store.root / "oci")
    store.close()


def remove_stores_of_dead_runs(stores: Path) -> None:
    """Stores whose run (named by its pid) is gone: a run killed before its teardown."""
    for old in stores.glob("*"):
        if old.name.isdigit() and not Path("/proc", old.name).exists():
            remove(BuildahStore(old))
