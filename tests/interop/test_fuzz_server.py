"""Hostile input against a live ``nbdserver serve``: thousands of random and mutated handshake
and transmission packets (hypothesis), then proof that the server still serves a fresh client
correctly and that an export the fuzzer never named still holds exactly its original bytes.

Every case is one connection: send the bytes, half-close, and read until the server closes
(so the server must have answered or dropped the connection within the deadline; a hang fails).
Replies are parsed as they arrive: every byte the server sends must frame as valid NBD.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import struct
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserver import client
from nbdserver.protocol import wire
from tests.interop.test_server_robustness import recv_exact

pytestmark = pytest.mark.interop

MiB = 1 << 20
OPT_REPLY_MAGIC = 0x3E889045565A9
SIMPLE, STRUCTURED, EXTENDED = 0x67446698, 0x668E33EF, 0x6E8A278C
HANDSHAKE_EXAMPLES = 2000
TRANSMISSION_EXAMPLES = 1000
TLS_EXAMPLES = 300
FUZZ_SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def drain(sock: socket.socket) -> bytes:
    """Half-close, then read until the server closes (10 s deadline via the socket timeout)."""
    with contextlib.suppress(OSError):  # the server may already have dropped us
        sock.shutdown(socket.SHUT_WR)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def check_option_replies(data: bytes) -> None:
    """Everything after the greeting is option replies, possibly followed by one
    NBD_OPT_EXPORT_NAME answer (10 bytes, no zeroes since we set NO_ZEROES) and transmission
    replies, which the handshake fuzzer cannot predict; stop at the first non-option bytes."""
    pos = 0
    while len(data) - pos >= 20:
        magic, _opt, _rtype, length = struct.unpack_from(">QIII", data, pos)
        if magic != OPT_REPLY_MAGIC:
            return
        assert length <= 1 << 20, f"option reply of {length} bytes"
        pos += 20 + length


option_codes = st.one_of(st.integers(1, 12), st.integers(0, 0xFFFFFFFF))
names = st.sampled_from(["scratch", "", "nope", "\u00e9t\u00e9", "x" * 300])


@st.composite
def options(draw: st.DrawFn) -> bytes:
    """One option: usually well formed for a known option, sometimes arbitrary."""
    code = draw(option_codes)
    name = draw(names)
    kind = draw(st.sampled_from(["go", "meta", "empty", "raw"]))
    if kind == "go":
        infos = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        payload = wire.pack_info_go(name, infos)
    elif kind == "meta":
        queries = tuple(
            draw(
                st.lists(
                    st.sampled_from(["base:", "base:allocation", "x:y", "nocolon"]), max_size=3
                )
            )
        )
        payload = wire.pack_meta_context_request(name, queries)
    elif kind == "empty":
        payload = b""
    else:
        payload = draw(st.binary(max_size=64))
    return wire.pack_option(code, payload)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """Flip, insert, truncate: the classic mutations on an otherwise valid stream."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "insert", "truncate", "length"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)) :]
        elif op == "length" and len(data) >= 16:
            # Lie about an option length (up to 4 GiB): must be refused, never awaited forever.
            i = draw(st.integers(0, max(0, len(data) - 4)))
            data[i : i + 4] = struct.pack(">I", draw(st.integers(0, 0xFFFFFFFF)))
    return bytes(data)


handshake_streams = st.one_of(
    st.binary(max_size=200),  # pure noise after the greeting
    mutated(st.tuples(st.sampled_from([1, 3, 2, 0, 7]), st.lists(options(), max_size=6)).map(
        lambda t: struct.pack(">I", t[0]) + b"".join(t[1])
    )),
)  # fmt: skip


