"""Extended headers (NBD_OPT_EXTENDED_HEADERS) and structured replies spoken byte by byte
against a live nbdserver, since Debian's libnbd predates extended headers: 32-byte requests,
PAYLOAD_LEN writes, 32-byte replies echoing the request offset, BLOCK_STATUS_EXT, error chunks."""

from __future__ import annotations

import socket
import struct

import pytest

from nbdserver.protocol import wire
from nbdserver.protocol.constants import (
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Command,
    CommandFlag,
    Option,
    OptionReply,
    ReplyType,
)
from tests.interop.conftest import NbdServerFactory
from tests.interop.test_server_robustness import recv_exact

pytestmark = pytest.mark.interop

PAYLOAD_LEN = int(CommandFlag.NBD_CMD_FLAG_PAYLOAD_LEN)


def option(sock: socket.socket, opt: int, payload: bytes = b"") -> list[tuple[int, bytes]]:
    """Send one option; collect replies up to the final one (ACK or an error)."""
    sock.sendall(wire.pack_option(opt, payload))
    out = []
    while True:
        got_opt, rtype, length = wire.unpack_option_reply_header(recv_exact(sock, 20))
        assert got_opt == opt
        out.append((rtype, recv_exact(sock, length)))
        if rtype != OptionReply.NBD_REP_INFO and rtype != OptionReply.NBD_REP_META_CONTEXT:
            return out


def negotiate(port: int, *, extended: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert recv_exact(sock, 18)[:16] == b"NBDMAGICIHAVEOPT"
    flags = ClientFlag.NBD_FLAG_C_FIXED_NEWSTYLE | ClientFlag.NBD_FLAG_C_NO_ZEROES
    sock.sendall(struct.pack(">I", flags))
    first = Option.NBD_OPT_EXTENDED_HEADERS if extended else Option.NBD_OPT_STRUCTURED_REPLY
    assert option(sock, first) == [(OptionReply.NBD_REP_ACK, b"")]
    meta = option(
        sock,
        Option.NBD_OPT_SET_META_CONTEXT,
        wire.pack_meta_context_request("", ("base:allocation",)),
    )
    assert meta[0][0] == OptionReply.NBD_REP_META_CONTEXT
    go = option(sock, Option.NBD_OPT_GO, wire.pack_info_go("", ()))
    assert go[-1][0] == OptionReply.NBD_REP_ACK
    return sock


def ext_request(flags: int, cmd: int, cookie: int, offset: int, length: int) -> bytes:
    return wire.pack_extended_request(flags, cmd, cookie, offset, length)


def ext_reply(sock: socket.socket) -> tuple[int, int, int, int, bytes]:
    magic, flags, rtype, cookie, offset, length = wire.EXTENDED_REPLY.unpack(recv_exact(sock, 32))
    assert magic == NBD_EXTENDED_REPLY_MAGIC
    assert flags == NBD_REPLY_FLAG_DONE
    return rtype, cookie, offset, length, recv_exact(sock, length)


def test_extended_headers_write_read_status_and_errors(nbdserver: NbdServerFactory) -> None:
    srv = nbdserver(size="4M")
    assert srv.port is not None
    sock = negotiate(srv.port, extended=True)
    data = b"E" * 8192
    sock.sendall(ext_request(PAYLOAD_LEN, Command.NBD_CMD_WRITE, 1, 65536, len(data)) + data)
    assert ext_reply(sock) == (ReplyType.NBD_REPLY_TYPE_NONE, 1, 65536, 0, b"")

    sock.sendall(ext_request(0, Command.NBD_CMD_READ, 2, 65536 - 4096, 8192))
    rtype, cookie, offset, length, payload = ext_reply(sock)
    assert (rtype, cookie, offset, length) == (ReplyType.NBD_REPLY_TYPE_OFFSET_DATA, 2, 61440, 8200)
    assert payload == struct.pack(">Q", 61440) + bytes(4096) + b"E" * 4096

    sock.sendall(ext_request(0, Command.NBD_CMD_BLOCK_STATUS, 3, 0, 4 << 20))
    rtype, cookie, offset, _, payload = ext_reply(sock)
    assert (rtype, cookie, offset) == (ReplyType.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 3, 0)
    context_id, count = struct.unpack_from(">II", payload)
    extents = struct.unpack_from(f">{2 * count}Q", payload, 8)
    assert context_id != 0 and count == 3
    assert extents == (65536, 3, 8192, 0, (4 << 20) - 65536 - 8192, 3)

    # an out-of-range read gets an error chunk that echoes the request offset
    sock.sendall(ext_request(0, Command.NBD_CMD_READ, 4, 4 << 20, 512))
    rtype, cookie, offset, _, payload = ext_reply(sock)
    assert (rtype, cookie, offset) == (ReplyType.NBD_REPLY_TYPE_ERROR, 4, 4 << 20)
    assert struct.unpack_from(">I", payload)[0] == 22

    # an effect length beyond 32 bits is fine for TRIM in extended mode (here: out of range)
    sock.sendall(ext_request(0, Command.NBD_CMD_TRIM, 5, 0, 1 << 33))
    rtype, cookie, _, _, payload = ext_reply(sock)
    assert (rtype, cookie) == (ReplyType.NBD_REPLY_TYPE_ERROR, 5)

    sock.sendall(ext_request(0, Command.NBD_CMD_DISC, 6, 0, 0))
    assert sock.recv(1) == b""
    sock.close()


def test_structured_read_reply_is_one_data_chunk_and_errors_are_chunks(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(size="1M")
    assert srv.port is not None
    sock = negotiate(srv.port, extended=False)
    sock.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 9, 4096, 512))
    magic, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(recv_exact(sock, 20))
    assert (magic, flags, rtype, cookie, length) == (
        NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, ReplyType.NBD_REPLY_TYPE_OFFSET_DATA,
        9, 520,
    )  # fmt: skip
    assert recv_exact(sock, 520) == struct.pack(">Q", 4096) + bytes(512)
    sock.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 10, 1 << 20, 512))
    magic, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(recv_exact(sock, 20))
    assert (rtype, cookie, flags) == (ReplyType.NBD_REPLY_TYPE_ERROR, 10, NBD_REPLY_FLAG_DONE)
    err, msglen = struct.unpack(">IH", recv_exact(sock, 6))
    assert err == 22 and msglen == length - 6
    recv_exact(sock, msglen)
    sock.close()
