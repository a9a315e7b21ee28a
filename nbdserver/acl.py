"""Client address allow lists (CIDR, IPv4 and IPv6), global and per export.

Why: an NBD port hands out a disk; the address check is the first gate, applied to the peer
address of a freshly accepted socket before a single handshake byte is sent. A refused client
learns nothing about the server (not even that it speaks NBD).

What it must not do: resolve names (an ACL that depends on DNS is an ACL an attacker can edit),
or treat "no list" and "an empty list" alike. ``None`` means "everyone"; an empty ``Acl`` means
"nobody", which is exactly nbd-server's authfile rule (missing file: all; empty file: none).

IPv4-mapped IPv6 peers (``::ffff:127.0.0.2``, what a dual-stack socket reports) are matched
against IPv4 rules as the IPv4 address they are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AclError(ValueError):
    """A rule that is not an address or a CIDR network; the message names where it came from."""


def parse_rule(text: str, where: str = "") -> Network:
    """One rule: an address (a /32 or /128 network) or ``address/prefixlen``.

    Host bits set under the mask (``10.0.0.1/8``) are accepted and masked off, as nbd-server
    does, because refusing them would break configs migrated from it.
    """
    rule = text.strip()
    prefix = f"{where}: " if where else ""
    if not rule:
        raise AclError(f"{prefix}empty address rule")
    try:
        return ipaddress.ip_network(rule, strict=False)
    except ValueError as exc:
        raise AclError(f"{prefix}not an IP address or CIDR network: {rule!r} ({exc})") from None


def _normalise(address: str | Address) -> Address:
    addr = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Acl:
    """An ordered set of networks; a peer is permitted when any network contains it."""

    networks: tuple[Network, ...]
    source: str = "--allow"

    @classmethod
    def from_rules(cls, rules: Iterable[str], source: str = "--allow") -> Acl:
        return cls(tuple(parse_rule(r, source) for r in rules), source)

    @classmethod
    def from_authfile(cls, path: str | Path) -> Acl | None:
        """nbd-server's authfile: one address or CIDR per line, ``#`` starts a comment.

        A missing file returns ``None`` (everyone may connect), an empty one an empty Acl
        (nobody may), as nbd-server(5) documents.
        """
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        nets = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            rule = line.split("#", 1)[0].strip()
            if rule:
                nets.append(parse_rule(rule, f"{p}:{lineno}"))
        return cls(tuple(nets), str(p))

    def permits(self, address: str | Address) -> bool:
        try:
            addr = _normalise(address)
        except ValueError:
            # Not an IP peer (a unix socket reports "" or a path): IP rules cannot admit it.
            return False
        return any(addr in net for net in self.networks if net.version == addr.version)

    def __str__(self) -> str:
        return ", ".join(str(n) for n in self.networks) or "(nobody)"


def permits(acl: Acl | None, address: str | Address) -> bool:
    """``None`` is the absence of a list: everyone is permitted."""
    return acl is None or acl.permits(address)


@dataclass(frozen=True)
class AccessPolicy:
    """The server-wide list plus each export's own list.

    A connection is admitted before negotiation only if the global list permits it and at least
    one export's list does too (otherwise it could do nothing but probe); the export it then asks
    for must permit it as well (checked at NBD_OPT_GO / EXPORT_NAME, refused with
    NBD_REP_ERR_POLICY), and LIST shows it only the exports it may open.
    """

    global_acl: Acl | None = None
    per_export: tuple[tuple[str, Acl | None], ...] = ()

    @classmethod
    def build(
        cls, global_acl: Acl | None, exports: Sequence[tuple[str, Acl | None]]
    ) -> AccessPolicy:
        return cls(global_acl, tuple(exports))

    @property
    def active(self) -> bool:
        """False when nothing is restricted: the edge may skip every check."""
        return self.global_acl is not None or any(a is not None for _, a in self.per_export)

    def admits_connection(self, address: str) -> bool:
        if not permits(self.global_acl, address):
            return False
        if not self.per_export:
            return True
        return any(permits(acl, address) for _, acl in self.per_export)

    def admits_export(self, address: str, export: str) -> bool:
        if not permits(self.global_acl, address):
            return False
        for name, acl in self.per_export:
            if name == export:
                return permits(acl, address)
        return True  # unknown export: the protocol answers ERR_UNKNOWN, not an ACL refusal

    def visible_exports(self, address: str) -> list[str]:
        return [name for name, acl in self.per_export if permits(acl, address)]


def address_of(peer: str) -> str:
    """The address part of the edge's peer label: ``1.2.3.4:5`` or ``[::1]:5`` -> address."""
    if peer.startswith("["):
        return peer[1 : peer.find("]")]
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else peer
