"""nbd-server's config dialect: what is honoured, and every problem reported with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.config.nbdfile import FileError as ConfigError
from nbdserver.config.nbdfile import load, parse

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nbd-server.conf"


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse(text, "t.conf")
    return exc.value.problems


def test_the_shipped_example_parses_with_one_warning() -> None:
    cfg = load(EXAMPLE)
    g = cfg.generic
    assert (g.port, g.listenaddr, g.allowlist, g.maxconnections) == (10809, ["127.0.0.1"], True, 64)
    assert [e.name for e in cfg.exports] == ["golden", "scratch", "data"]
    golden, scratch, data = cfg.exports
    assert golden.readonly and golden.filesize == 64 << 20 and golden.flush
    assert scratch.copyonwrite and scratch.sparse_cow and scratch.timeout == 0
    assert scratch.maxconnections == 4 and scratch.fua and scratch.trim
    assert data.authfile == "/etc/nbd-server/allow"
    line = next(
        n for n, text in enumerate(EXAMPLE.read_text().splitlines(), 1) if "max_threads" in text
    )
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith(f"{EXAMPLE}:{line}: [generic] max_threads: ")


def test_section_name_is_the_export_name_and_exportname_the_path() -> None:
    cfg = parse("[generic]\n[disk one]\nexportname = /img/a\n", "t.conf")
    assert cfg.exports[0].name == "disk one" and cfg.exports[0].exportname == "/img/a"
    assert cfg.generic.port is None and not cfg.generic.allowlist  # not given: the defaults


def test_tls_keys_and_force_tls() -> None:
    cfg = parse(
        "[generic]\ncertfile=/c.pem\nkeyfile=/k.pem\ncacertfile=/ca.pem\nforce_tls=true\n"
        "[x]\nexportname=/x\nforce_tls=true\n[y]\nexportname=/y\ntlsonly=false\n",
        "t.conf",
    )
    assert cfg.tls_enabled and cfg.generic.force_tls and cfg.generic.cacertfile == "/ca.pem"
    assert [e.tlsonly for e in cfg.exports] == [True, False]


def test_unsupported_keys_are_errors_with_file_and_line() -> None:
    problems = _problems(
        "[generic]\ntlsprio = NORMAL\n[x]\nexportname = /x\nprerun = echo %s\nmultifile = true\n"
    )
    assert problems[0].startswith("t.conf:2: [generic] tlsprio is not supported by nbdserver")
    assert problems[1].startswith("t.conf:5: [x] prerun is not supported")
    assert problems[2].startswith("t.conf:6: [x] multifile is not supported")


def test_unsupported_boolean_features_turned_off_are_fine() -> None:
    cfg = parse("[generic]\noldstyle = false\n[x]\nexportname=/x\nmultifile=false\nsync=false\n")
    assert cfg.exports[0].name == "x"


def test_unknown_keys_bad_values_and_all_problems_at_once() -> None:
    problems = _problems(
        "[generic]\nport = 70000\nbogus = 1\n[x]\nexportname = relative.img\n"
        "readonly = yes\nfilesize = 1G\ntimeout = -1\n"
    )
    assert problems == [
        "t.conf:2: [generic] port: port 70000 out of range 1-65535",
        "t.conf:3: [generic] unknown key 'bogus'",
        "t.conf:5: [x] exportname must be an absolute path, not 'relative.img'",
        "t.conf:6: [x] readonly: boolean must be true or false, not 'yes'",
        "t.conf:7: [x] filesize: expected a non-negative integer, not '1G'",
        "t.conf:8: [x] timeout: expected a non-negative integer, not '-1'",
    ]


def test_structure_errors() -> None:
    assert _problems("[disk]\nexportname=/a\n")[0] == (
        "t.conf:1: the first section must be [generic], not [disk]"
    )
    assert "t.conf:1: port appears before any [section]" in _problems("port=1\n[generic]\n[a]\n")
    dup = _problems("[generic]\n[a]\nexportname=/a\n[a]\nexportname=/b\n")
    assert dup == ["t.conf:4: section [a] already defined at line 2"]
    assert _problems("[generic]\n[a]\nexportname=/a\nexportname=/b\n") == [
        "t.conf:4: exportname already set at line 3"
    ]
    assert _problems("[generic]\n[a]\nreadonly=true\n") == [
        "t.conf:2: [a] has no exportname (the file to serve)"
    ]
    assert parse("[generic]\n").exports == []  # Debian's shipped file: exports come later
    assert _problems("[generic]\nthis is not an option\n[a]\nexportname=/a\n") == [
        "t.conf:2: not a section header, comment or key = value line"
    ]


def test_tls_only_without_credentials_is_an_error() -> None:
    assert _problems("[generic]\n[a]\nexportname=/a\ntlsonly=true\n") == [
        "t.conf: force_tls/tlsonly set but no certfile/keyfile in [generic]"
    ]


def test_authfile_is_loaded_and_its_errors_reported(tmp_path: Path) -> None:
    allow = tmp_path / "allow"
    allow.write_text("127.0.0.2\n10.0.0.0/8\n")
    cfg = parse(f"[generic]\n[a]\nexportname=/a\nauthfile={allow}\n")
    acl = cfg.exports[0].acl
    assert acl is not None and acl.permits("10.9.9.9") and not acl.permits("127.0.0.1")
    missing = parse(f"[generic]\n[a]\nexportname=/a\nauthfile={tmp_path / 'none'}\n")
    assert missing.exports[0].acl is None  # nbd-server: no file, everyone may connect
    allow.write_text("nonsense\n")
    problems = _problems(f"[generic]\n[a]\nexportname=/a\nauthfile={allow}\n")
    assert problems == [
        f"t.conf:4: [a] authfile: {allow}:1: not an IP address or CIDR network: "
        "'nonsense' ('nonsense' does not appear to be an IPv4 or IPv6 network)"
    ]


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config: No such file or directory"):
        load(tmp_path / "absent.conf")


def test_keys_honoured_only_partly_are_warnings_with_lines() -> None:
    cfg = parse(
        "[generic]\nsplice = true\n[a]\nexportname=/a\ntimeout = 30\nsparse_cow = false\n"
        "listenaddr = 10.0.0.1\n",
        "t.conf",
    )
    assert [w.split(": ")[0:2] for w in cfg.warnings] == [  # timeout is honoured (idle timeout)
        ["t.conf:2", "[generic] splice"],
        ["t.conf:6", "[a] sparse_cow"],
        ["t.conf:7", "[a] listenaddr"],
    ]


def test_more_than_one_listen_address_is_an_error() -> None:
    assert _problems("[generic]\nlistenaddr = ::, 0.0.0.0\n[a]\nexportname=/a\n") == [
        "t.conf:2: [generic] listenaddr: nbdserver listens on one address; give one "
        "(0.0.0.0 or ::), not ::, 0.0.0.0"
    ]
