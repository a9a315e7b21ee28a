"""The nbdserver command line: sizes, export specs, image creation and the refusal to shrink,
exit status 2 with a clear message for bad input, and ``python -m nbdserver``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdserver.cli import main
from nbdserver.config import ExportConfig, assemble_from_argv
from nbdserver.config.specs import parse_export_spec, parse_size
from nbdserver.errors import ConfigError
from nbdserver.exports import open_export

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("1G", 1 << 30),
        ("512M", 512 << 20),
        ("64k", 64 << 10),
        ("2GiB", 2 << 30),
        ("1.5G", 3 << 29),
        ("10B", 10),
    ],
)
def test_sizes_parse_in_binary_units(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "G", "-1G", "1X", "1.3B", "one"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_export_spec_with_options() -> None:
    cfg = parse_export_spec("data=/srv/d.img,size=1G,ro,description=main disk,connections=2")
    assert (cfg.name, cfg.path, cfg.size, cfg.read_only) == ("data", "/srv/d.img", 1 << 30, True)
    assert (cfg.description, cfg.connections, cfg.backend) == ("main disk", 2, "auto")


def test_memory_export_spec_needs_a_size() -> None:
    assert parse_export_spec("scratch=memory,size=8M").backend == "memory"
    with pytest.raises(ConfigError, match="needs a size"):
        parse_export_spec("scratch=memory")


@pytest.mark.parametrize("spec", ["noequals", "x=/a,bogus=1", "x=/a,connections=many"])
def test_bad_export_specs_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_export_spec(spec)


def test_image_and_extra_exports_become_one_config(tmp_path: Path) -> None:
    config = assemble_from_argv(
        [str(tmp_path / "a.img"), "--name", "a", "--size", "1M", "--port", "0",
         "-e", "b=memory,size=2M", "--max-connections", "7", "--handshake-timeout", "2"]
    )  # fmt: skip
    assert [e.name for e in config.exports] == ["a", "b"]
    assert config.exports[0].size == 1 << 20 and config.port == 0
    assert config.max_connections == 7 and config.handshake_timeout == 2


def test_nothing_to_serve_is_an_error() -> None:
    with pytest.raises(ConfigError, match="nothing to serve"):
        assemble_from_argv([])


def test_size_creates_a_sparse_image(tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    export = open_export(ExportConfig(name="", path=str(path), size=1 << 30))
    try:
        st = os.stat(path)
        assert st.st_size == 1 << 30 and st.st_blocks == 0
    finally:
        export.backend.close()


def test_size_grows_a_smaller_image_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "grow.img"
    path.write_bytes(b"keep" * 1024)
    export = open_export(ExportConfig(name="", path=str(path), size=1 << 20))
    export.backend.close()
    assert path.stat().st_size == 1 << 20 and path.read_bytes()[:4096] == b"keep" * 1024


def test_refuses_to_shrink_an_existing_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(b"x" * 8192)
    assert main(["serve", str(path), "--size", "4096", "--port", "0"]) == 2
    assert "refusing to shrink" in capsys.readouterr().err
    assert path.read_bytes() == b"x" * 8192


def test_missing_image_without_size_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "absent.img"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "nbdserver", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    )
    assert res.returncode == 0 and res.stdout.startswith("nbdserver ")


@pytest.mark.parametrize(
    "extra",
    [["--port", "70000"], ["--port", "-1"], ["--workers", "0"], ["--max-connections", "-2"],
     ["--handshake-timeout", "0"], ["--no-tcp"]],
)  # fmt: skip
def test_bad_numbers_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert main(["serve", str(tmp_path / "x.img"), "--size", "1M", *extra]) == 2
    assert capsys.readouterr().err.startswith("nbdserver: ")
