"""The image tier's one expensive fixture: the Dockerfile built once per run, then torn down.

``built_image`` makes a private buildah store, commits the stand-in base into it under the name
the Dockerfile's PYTHON_IMAGE expects (tests/image/base_image.py), builds the Dockerfile as it is
in the working tree (docker format), mounts the result for runc, and at the end removes all of
it. The store lives in ``.cache/image/stores/<pid>``: a run killed before its teardown leaves its
store there, and the next run removes it (with its mounts) first. Nothing here skips: where
buildah, runc, mmdebstrap, the Debian archive or PyPI are missing, the fixture raises and every
image test fails with that reason.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.image.base_image import CACHE, ROOT, base_image
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


def _revision() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return proc.stdout.strip() or "unknown"


def _remove(store: BuildahStore) -> None:
    remove_all_containers(store.root / "oci")
    store.close()


def _remove_stores_of_dead_runs(stores: Path) -> None:
    for old in stores.glob("*"):
        if old.name.isdigit() and not Path("/proc", old.name).exists():
            _remove(BuildahStore(old))


@pytest.fixture(scope="session")
def built_image() -> Iterator[BuiltImage]:
    stores = CACHE / "stores"
    _remove_stores_of_dead_runs(stores)
    store = BuildahStore(stores / str(os.getpid()))
    try:
        base = base_image(store, ROOT / "Dockerfile")
        started = time.monotonic()
        store.build(ROOT, TAG, {"REVISION": _revision()})
        seconds = time.monotonic() - started
        inspected = store.inspect_image(TAG)
        config = inspected["Docker"]["config"]  # type: ignore[index]
        _, rootfs = store.mounted_container(TAG)
        runner = ImageRunner(rootfs, config, store.root / "oci")
        yield BuiltImage(TAG, base, config, store.layer_sizes(TAG), seconds, runner)
    finally:
        _remove(store)


def image_path(image: BuiltImage, path: str) -> Path:
    """A path inside the image's root filesystem, read from the host."""
    return image.runner.rootfs / path.lstrip("/")
