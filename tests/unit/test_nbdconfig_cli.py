"""How --config and the security flags become server settings (nbdserver.config.assemble) and
a policy guard (nbdserver.policy.guard)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.backends.memory import MemoryBackend
from nbdserver.config import ServerConfig, TlsMode, assemble_from_argv
from nbdserver.errors import ConfigError
from nbdserver.exports import open_export
from nbdserver.filters.cow import CowFilter
from nbdserver.filters.qos import QosFilter, QosLimits
from nbdserver.policy.guard import Guard


def _build(*argv: str) -> tuple[ServerConfig, Guard | None]:
    config = assemble_from_argv(argv)
    return config, Guard.build(config)


def test_no_feature_flags_means_no_guard_and_unwrapped_backends() -> None:
    config, guard = _build("--backend", "memory", "--size", "1M")
    assert guard is None and config.tls.mode is TlsMode.OFF
    export = open_export(config.exports[0])
    try:
        assert type(export.backend) is MemoryBackend  # the hot path sees the backend itself
    finally:
        export.backend.close()


def test_qos_and_cow_flags_wrap_every_export(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(65536))
    config, guard = _build(
        str(image), "--copy-on-write", "--cow-dir", str(tmp_path), "--qos-write-bps", "1000"
    )
    assert guard is None  # filters live in the export; no per-connection work is needed
    export = open_export(config.exports[0])
    try:
        assert isinstance(export.backend, QosFilter)
        assert isinstance(export.backend.inner, CowFilter)
        assert not export.backend.inner.inner.can_write  # the base is opened read-only
    finally:
        export.backend.close()


def test_config_file_settings_and_command_line_precedence(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(
        "[generic]\nport = 12345\nlistenaddr = 127.0.0.9\nmaxconnections = 7\n"
        f"[disk]\nexportname = {tmp_path}/d.img\nfilesize = 4096\nreadonly = true\n"
    )
    config, guard = _build("--config", str(conf))
    assert (config.port, config.bind, config.max_connections) == (12345, "127.0.0.9", 7)
    assert [(e.name, e.read_only, e.size) for e in config.exports] == [("disk", True, 4096)]
    assert guard is not None and not guard.opts.list_allowed  # allowlist defaults to false
    config, _ = _build("--config", str(conf), "--port", "2000", "--bind", "127.0.0.1")
    assert (config.port, config.bind) == (2000, "127.0.0.1")


def test_tls_flags(tmp_path: Path) -> None:
    from tests.interop.security_helpers import make_pki

    pki = make_pki(tmp_path / "pki")
    config, guard = _build(
        "--backend",
        "memory",
        "--size",
        "1M",
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
    )
    assert config.tls.mode is TlsMode.ON and guard is not None and guard.tls_context is not None
    with pytest.raises(ConfigError, match="TLS files given but --tls off"):
        _build(
            "--backend",
            "memory",
            "--size",
            "1M",
            "--tls",
            "off",
            "--tls-cert",
            str(pki.server_cert),
        )
    with pytest.raises(ConfigError, match="an export is TLS-only but TLS is off"):
        _build("--export", "a=memory,size=1M,tls=1")


def test_config_file_errors_surface_as_config_errors(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("[generic]\ntlsprio = NORMAL\n[a]\nexportname = /x\n")
    with pytest.raises(ConfigError, match=rf"{conf}:2: \[generic\] tlsprio is not supported"):
        _build("--config", str(conf))


def test_per_export_qos_and_cow_dir_options(tmp_path: Path) -> None:
    config, _ = _build(
        "--export", f"a=memory,size=1M,qos-read-iops=5,qos-write-bps=100,cow-dir={tmp_path}",
        "--export", "b=memory,size=1M",
        "--qos-write-bps", "999",
    )  # fmt: skip
    a, b = config.exports
    assert a.qos == QosLimits(read_iops=5, write_bps=100)  # the export's own value wins
    assert b.qos == QosLimits(write_bps=999)
    assert a.cow_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="expected an integer"):
        _build("--export", "a=memory,size=1M,qos-read-bps=fast")


def test_idle_timeout_from_the_flag_the_export_and_nbd_server_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"[generic]\n[slow]\nexportname = {tmp_path}/s.img\ntimeout = 30\n"
        f"[plain]\nexportname = {tmp_path}/p.img\n"
    )
    config, _ = _build(
        "--config", str(conf), "--export", "own=memory,size=1M,idle-timeout=2.5",
        "--export", "other=memory,size=1M", "--idle-timeout", "7",
    )  # fmt: skip
    timeouts = {e.name: e.idle_timeout for e in config.exports}
    assert timeouts == {"own": 2.5, "other": 7.0, "slow": 30.0, "plain": 7.0}
    config, _ = _build("--backend", "memory", "--size", "1M")
    assert config.exports[0].idle_timeout == 0  # off unless asked for
    for bad in (["--idle-timeout", "-1"], ["--idle-timeout", "nan"]):
        with pytest.raises(ConfigError, match="--idle-timeout must be"):
            _build("--backend", "memory", "--size", "1M", *bad)
    with pytest.raises(ConfigError, match="idle timeout of 'x' must be 0"):
        _build("--export", "x=memory,size=1M,idle-timeout=-3")