def negotiate(sock: socket.socket, mode: str) -> None:
    """A correct handshake for the scratch export, in simple/structured/extended mode."""
    assert wire.unpack_greeting(recv_exact(sock, 18)) & 1
    sock.sendall(struct.pack(">I", 3))
    sequence: list[tuple[int, bytes]] = []
    if mode == "structured":
        sequence.append((8, b""))
    if mode == "extended":
        sequence.append((11, b""))
    if mode != "simple":
        sequence.append((10, wire.pack_meta_context_request("scratch", ("base:allocation",))))
    sequence.append((7, wire.pack_info_go("scratch", (3,))))
    for code, payload in sequence:
        sock.sendall(wire.pack_option(code, payload))
        while True:
            _, rtype, length = wire.unpack_option_reply_header(recv_exact(sock, 20))
            recv_exact(sock, length)
            if rtype == 1 or rtype & (1 << 31):
                assert rtype == 1, f"option {code} refused: {rtype:#x}"
                break


@st.composite
def requests(draw: st.DrawFn, extended: bool) -> tuple[int | None, int, int, int, int, bytes]:
    """(magic or None for the right one, flags, command, offset, length, payload): mostly
    near-valid requests, with sometimes absurd fields; payloads are cut short for huge claims."""
    cmd = draw(st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.integers(0, 63), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, 4 * MiB), st.integers(0, (1 << 64) - 1)))
    length = draw(
        st.one_of(st.integers(0, 65536), st.integers(0, (1 << (64 if extended else 32)) - 1))
    )
    magic = draw(st.sampled_from([None] * 15 + [0x25609513, 0x21E41C71, 0]))
    payload_len = length if (cmd == 1 and not extended) or (extended and flags & 32) else 0
    payload = os.urandom(min(payload_len, 70000))  # short payloads for huge claims
    return magic, flags, cmd, offset, length, payload


def parse_replies(data: bytes, sent: dict[int, tuple[int, int]], mode: str) -> int:
    """Every reply must frame correctly and answer a request that was sent, once.
    Returns how many requests were answered completely."""
    pos = 0
    done: set[int] = set()
    while pos < len(data):
        magic = struct.unpack_from(">I", data, pos)[0]
        if magic == SIMPLE:
            assert mode != "extended", "simple reply after extended headers"
            _, error, cookie = struct.unpack_from(">IIQ", data, pos)
            assert cookie in sent and cookie not in done, f"unexpected cookie {cookie}"
            cmd, length = sent[cookie]
            assert not (cmd == 0 and mode != "simple"), "simple reply to READ with structured"
            pos += 16 + (length if cmd == 0 and not error else 0)
            done.add(cookie)
        elif magic in (STRUCTURED, EXTENDED):
            assert mode != "simple", "structured reply without negotiation"
            if magic == STRUCTURED:
                _, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
                pos += 20 + length
            else:
                assert mode == "extended"
                _, flags, rtype, cookie, _off, length = struct.unpack_from(">IHHQQQ", data, pos)
                pos += 32 + length
            assert cookie in sent and cookie not in done, f"unexpected cookie {cookie}"
            assert rtype in (0, 1, 2, 5, 6, 0x8001, 0x8002), f"chunk type {rtype}"
            if flags & 1:
                done.add(cookie)
        else:
            raise AssertionError(f"bad reply magic {magic:#x} at {pos} of {len(data)}")
    assert pos == len(data), "truncated reply"
    return len(done)


