"""NBD URIs (doc/uri.md of NetworkBlockDevice/nbd): parse and format, nothing else.

Why: NBDExport status carries ``nbd://host:port/export`` (``nbds://`` with TLS) and the agent
connects to what it says; one strict parser keeps both ends honest and turns a typo into a clear
error instead of a connection to the wrong export.

Supported: schemes nbd, nbds, nbd+unix, nbds+unix; host (names, IPv4, bracketed IPv6), port
(default 10809); export name = path without its leading "/" (percent-decoded, so "//disk" names
"/disk"); query parameters ``socket`` (required for and only allowed with +unix),
``tls-hostname``, ``tls-verify-peer`` (0/1), ``tls-type`` (only x509 here),
``tls-certificates`` (a directory with ca-cert.pem, client-cert.pem, client-key.pem, as libnbd
uses it); ``x-*`` parameters are kept but ignored; anything else is an error, as the spec asks.

What this module must not do: resolve names, open sockets or read certificate files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from nbdserver.protocol.constants import NBD_DEFAULT_PORT

SCHEMES = {"nbd": (False, False), "nbds": (True, False), "nbd+unix": (False, True),
           "nbds+unix": (True, True)}  # fmt: skip
_KNOWN = {"socket", "tls-hostname", "tls-verify-peer", "tls-type", "tls-certificates"}


class NBDURIError(ValueError):
    """The text is not a usable NBD URI."""


@dataclass(frozen=True, slots=True)
class NBDURI:
    tls: bool  # True for nbds / nbds+unix: TLS is mandatory
    export_name: str = ""
    host: str | None = None  # TCP only
    port: int = NBD_DEFAULT_PORT
    socket_path: str | None = None  # +unix only
    username: str | None = None
    tls_hostname: str | None = None
    tls_verify_peer: bool = True
    tls_certificates: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def is_unix(self) -> bool:
        return self.socket_path is not None

    @property
    def server_hostname(self) -> str | None:
        """The name to check the server certificate against."""
        return self.tls_hostname or self.host

    def __str__(self) -> str:
        scheme = ("nbds" if self.tls else "nbd") + ("+unix" if self.is_unix else "")
        query: list[tuple[str, str]] = []
        if self.socket_path is not None:
            query.append(("socket", self.socket_path))
            authority = ""
        else:
            host = self.host or ""
            host = f"[{host}]" if ":" in host else host
            user = f"{quote(self.username, safe='')}@" if self.username else ""
            port = f":{self.port}" if self.port != NBD_DEFAULT_PORT else ""
            authority = f"{user}{host}{port}"
        if self.tls_hostname:
            query.append(("tls-hostname", self.tls_hostname))
        if not self.tls_verify_peer:
            query.append(("tls-verify-peer", "0"))
        if self.tls_certificates:
            query.append(("tls-certificates", self.tls_certificates))
        path = "/" + quote(self.export_name, safe="")
        qs = "&".join(f"{k}={quote(v, safe='/')}" for k, v in query)
        return f"{scheme}://{authority}{path}" + (f"?{qs}" if qs else "")


def parse_uri(text: str) -> NBDURI:
    """Parse an NBD URI; raise ``NBDURIError`` with the reason when it is not one."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise NBDURIError(f"{text!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise NBDURIError(f"{text!r}: scheme must be one of {', '.join(SCHEMES)}")
    tls, unix = SCHEMES[scheme]
    if parts.fragment:
        raise NBDURIError(f"{text!r}: fragments are not allowed in NBD URIs")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise NBDURIError(f"{text!r}: bad query: {exc}") from None
    query: dict[str, str] = {}
    extra: dict[str, str] = {}
    for key, value in pairs:
        if key in query or key in extra:
            raise NBDURIError(f"{text!r}: query parameter {key!r} given twice")
        if key.startswith("x-"):
            extra[key] = value
        elif key in _KNOWN:
            query[key] = value
        else:
            raise NBDURIError(f"{text!r}: unknown query parameter {key!r}")
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    if "\0" in export:
        raise NBDURIError(f"{text!r}: export names must not contain NUL")
    if len(export.encode()) > 4096:
        raise NBDURIError(f"{text!r}: export name longer than 4096 bytes")

    socket_path = query.get("socket")
    host = parts.hostname
    if unix:
        if not socket_path:
            raise NBDURIError(f"{text!r}: {scheme} needs a socket= query parameter")
        if parts.netloc:
            raise NBDURIError(f"{text!r}: {scheme} takes no host or port (use nbd:// for TCP)")
    else:
        if socket_path is not None:
            raise NBDURIError(f"{text!r}: socket= is only valid with nbd+unix:// or nbds+unix://")
        if not host:
            raise NBDURIError(f"{text!r}: missing host")
    verify = query.get("tls-verify-peer", "1")
    if verify not in ("0", "1"):
        raise NBDURIError(f"{text!r}: tls-verify-peer must be 0 or 1")
    tls_type = query.get("tls-type", "x509")
    if tls_type != "x509":
        raise NBDURIError(f"{text!r}: tls-type={tls_type} is not supported (only x509)")
    return NBDURI(
        tls=tls,
        export_name=export,
        host=None if unix else host,
        port=NBD_DEFAULT_PORT if port is None else port,
        socket_path=socket_path,
        username=unquote(parts.username) if parts.username else None,
        tls_hostname=query.get("tls-hostname"),
        tls_verify_peer=verify == "1",
        tls_certificates=query.get("tls-certificates"),
        extra=extra,
    )
