"""NBD URI parsing and formatting, following the examples of doc/uri.md."""

from __future__ import annotations

import pytest

from nbdserver.protocol.uri import NBDURIError, parse_uri


@pytest.mark.parametrize(
    ("text", "export"),
    [
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
    ],
)
def test_export_name_is_the_path_without_its_leading_slash(text: str, export: str) -> None:
    assert parse_uri(text).export_name == export


def test_tcp_defaults_and_explicit_port() -> None:
    uri = parse_uri("nbd://server.ns.svc/vol")
    assert (uri.host, uri.port, uri.tls, uri.is_unix) == ("server.ns.svc", 10809, False, False)
    assert parse_uri("nbd://10.0.0.1:2000/x").port == 2000


def test_ipv6_literal_and_userinfo() -> None:
    uri = parse_uri("nbds://alice@[fd00::1]:10810/x")
    assert (uri.host, uri.port, uri.username, uri.tls) == ("fd00::1", 10810, "alice", True)


def test_unix_socket_uris() -> None:
    uri = parse_uri("nbds+unix:///e?socket=/run/nbd.sock&tls-hostname=srv&tls-verify-peer=0")
    assert uri.socket_path == "/run/nbd.sock" and uri.host is None and uri.tls
    assert uri.server_hostname == "srv" and not uri.tls_verify_peer
    assert parse_uri("nbd+unix:///?socket=%00/abstract").socket_path == "\0/abstract"


def test_tls_certificates_and_experimental_parameters() -> None:
    uri = parse_uri("nbds://h/e?tls-certificates=/etc/pki/nbd&x-foo=1&tls-type=x509")
    assert uri.tls_certificates == "/etc/pki/nbd" and uri.extra == {"x-foo": "1"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://h/e", "scheme"),
        ("nbd:///e", "missing host"),
        ("nbd://h/e?socket=/s", "only valid"),
        ("nbd+unix:///e", "needs a socket"),
        ("nbd+unix://h/e?socket=/s", "takes no host"),
        ("nbd://h/e?bogus=1", "unknown query parameter"),
        ("nbd://h/e?tls-verify-peer=yes", "0 or 1"),
        ("nbd://h/e?tls-type=psk", "not supported"),
        ("nbd://h:99999/e", "out of range"),
        ("nbd://h/e#frag", "fragment"),
        ("nbd://h/a%00b", "NUL"),
        ("nbd://h/e?tls-hostname=a&tls-hostname=b", "twice"),
        ("nbd+unix:///e?socket=a&socket=b", "twice"),
    ],
)
def test_bad_uris_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(NBDURIError, match=reason):
        parse_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        "nbd://h/e",
        "nbds://h:2000/a%20b",
        "nbd://[fd00::1]/",
        "nbds+unix:///e?socket=/run/s.sock&tls-verify-peer=0",
        "nbd://h/%2Fslash",
    ],
)
def test_format_round_trips(text: str) -> None:
    uri = parse_uri(text)
    assert parse_uri(str(uri)) == uri
