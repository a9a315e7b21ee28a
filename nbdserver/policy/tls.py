"""TLS for the NBD listener: one ``ssl.SSLContext`` built once, used at NBD_OPT_STARTTLS.

Why: an NBD export without transport security hands a disk to anyone on the path. NBD's TLS is
negotiated in-band (NBD_OPT_STARTTLS, doc/proto.md "TLS support"): the protocol core answers the
option with NBD_REP_ACK and the edge then runs a server-side handshake on the same socket. This
module builds the context and performs that handshake; the protocol decisions (which options
need TLS, NBD_REP_ERR_TLS_REQD, a second STARTTLS) belong to ``nbdserver.protocol``.

What it must not do: weaken anything silently. TLS 1.2 is the floor (the NBD spec requires it),
client certificates are verified whenever a CA is given (mutual TLS), and a feature Python cannot
provide (TLS-PSK before Python 3.13 exposes ``set_psk_server_callback``) is an error at startup,
never a quiet fallback to plaintext.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

from nbdserver.config.model import TlsMode, TlsSettings

log = logging.getLogger(__name__)

#: Handshakes that do not finish within this many seconds are abandoned: a client that opens
#: STARTTLS and stalls must not pin a thread forever.
HANDSHAKE_TIMEOUT = 30.0


class TlsConfigError(ValueError):
    """Unusable TLS settings (missing file, key not matching certificate, unsupported mode)."""


def psk_supported() -> bool:
    """Python's ssl exposes TLS-PSK from 3.13 on; 3.11 and 3.12 cannot do it at all."""
    return hasattr(ssl.SSLContext, "set_psk_server_callback")


def read_pskfile(path: str) -> dict[str, bytes]:
    """GnuTLS ``psktool`` format (what nbdkit and qemu read): ``identity:hexkey`` per line."""
    keys: dict[str, bytes] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        identity, sep, hexkey = line.strip().partition(":")
        try:
            if not sep or not identity:
                raise ValueError("expected identity:hexkey")
            keys[identity] = bytes.fromhex(hexkey)
        except ValueError as exc:
            raise TlsConfigError(f"{path}:{lineno}: bad PSK line ({exc})") from None
    if not keys:
        raise TlsConfigError(f"{path}: no PSK identities")
    return keys


def _require_file(path: str | None, what: str) -> str:
    if not path:
        raise TlsConfigError(f"TLS needs {what}")
    if not Path(path).is_file():
        raise TlsConfigError(f"{what} {path!r} does not exist or is not a file")
    return path


def build_server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The server context for ``settings``, or None when TLS is off.

    Raises TlsConfigError with a message naming the file at fault, so a typo in a path is
    reported at startup instead of at the first client's STARTTLS.
    """
    if settings.mode is TlsMode.OFF:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Session tickets would let a resumed session skip client-certificate checks done on a CA
    # that has since been replaced; NBD connections are long-lived, resumption buys nothing.
    ctx.options |= ssl.OP_NO_TICKET
    if settings.pskfile is not None:
        _configure_psk(ctx, settings.pskfile)
        if settings.certfile is None:
            return ctx
    cert = _require_file(settings.certfile, "a server certificate (--tls-cert)")
    key = _require_file(settings.keyfile or settings.certfile, "a private key (--tls-key)")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsConfigError(f"cannot load certificate {cert!r} with key {key!r}: {exc}") from None
    if settings.cafile is not None:
        ca = _require_file(settings.cafile, "a client CA (--tls-ca)")
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise TlsConfigError(f"cannot load client CA {ca!r}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _configure_psk(ctx: ssl.SSLContext, pskfile: str) -> None:
    if not psk_supported():
        import sys

        raise TlsConfigError(
            "TLS-PSK needs Python 3.13 or newer (ssl.SSLContext.set_psk_server_callback); this is "
            f"Python {sys.version_info.major}.{sys.version_info.minor}: use X.509 certificates"
        )
    keys = read_pskfile(pskfile)  # pragma: no cover - needs Python >= 3.13

    def lookup(identity: str | None) -> bytes:  # pragma: no cover - needs Python >= 3.13
        # An unknown identity gets an empty key, which fails the handshake.
        return keys.get(identity or "", b"")

    ctx.set_psk_server_callback(lookup)  # type: ignore[attr-defined]  # pragma: no cover


class TlsHandshakeError(ConnectionError):
    """The peer did not complete a TLS handshake (bad certificate, plaintext, timeout)."""


def server_handshake(
    ctx: ssl.SSLContext, sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT
) -> ssl.SSLSocket:
    """Upgrade an accepted, blocking socket in place after NBD_REP_ACK to STARTTLS.

    The returned socket is blocking again (the handshake alone runs under ``timeout``). On
    failure the raw socket is closed and TlsHandshakeError says why, for the connection log.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TlsHandshakeError(f"TLS handshake failed: {exc}") from exc
    tls.settimeout(previous)
    return tls


def peer_subject(tls: ssl.SSLSocket) -> str | None:
    """The client certificate's subject common name, for the log line (mutual TLS only)."""
    cert = tls.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for pair in rdn:
            if pair[0] == "commonName":
                return str(pair[1])
    return None
