"""Fixtures for tier-3 kernel tests (UML); the harness itself is tests/kernel/uml.py.

Every test here is marked ``kernel``. ``uml`` runs one scenario in a fresh UML guest whose
shared working directory lives under the test's tmp_path (kept by pytest for post-mortems).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.uml import UmlResult, run_in_uml


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/kernel/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture
def uml(tmp_path: Path) -> Callable[..., UmlResult]:
    """``uml(scenario, **kwargs)`` -> UmlResult; see run_in_uml for the contract."""
    counter = itertools.count()

    def run(scenario: Any, **kwargs: Any) -> UmlResult:
        kwargs.setdefault("workdir", tmp_path / f"guest{next(counter)}")
        return run_in_uml(scenario, **kwargs)

    return run
