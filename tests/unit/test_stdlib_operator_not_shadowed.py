"""The folder operator/ must never become a package named ``operator``: it would shadow the
standard library's ``operator`` module whenever the repository root is on sys.path (as it is
under pytest here, ``python -m``, and setuptools run from the root)."""

from __future__ import annotations

import operator
import pathlib
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_operator_is_the_standard_library_module() -> None:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    origin = getattr(operator, "__file__", None)
    if origin is not None:  # the pure-Python operator.py of the standard library
        assert pathlib.Path(origin).resolve().parent == stdlib, origin
    assert operator.itemgetter("a")({"a": 1}) == 1
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_operator_from_the_repository_root_is_still_the_standard_library() -> None:
    # A fresh interpreter with the root first on sys.path, as `python -m` from the root has.
    code = "import operator, sys; print(operator.__file__); print(operator.attrgetter)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    path = pathlib.Path(result.stdout.splitlines()[0]).resolve()
    assert path.parent == pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert ROOT not in path.parents


def test_the_operator_package_is_nbd_operator() -> None:
    import nbd_operator

    assert (
        pathlib.Path(nbd_operator.__file__).resolve().parent == ROOT / "operator" / "nbd_operator"
    )
