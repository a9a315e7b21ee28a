"""Properties of the pure protocol core under arbitrary input (hypothesis, in process, fast).

- The handshake machine never raises, whatever the client sends, in whatever pieces; everything
  it emits frames as option replies (plus at most one EXPORT_NAME answer at the very end); it
  ends in exactly one terminal event.
- The request validator agrees with an independent, literal reading of the spec: whenever it
  lets a request through, the request is in range, aligned, of a known advertised command and
  with only allowed flags; whenever it refuses, it uses an errno the spec permits.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserver.protocol.events import NEED_DATA, Aborted, Closed, ExportInfo, Negotiated, StartTLS
from nbdserver.protocol.handshake import ServerHandshake
from nbdserver.protocol.transmission import RequestValidator

DISK = ExportInfo("disk", 1 << 20, 0x4C | (1 << 10) | (1 << 11), "d", 512, 4096, 1 << 16)
EXPORTS = {"disk": DISK}
REPLY_MAGIC = 0x3E889045565A9


def options_stream() -> st.SearchStrategy[bytes]:
    opt = st.builds(
        lambda code, payload, lie: b"IHAVEOPT"
        + struct.pack(">II", code, len(payload) if lie is None else lie)
        + payload,
        st.one_of(st.integers(1, 12), st.integers(0, (1 << 32) - 1)),
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda n, infos: struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos),
                st.sampled_from([b"disk", b"", b"nope"]),
                st.lists(st.integers(0, 4), max_size=3),
            ),
        ),
        st.one_of(st.none(), st.integers(0, 1 << 17)),
    )  # fmt: skip
    flags = st.sampled_from([b"\x00\x00\x00\x03", b"\x00\x00\x00\x01", b"\x00\x00\x00\x07"])
    return st.builds(lambda f, opts, noise: f + b"".join(opts) + noise, flags,
                     st.lists(opt, max_size=6), st.binary(max_size=8))  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    stream=options_stream(),
    cuts=st.lists(st.integers(1, 64), max_size=10),
    tls=st.sampled_from(["off", "on", "require"]),
)
def test_handshake_machine_never_raises_and_always_frames(
    stream: bytes, cuts: list[int], tls: str
) -> None:
    hs = ServerHandshake(EXPORTS.get, lambda: [DISK], tls=tls)  # type: ignore[arg-type]
    out = hs.data_to_send()
    assert out == b"NBDMAGICIHAVEOPT\x00\x03"
    pieces, pos = [], 0
    for cut in cuts:
        pieces.append(stream[pos : pos + cut])
        pos += cut
    pieces.append(stream[pos:])
    pieces.append(b"")  # EOF
    out = b""
    final = None
    for piece in pieces:
        if final is not None:
            break
        hs.receive_data(piece)
        while True:
            event = hs.next_event()
            out += hs.data_to_send()
            if event is NEED_DATA:
                break
            if isinstance(event, StartTLS):
                hs.tls_started()
                continue
            assert isinstance(event, Negotiated | Aborted | Closed)
            final = event
            break
    assert final is not None, "EOF must end the handshake"
    assert hs.next_event() is final
    # Framing: option replies, then (only for EXPORT_NAME) a 10-byte export answer.
    pos = 0
    while len(out) - pos >= 20 and struct.unpack_from(">Q", out, pos)[0] == REPLY_MAGIC:
        pos += 20 + struct.unpack_from(">I", out, pos + 16)[0]
    tail = len(out) - pos
    if isinstance(final, Negotiated) and not final.via_go:
        assert tail in (10, 134)
    else:
        assert tail == 0, out[pos:]


ALLOWED_ERRNOS = {0, 1, 22, 28, 75, 108}


@settings(max_examples=1500, deadline=None)
@given(
    flags=st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 33, 18]), st.integers(0, 0xFFFF)),
    cmd=st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
    offset=st.one_of(
        st.integers(0, 16).map(lambda k: DISK.size - k * 512),  # near the end: range rules
        st.integers(0, 2100).map(lambda k: k * 512),
        st.integers(0, (1 << 64) - 1),
    ),
    data=st.data(),
    structured=st.booleans(),
    extended=st.booleans(),
    read_only=st.booleans(),
)
def test_validator_only_passes_what_the_spec_allows(
    flags: int,
    cmd: int,
    offset: int,
    data: st.DataObject,
    structured: bool,
    extended: bool,
    read_only: bool,
) -> None:
    to_end = DISK.size - offset
    length = data.draw(
        st.one_of(
            st.integers(-2, 2).map(lambda d: max(0, to_end + d * 512)),  # ends at the boundary
            st.integers(0, 300).map(lambda k: k * 512),
            st.integers(0, (1 << 64) - 1),
        )
    )
    tflags = DISK.flags | 1 | (2 if read_only else 0) | (0x80 if structured or extended else 0)
    neg = Negotiated("disk", DISK, tflags, structured or extended, extended,
                     ((1, "base:allocation"),), True, False, True)  # fmt: skip
    err = RequestValidator(neg).validate(flags, cmd, offset, length)
    assert err in ALLOWED_ERRNOS
    if err or cmd == 2:  # refused, or DISC (never answered)
        return
    assert cmd in (0, 1, 3, 4, 5, 6, 7)
    allowed = 1  # FUA is advertised
    allowed |= {0: 4 if structured or extended else 0, 6: 2 | 16, 7: 8}.get(cmd, 0)
    if extended and cmd == 1:
        assert flags & 32, "extended WRITE without PAYLOAD_LEN"
        allowed |= 32
    assert not flags & ~allowed
    if read_only:
        assert cmd not in (1, 4, 6)
    if cmd == 3:
        assert offset == 0 and length == 0
        return
    assert length > 0 and offset % 512 == 0 and length % 512 == 0
    assert offset + length <= DISK.size
    if cmd in (0, 1):
        assert length <= DISK.maximum_payload
    if cmd == 7:
        assert structured or extended