def test_fuzzed_handshakes_and_requests_leave_the_server_serving_and_data_intact(
    nbdserver,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    canary = tmp_path / "canary.img"
    original = os.urandom(MiB)
    canary.write_bytes(original)
    srv = nbdserver(
        "--name", "canary", "--export", "scratch=memory,size=4M", "--handshake-timeout", "5",
        image=canary, size=None,
    )  # fmt: skip
    addr = ("127.0.0.1", srv.port)
    stats = {"requests": 0, "answered": 0}

    def connect() -> socket.socket:
        s = socket.create_connection(addr, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    @settings(max_examples=HANDSHAKE_EXAMPLES, **FUZZ_SETTINGS)  # type: ignore[arg-type]
    @given(stream=handshake_streams)
    def fuzz_handshake(stream: bytes) -> None:
        if b"canary" in stream:
            return  # the one export the fuzzer must never reach
        with connect() as s:
            greeting = recv_exact(s, 18)
            assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(stream)  # the server may drop us early (bad client flags)
            check_option_replies(drain(s))

    @settings(max_examples=TRANSMISSION_EXAMPLES, **FUZZ_SETTINGS)  # type: ignore[arg-type]
    @given(mode=st.sampled_from(["simple", "structured", "extended"]), data=st.data())
    def fuzz_transmission(mode: str, data: st.DataObject) -> None:
        extended = mode == "extended"
        reqs = data.draw(st.lists(requests(extended), min_size=1, max_size=8))
        with connect() as s:
            negotiate(s, mode)
            sent: dict[int, tuple[int, int]] = {}
            stream = b""
            for i, (magic, flags, cmd, offset, length, payload) in enumerate(reqs, 1):
                if magic is None:
                    magic = 0x21E41C71 if extended else 0x25609513
                fmt = ">IHHQQQ" if extended else ">IHHQQI"
                stream += struct.pack(fmt, magic, flags, cmd, i, offset, length) + payload
                sent[i] = (cmd, length)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(stream)  # the server may drop us at a bad magic
            answered = parse_replies(drain(s), sent, mode)
            stats["requests"] += len(sent)
            stats["answered"] += answered

    fuzz_handshake()
    fuzz_transmission()
    # The generator must mostly produce requests the server answers, or the fuzz proves little.
    assert stats["answered"] > stats["requests"] // 4, stats

    assert srv.proc.poll() is None, "the server died"
    # A fresh client is served correctly on the fuzzed export...
    with client.connect(srv.export_uri("scratch"), structured_replies=True) as conn:
        pattern = os.urandom(64 * 1024)
        conn.pwrite(pattern, MiB)
        conn.flush()
        assert conn.pread(MiB, len(pattern)) == pattern
        conn.disconnect()
    # ...and the export nobody fuzzed is intact, through the server and on disk.
    with client.connect(srv.export_uri("canary")) as conn:
        assert hashlib.sha256(conn.pread(0, MiB)).digest() == hashlib.sha256(original).digest()
        conn.disconnect()
    assert canary.read_bytes() == original
    assert "Traceback" not in srv.text(), srv.text()[-4000:]


def test_fuzzed_streams_after_starttls_are_survived(nbdserver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """STARTTLS is acknowledged, then garbage (or a pipelined option) arrives instead of a TLS
    ClientHello: the server must drop that connection only, and serve TLS clients after."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    srv = nbdserver(
        "--tls", "on", "--tls-cert", str(tmp_path / "cert.pem"),
        "--tls-key", str(tmp_path / "key.pem"), "--handshake-timeout", "5",
    )  # fmt: skip
    starttls = wire.pack_option(5)

    @settings(max_examples=TLS_EXAMPLES, **FUZZ_SETTINGS)  # type: ignore[arg-type]
    @given(tail=st.one_of(st.binary(max_size=300), handshake_streams), pipelined=st.booleans())
    def fuzz_after_starttls(tail: bytes, pipelined: bool) -> None:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            recv_exact(s, 18)
            s.sendall(struct.pack(">I", 3) + starttls + (tail if pipelined else b""))
            head = recv_exact(s, 20)
            assert struct.unpack(">QIII", head) == (OPT_REPLY_MAGIC, 5, 1, 0)  # ACK
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(tail)
            drain(s)

    fuzz_after_starttls()
    assert srv.proc.poll() is None, "the server died"
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    uri = srv.export_uri("").replace("nbd://", "nbds://") + "?tls-hostname=localhost"
    with client.connect(uri, tls_context=ctx) as conn:
        assert conn.details.tls
        conn.pwrite(b"after" * 100, 0)
        assert conn.pread(0, 500) == b"after" * 100
        conn.disconnect()
    assert "Traceback" not in srv.text(), srv.text()[-4000:]
