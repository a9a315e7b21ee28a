"""The blocking client handshake against the project's own sans-I/O server machine (and, for
the odd cases, a scripted server), over real sockets: exact bytes, results and exceptions."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from nbdserver import client
from nbdserver.protocol.events import NEED_DATA, ExportInfo, Negotiated, StartTLS
from nbdserver.protocol.handshake import ServerHandshake

DISK = ExportInfo("disk", 1 << 20, (1 << 2) | (1 << 3), "the disk", 512, 4096, 1 << 20)
EXPORTS = {"disk": DISK, "": DISK}
REPLY_MAGIC = bytes.fromhex("0003e889045565a9")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


class Peer:
    """Runs ``script(conn)`` for one connection on a unix socket, in a thread."""

    def __init__(self, path: Path, script: Callable[[socket.socket], object]) -> None:
        self.uri = f"nbd+unix:///disk?socket={path}"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.result: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[socket.socket], object]) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(10)
                self.result = script(conn)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> object:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.listener.close()
        if self.error:
            raise self.error
        return self.result


def run_machine(  # type: ignore[no-untyped-def]
    tls: str = "off", server_ctx: ssl.SSLContext | None = None, listing: bool = True
):
    """A script: drive ServerHandshake, then echo 4 bytes to prove stream positioning."""

    def script(conn: socket.socket) -> object:
        lister = (lambda: [DISK]) if listing else None
        hs = ServerHandshake(EXPORTS.get, lister, tls=tls)  # type: ignore[arg-type]
        sock = conn
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
            if event is NEED_DATA:
                hs.receive_data(sock.recv(65536))
            elif isinstance(event, StartTLS):
                assert server_ctx is not None
                sock = server_ctx.wrap_socket(sock, server_side=True)
                hs.tls_started()
            elif isinstance(event, Negotiated):
                ping = event.leftover + recv_exact(sock, 4 - len(event.leftover))
                sock.sendall(b"PONG" if ping == b"PING" else b"FAIL")
                return event
            else:
                return event

    return script


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(script: Callable[[socket.socket], object]) -> Peer:
        p = Peer(tmp_path / f"s{len(made)}.sock", script)
        made.append(p)
        return p

    yield make
    for p in made:
        p.listener.close()


def test_go_returns_export_details_and_leaves_the_socket_at_transmission(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine())
    conn = client.connect(p.uri)
    d = conn.details
    assert (d.size, d.minimum_block, d.preferred_block, d.maximum_payload) == (
        1 << 20,
        512,
        4096,
        1 << 20,
    )
    assert d.transmission_flags == 1 | 4 | 8 and d.description == "the disk"
    assert d.canonical_name == "disk" and d.via_go and not d.structured_replies and not d.tls
    conn.sock.sendall(b"PING")
    assert recv_exact(conn.sock, 4) == b"PONG"
    conn.close()
    event = p.finish()
    assert isinstance(event, Negotiated)
    assert not event.structured_replies and not event.extended_headers  # kernel-safe default
    assert event.block_size_requested


def test_structured_replies_and_base_allocation_only_when_asked(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine())
    conn = client.connect(p.uri, structured_replies=True)
    assert conn.details.structured_replies and conn.details.meta_contexts == {"base:allocation": 1}
    assert conn.details.transmission_flags & (1 << 7)  # DF follows structured replies
    conn.sock.sendall(b"PING")
    assert recv_exact(conn.sock, 4) == b"PONG"
    conn.close()
    event = p.finish()
    assert isinstance(event, Negotiated) and event.meta_contexts == ((1, "base:allocation"),)


def test_exact_bytes_of_the_default_handshake(peer) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> bytes:
        conn.sendall(b"NBDMAGICIHAVEOPT\x00\x03")
        got = recv_exact(conn, 4 + 16)
        (n,) = struct.unpack(">I", got[-4:])
        got += recv_exact(conn, n)
        info = struct.pack(">HQH", 0, 4096, 1)
        conn.sendall(REPLY_MAGIC + struct.pack(">III", 7, 3, len(info)) + info)
        conn.sendall(REPLY_MAGIC + struct.pack(">III", 7, 1, 0))
        return got

    p = peer(script)
    client.connect(p.uri).close()
    go = struct.pack(">I", 4) + b"disk" + struct.pack(">HHHH", 3, 1, 2, 3)
    assert p.finish() == struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 7, len(go)) + go


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_falls_back_to_export_name_when_go_is_unsupported(peer, no_zeroes: bool) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> bytes:
        conn.sendall(b"NBDMAGICIHAVEOPT" + (b"\x00\x03" if no_zeroes else b"\x00\x01"))
        recv_exact(conn, 4 + 16)
        recv_exact(conn, 4 + 4 + 2 + 6)  # the GO payload
        conn.sendall(REPLY_MAGIC + struct.pack(">III", 7, (1 << 31) | 1, 0))
        head = recv_exact(conn, 16)
        name = recv_exact(conn, struct.unpack(">I", head[12:])[0])
        conn.sendall(struct.pack(">QH", 8192, 3) + (b"" if no_zeroes else bytes(124)) + b"DATA")
        return name

    p = peer(script)
    conn = client.connect(p.uri)
    assert (conn.details.size, conn.details.transmission_flags, conn.details.via_go) == (
        8192,
        3,
        False,
    )
    assert recv_exact(conn.sock, 4) == b"DATA"  # the 124 zeroes were consumed, nothing more
    conn.close()
    assert p.finish() == b"disk"


def test_unknown_export_raises_unknown_export(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine())
    with pytest.raises(client.NBDUnknownExport, match="nope"):
        client.connect(p.uri, export_name="nope")
    assert type(p.finish()).__name__ == "Aborted"  # a soft disconnect, as the spec demands


def test_tls_required_by_the_server_raises_tls_required(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine(tls="require"))
    with pytest.raises(client.NBDTLSRequired):
        client.connect(p.uri)
    assert type(p.finish()).__name__ == "Aborted"


def test_nbds_against_a_server_without_tls_fails_closed(peer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine(tls="off"))
    ctx = ssl.create_default_context()
    with pytest.raises(client.NBDTLSError, match="refused STARTTLS"):
        client.connect(p.uri.replace("nbd+unix", "nbds+unix"), tls_context=ctx)
    p.finish()


def test_starttls_upgrades_and_verifies_the_server(peer) -> None:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("nbd.test").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    p = peer(run_machine(tls="require", server_ctx=server_ctx))
    uri = p.uri.replace("nbd+unix", "nbds+unix") + "&tls-hostname=nbd.test"
    conn = client.connect(uri, tls_context=client_ctx)
    assert conn.details.tls and isinstance(conn.sock, ssl.SSLSocket)
    conn.sock.sendall(b"PING")
    assert recv_exact(conn.sock, 4) == b"PONG"
    conn.close()
    event = p.finish()
    assert isinstance(event, Negotiated) and event.tls


def test_tls_handshake_with_an_untrusted_certificate_fails(peer) -> None:  # type: ignore[no-untyped-def]
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("nbd.test").configure_cert(server_ctx)
    p = peer(run_machine(tls="require", server_ctx=server_ctx))
    uri = p.uri.replace("nbd+unix", "nbds+unix") + "&tls-hostname=nbd.test"
    with pytest.raises(client.NBDTLSError, match="TLS handshake failed"):
        client.connect(uri, tls_context=ssl.create_default_context())
    with pytest.raises(ssl.SSLError):
        p.finish()


def test_list_exports_then_abort(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine())
    assert client.list_exports(p.uri) == [("disk", "the disk")]
    assert type(p.finish()).__name__ == "Aborted"


def test_a_refusing_server_raises_server_refused_with_its_message(peer) -> None:  # type: ignore[no-untyped-def]
    p = peer(run_machine(listing=False))
    with pytest.raises(
        client.NBDServerRefused, match="NBD_REP_ERR_POLICY: listing exports is disabled"
    ):
        client.list_exports(p.uri)
    assert type(p.finish()).__name__ == "Aborted"  # a soft disconnect after the error


@pytest.mark.parametrize(
    ("greeting", "message"),
    [
        (b"NBDMAGICIHAVEOPT\x00\x00", "fixed newstyle"),
        (b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53\x00\x00", "not a newstyle server"),
        (b"HTTP/1.1 400 Bad Req", "bad greeting magic"),
        (b"NBDMAG", "no NBD greeting"),
    ],
)
def test_non_nbd_or_old_servers_are_protocol_errors(peer, greeting: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    p = peer(lambda conn: conn.sendall(greeting))
    with pytest.raises(client.NBDProtocolError, match=message):
        client.connect(p.uri)
    p.finish()


def test_reply_to_the_wrong_option_is_a_protocol_error(peer) -> None:  # type: ignore[no-untyped-def]
    def script(conn: socket.socket) -> None:
        conn.sendall(b"NBDMAGICIHAVEOPT\x00\x03")
        recv_exact(conn, 4 + 16 + 16)
        conn.sendall(REPLY_MAGIC + struct.pack(">III", 3, 1, 0))

    p = peer(script)
    with pytest.raises(client.NBDProtocolError, match="option 3"):
        client.connect(p.uri)
    p.finish()


def test_unreachable_servers_raise_connect_error(tmp_path: Path) -> None:
    with pytest.raises(client.NBDConnectError):
        client.connect(f"nbd+unix:///?socket={tmp_path}/missing.sock")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(client.NBDConnectError, match=f"127.0.0.1:{port}"):
        client.connect(f"nbd://127.0.0.1:{port}/")
