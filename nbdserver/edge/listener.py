"""Listening sockets: TCP (dual-stack by default) and unix, opened once, refused with one line.

Why: what a listener may take over is a safety question. ``--unix PATH`` must never delete what
it did not leave there: a regular file (perhaps the image about to be served) or a socket a live
server still accepts on is refused; only a stale socket (nobody accepts) is replaced.

What it must not do: accept connections or speak NBD.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from nbdserver.errors import ConfigError

BACKLOG = 128


def listen_family(bind: str | None) -> tuple[socket.AddressFamily, str]:
    """The family and address to bind for ``bind``; None: every address, IPv6 with IPv4
    mapped in (as nbd-server and nbdkit), or IPv4 alone on a host without IPv6."""
    if bind is None:
        return (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    return (socket.AF_INET6 if ":" in bind else socket.AF_INET), bind


def tcp_listener(bind: str | None, port: int) -> socket.socket:
    family, host = listen_family(bind)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and bind is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        where = f"[{host}]" if ":" in host else host
        raise ConfigError(f"--port {port}: cannot listen on {where}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def _clear_stale_socket(path: str) -> None:
    """Remove ``path`` only if it is a socket nobody accepts on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--unix {path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # stale: left behind by a server that is gone
        return
    except OSError as e:
        raise ConfigError(f"--unix {path}: cannot check the socket there: {e.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"--unix {path}: in use by another server")


def unix_listener(path: str) -> socket.socket:
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--unix {path}: cannot listen: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def remove_own_socket(sock: socket.socket, path: str, inode: int) -> None:
    """Unlink ``path`` at shutdown if it is still the socket this server bound."""
    sock.close()
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def peer_name(sock: socket.socket, addr: object) -> str:
    """How logs and policies name the peer: ``1.2.3.4:5``, ``[::1]:5`` or ``unix``."""
    if sock.family == socket.AF_UNIX:
        return "unix"
    assert isinstance(addr, tuple)
    host = str(addr[0])  # an IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
