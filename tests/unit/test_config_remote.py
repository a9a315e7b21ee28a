"""URL images in the configuration: the options they take and what they refuse before opening."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.config.assemble import assemble_from_argv
from nbdserver.config.specs import parse_export_spec
from nbdserver.errors import ConfigError

URL = "https://images.example/disk.img"


def test_a_url_image_takes_cache_ca_bundle_and_timeout_flags() -> None:
    cfg = assemble_from_argv(
        [URL, "--cache-size", "256M", "--ca-bundle", "/ca.pem", "--remote-timeout", "5"]
    )
    (e,) = cfg.exports
    assert (e.path, e.remote, e.cache_size, e.ca_bundle, e.remote_timeout) == (
        URL, True, 256 << 20, "/ca.pem", 5.0
    )  # fmt: skip
    assert not e.per_client


def test_an_export_spec_takes_the_same_options() -> None:
    e = parse_export_spec(f"d={URL},cache-size=1G,ca-bundle=/b.pem,remote-timeout=2.5")
    assert (e.remote, e.cache_size, e.ca_bundle, e.remote_timeout) == (True, 1 << 30, "/b.pem", 2.5)


@pytest.mark.parametrize(
    ("argv", "words"),
    [([URL, "--size", "1G"], "never created"),
     ([URL, "--format", "qcow2", "--size", "1G"], "never created|does not apply"),
     ([URL, "--remote-timeout", "0"], "remote timeout"),
     (["/img", "--cache-size", "-1"], "bad size")],
)  # fmt: skip
def test_what_a_url_cannot_do_is_refused_before_opening(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        assemble_from_argv(argv)


def test_a_plain_path_is_not_remote() -> None:
    (e,) = assemble_from_argv(["/srv/disk.img"]).exports
    assert not e.remote and e.cache_size == 0


def test_an_s3_url_is_remote_and_takes_an_endpoint() -> None:
    (e,) = assemble_from_argv(
        ["s3://images/disk.img", "--s3-endpoint", "http://minio:9000"]
    ).exports
    assert e.remote and e.s3_endpoint == "http://minio:9000"
    spec = parse_export_spec("d=s3://b/k,s3-endpoint=http://127.0.0.1:9000")
    assert spec.remote and spec.s3_endpoint == "http://127.0.0.1:9000"


def test_a_cache_dir_is_taken_by_flag_and_export_spec(tmp_path: Path) -> None:
    (e,) = assemble_from_argv([URL, "--cache-size", "1G", "--cache-dir", str(tmp_path)]).exports
    assert (e.cache_size, e.cache_dir) == (1 << 30, str(tmp_path))
    spec = parse_export_spec(f"d={URL},cache-size=64M,cache-dir={tmp_path}")
    assert spec.cache_dir == str(tmp_path)


def test_a_cache_dir_needs_a_size_and_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs --cache-size"):
        assemble_from_argv([URL, "--cache-dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="not a directory"):
        assemble_from_argv([URL, "--cache-size", "1G", "--cache-dir", str(tmp_path / "none")])
