"""The image tier's one expensive fixture: the Dockerfile built once per run, then torn down.

``built_image`` makes a private buildah store, commits the stand-in base into it under the name
the Dockerfile's PYTHON_IMAGE expects (tests/image/base_image.py), builds the Dockerfile as it is
in the working tree (docker format), mounts the result for runc, and at the end removes all of
it (tests/image/built.py). The store lives in ``.cache/image/stores/<pid>``: a run killed before
its teardown leaves its store there, and the next run removes it (containers and mounts too)
first. Nothing here skips: where buildah, runc, mmdebstrap, the Debian archive or PyPI are
missing, the fixture raises and every image test fails with that reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.image.base_image import CACHE
from tests.image.buildah_store import BuildahStore
from tests.image.built import BuiltImage, build, remove, remove_stores_of_dead_runs


@pytest.fixture(scope="session")
def built_image() -> Iterator[BuiltImage]:
    stores = CACHE / "stores"
    remove_stores_of_dead_runs(stores)
    store = BuildahStore(stores / str(os.getpid()))
    try:
        yield build(store)
    finally:
        remove(store)
