"""Allow lists: who gets in, who does not, and nbd-server's authfile rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserver.acl import AccessPolicy, Acl, AclError, permits


def test_ipv4_cidr_admits_members_and_refuses_others() -> None:
    acl = Acl.from_rules(["127.0.0.2/32", "10.1.0.0/16"])
    assert acl.permits("127.0.0.2")
    assert acl.permits("10.1.255.7")
    assert not acl.permits("127.0.0.1")
    assert not acl.permits("10.2.0.1")


def test_ipv6_rules_and_ipv4_mapped_peers() -> None:
    acl = Acl.from_rules(["fd00::/8", "192.0.2.0/24"])
    assert acl.permits("fd12:3456::1")
    assert not acl.permits("fe80::1")
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d: they match IPv4 rules.
    assert acl.permits("::ffff:192.0.2.9")
    assert not acl.permits("::ffff:198.51.100.1")
    assert acl.permits("fd00::1%eth0")  # scope ids are not part of the address


def test_a_bare_address_is_a_host_rule_and_host_bits_are_masked() -> None:
    assert Acl.from_rules(["10.0.0.1/8"]).permits("10.200.0.1")
    assert not Acl.from_rules(["10.0.0.1"]).permits("10.0.0.2")


def test_bad_rule_names_its_source() -> None:
    with pytest.raises(
        AclError, match=r"--allow: not an IP address or CIDR network: 'example.com'"
    ):
        Acl.from_rules(["example.com"])


def test_non_ip_peers_are_never_admitted_by_ip_rules() -> None:
    assert not Acl.from_rules(["0.0.0.0/0", "::/0"]).permits("/run/nbd.sock")
    assert permits(None, "/run/nbd.sock")  # no list at all: everyone


def test_authfile_missing_means_everyone_empty_means_nobody(tmp_path: Path) -> None:
    assert Acl.from_authfile(tmp_path / "absent") is None
    empty = tmp_path / "empty"
    empty.write_text("# only a comment\n\n")
    acl = Acl.from_authfile(empty)
    assert acl is not None and not acl.permits("127.0.0.1")


def test_authfile_lines_comments_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "allow"
    f.write_text("127.0.0.1\n192.168.0.0/16   # the lab\n\n  2001:db8::/32\n")
    acl = Acl.from_authfile(f)
    assert acl is not None
    assert [acl.permits(a) for a in ("127.0.0.1", "192.168.4.4", "2001:db8::7", "127.0.0.2")] == [
        True,
        True,
        True,
        False,
    ]
    f.write_text("127.0.0.1\nnot-an-address\n")
    with pytest.raises(AclError, match=rf"{f}:2: not an IP address"):
        Acl.from_authfile(f)


def test_policy_global_and_per_export_lists() -> None:
    policy = AccessPolicy.build(
        Acl.from_rules(["127.0.0.0/8"]),
        [("a", Acl.from_rules(["127.0.0.2"])), ("b", None)],
    )
    assert policy.active
    assert not policy.admits_connection("10.0.0.1")  # outside the global list
    assert policy.admits_connection("127.0.0.3")  # export b has no list of its own
    assert policy.admits_export("127.0.0.2", "a")
    assert not policy.admits_export("127.0.0.3", "a")
    assert policy.visible_exports("127.0.0.3") == ["b"]


def test_policy_refuses_before_negotiation_when_no_export_admits() -> None:
    policy = AccessPolicy.build(None, [("a", Acl.from_rules(["127.0.0.2"]))])
    assert policy.admits_connection("127.0.0.2")
    assert not policy.admits_connection("127.0.0.3")


def test_policy_without_lists_is_inactive() -> None:
    policy = AccessPolicy.build(None, [("a", None)])
    assert not policy.active
    assert policy.admits_connection("203.0.113.1")
