"""--format and the header refusal: an image whose header names a format is never served as raw
bytes unless the configuration says raw, and a format is named only by configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.cli import main
from nbdserver.config import assemble_from_argv
from nbdserver.config.nbdfile import read_layer as read_nbd_file
from nbdserver.config.specs import parse_export_spec
from nbdserver.errors import ConfigError
from nbdserver.exports import open_export
from nbdserver.formats import probe
from nbdserver.formats.registry import FORMATS, NAMES

HEADERS = {
    "qcow2": b"QFI\xfb\x00\x00\x00\x03",
    "vmdk": b"KDMV\x01\x00\x00\x00",
    "xz": b"\xfd7zXZ\x00\x00\x04",
}


def _image(tmp_path: Path, head: bytes, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(head + bytes((1 << 20) - len(head)))
    return path


@pytest.mark.parametrize("fmt", sorted(HEADERS))
def test_probe_names_the_format_a_header_declares(fmt: str) -> None:
    assert probe.detect(HEADERS[fmt] + bytes(504)) == fmt


def test_probe_knows_a_vmdk_text_descriptor() -> None:
    assert probe.detect(b"# Disk DescriptorFile\nversion=1\n") == "vmdk"


def test_probe_finds_nothing_in_zeroes_or_random_raw_bytes() -> None:
    assert probe.detect(bytes(512)) is None
    assert probe.detect(b"QFI") is None  # too short to be a magic


@pytest.mark.parametrize("fmt", sorted(HEADERS))
@pytest.mark.parametrize("read_only", [False, True])
def test_an_image_with_a_format_header_is_refused_without_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, read_only: bool
) -> None:
    path = _image(tmp_path, HEADERS[fmt])
    argv = ["serve", str(path), "--bind", "127.0.0.1", "--port", "0"]
    assert main(argv + (["--read-only"] if read_only else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"is a {fmt} image" in err and "--format" in err


def test_an_export_spec_with_a_format_header_is_refused_too(tmp_path: Path) -> None:
    path = _image(tmp_path, HEADERS["qcow2"])
    cfg = parse_export_spec(f"a={path},ro=yes")
    with pytest.raises(ConfigError, match=r"qcow2 image.*--format qcow2"):
        open_export(cfg)


def test_format_raw_serves_the_bytes_of_a_qcow2_file_when_asked(tmp_path: Path) -> None:
    path = _image(tmp_path, HEADERS["qcow2"])
    export = open_export(parse_export_spec(f"a={path},format=raw"))
    try:
        buf = bytearray(8)
        export.backend.pread(memoryview(buf), 0)
        assert bytes(buf) == HEADERS["qcow2"]
    finally:
        export.close()


def test_format_is_a_flag_and_an_export_spec_option() -> None:
    cfg = assemble_from_argv(["x.qcow2", "--format", "qcow2", "-e", "b=y.qcow2,format=qcow2"])
    assert [e.format for e in cfg.exports] == ["qcow2", "qcow2"]
    assert parse_export_spec("c=z,backing-anywhere=yes").backing_anywhere


def test_an_unknown_format_is_refused_in_a_spec() -> None:
    with pytest.raises(ConfigError, match="unknown format 'qed'"):
        parse_export_spec("a=x,format=qed")


def test_size_does_not_apply_to_a_qcow2_image() -> None:
    with pytest.raises(ConfigError, match="--size does not apply"):
        parse_export_spec("a=x,format=qcow2,size=1G")


def test_the_nbd_server_file_has_no_format_key(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    conf.write_text("[generic]\n[disk]\nexportname = /tmp/x.qcow2\nformat = qcow2\n")
    with pytest.raises(ConfigError, match="unknown key 'format'"):
        read_nbd_file(str(conf))


def test_every_registered_format_opens_over_a_path_and_says_if_it_writes() -> None:
    assert NAMES[0] == "raw" and "qcow2" in FORMATS
    for kind in FORMATS.values():
        assert callable(kind.open) and isinstance(kind.can_write, bool)
