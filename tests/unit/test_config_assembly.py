"""One assembly step turns flags, export specs and an nbd-server file into one frozen
configuration; flags win over the file, the file over the defaults, and a flag counts as given
only when it was given (issue 12, defect 9; dual-stack default listening)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from nbdserver.config import assemble_from_argv
from nbdserver.protocol.constants import NBD_DEFAULT_PORT


def _conf(tmp_path: Path, generic: str) -> str:
    path = tmp_path / "c.conf"
    path.write_text(f"[generic]\n{generic}[d]\nexportname = {tmp_path}/d.img\n")
    return str(path)


def test_an_explicit_default_port_wins_over_the_file(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "port = 12345\n")
    assert assemble_from_argv(["--config", conf]).port == 12345
    assert assemble_from_argv(["--config", conf, "--port", str(NBD_DEFAULT_PORT)]).port == (
        NBD_DEFAULT_PORT
    )


def test_an_explicit_wildcard_bind_wins_over_the_file(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "listenaddr = 127.0.0.9\n")
    assert assemble_from_argv(["--config", conf]).bind == "127.0.0.9"
    assert assemble_from_argv(["--config", conf, "--bind", "0.0.0.0"]).bind == "0.0.0.0"


def test_metrics_bind_follows_bind_unless_given() -> None:
    base = ["--backend", "memory", "--size", "1M", "--metrics-port", "0"]
    assert assemble_from_argv([*base, "--bind", "127.0.0.1"]).metrics_bind == "127.0.0.1"
    given = assemble_from_argv([*base, "--bind", "127.0.0.1", "--metrics-bind", "127.0.0.2"])
    assert given.metrics_bind == "127.0.0.2"


def test_default_listening_is_dual_stack() -> None:
    config = assemble_from_argv(["--backend", "memory", "--size", "1M"])
    assert config.bind is None  # nothing given: every address, IPv6 and IPv4
    from nbdserver.edge.listener import listen_family

    expected = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    assert listen_family(None)[0] == expected


def test_the_configuration_is_frozen() -> None:
    config = assemble_from_argv(["--backend", "memory", "--size", "1M"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exports[0].read_only = True  # type: ignore[misc]
