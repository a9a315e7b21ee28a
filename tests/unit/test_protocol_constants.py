"""Every wire constant pinned to the value doc/proto.md gives (NetworkBlockDevice/nbd master,
extended headers from its extension-ext-header branch), spelled here independently."""

from __future__ import annotations

from nbdserver.protocol import constants as c


def test_magics() -> None:
    assert c.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert c.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert (c.NBD_OPT_REPLY_MAGIC, c.CLISERV_MAGIC_OLDSTYLE) == (0x3E889045565A9, 0x00420281861253)
    assert (c.NBD_REQUEST_MAGIC, c.NBD_EXTENDED_REQUEST_MAGIC) == (0x25609513, 0x21E41C71)
    assert (c.NBD_SIMPLE_REPLY_MAGIC, c.NBD_STRUCTURED_REPLY_MAGIC) == (0x67446698, 0x668E33EF)
    assert c.NBD_EXTENDED_REPLY_MAGIC == 0x6E8A278C
    assert c.NBD_DEFAULT_PORT == 10809


def test_flags() -> None:
    assert [int(f) for f in c.HandshakeFlag] == [1, 2]
    assert [int(f) for f in c.ClientFlag] == [1, 2]
    names = [f.name for f in c.TransmissionFlag]
    assert names == [
        "NBD_FLAG_HAS_FLAGS", "NBD_FLAG_READ_ONLY", "NBD_FLAG_SEND_FLUSH", "NBD_FLAG_SEND_FUA",
        "NBD_FLAG_ROTATIONAL", "NBD_FLAG_SEND_TRIM", "NBD_FLAG_SEND_WRITE_ZEROES",
        "NBD_FLAG_SEND_DF", "NBD_FLAG_CAN_MULTI_CONN", "NBD_FLAG_SEND_RESIZE",
        "NBD_FLAG_SEND_CACHE", "NBD_FLAG_SEND_FAST_ZERO", "NBD_FLAG_BLOCK_STATUS_PAYLOAD",
    ]  # fmt: skip
    assert [int(f) for f in c.TransmissionFlag] == [1 << i for i in range(13)]
    assert [(f.name, int(f)) for f in c.CommandFlag] == [
        ("NBD_CMD_FLAG_FUA", 1), ("NBD_CMD_FLAG_NO_HOLE", 2), ("NBD_CMD_FLAG_DF", 4),
        ("NBD_CMD_FLAG_REQ_ONE", 8), ("NBD_CMD_FLAG_FAST_ZERO", 16),
        ("NBD_CMD_FLAG_PAYLOAD_LEN", 32),
    ]  # fmt: skip
    assert c.NBD_REPLY_FLAG_DONE == 1
    assert (c.NBD_STATE_HOLE, c.NBD_STATE_ZERO, c.BASE_ALLOCATION) == (1, 2, "base:allocation")


def test_options_replies_and_info() -> None:
    assert {o.name: int(o) for o in c.Option} == {
        "NBD_OPT_EXPORT_NAME": 1, "NBD_OPT_ABORT": 2, "NBD_OPT_LIST": 3,
        "NBD_OPT_PEEK_EXPORT": 4, "NBD_OPT_STARTTLS": 5, "NBD_OPT_INFO": 6, "NBD_OPT_GO": 7,
        "NBD_OPT_STRUCTURED_REPLY": 8, "NBD_OPT_LIST_META_CONTEXT": 9,
        "NBD_OPT_SET_META_CONTEXT": 10, "NBD_OPT_EXTENDED_HEADERS": 11,
    }  # fmt: skip
    err = 2**31
    assert {r.name: int(r) for r in c.OptionReply} == {
        "NBD_REP_ACK": 1, "NBD_REP_SERVER": 2, "NBD_REP_INFO": 3, "NBD_REP_META_CONTEXT": 4,
        "NBD_REP_ERR_UNSUP": err + 1, "NBD_REP_ERR_POLICY": err + 2,
        "NBD_REP_ERR_INVALID": err + 3, "NBD_REP_ERR_PLATFORM": err + 4,
        "NBD_REP_ERR_TLS_REQD": err + 5, "NBD_REP_ERR_UNKNOWN": err + 6,
        "NBD_REP_ERR_SHUTDOWN": err + 7, "NBD_REP_ERR_BLOCK_SIZE_REQD": err + 8,
        "NBD_REP_ERR_TOO_BIG": err + 9, "NBD_REP_ERR_EXT_HEADER_REQD": err + 10,
    }  # fmt: skip
    assert [(i.name, int(i)) for i in c.Info] == [
        ("NBD_INFO_EXPORT", 0), ("NBD_INFO_NAME", 1), ("NBD_INFO_DESCRIPTION", 2),
        ("NBD_INFO_BLOCK_SIZE", 3),
    ]  # fmt: skip


def test_commands_reply_types_and_errnos() -> None:
    assert [(x.name, int(x)) for x in c.Command] == [
        ("NBD_CMD_READ", 0), ("NBD_CMD_WRITE", 1), ("NBD_CMD_DISC", 2), ("NBD_CMD_FLUSH", 3),
        ("NBD_CMD_TRIM", 4), ("NBD_CMD_CACHE", 5), ("NBD_CMD_WRITE_ZEROES", 6),
        ("NBD_CMD_BLOCK_STATUS", 7), ("NBD_CMD_RESIZE", 8),
    ]  # fmt: skip
    assert {t.name: int(t) for t in c.ReplyType} == {
        "NBD_REPLY_TYPE_NONE": 0, "NBD_REPLY_TYPE_OFFSET_DATA": 1,
        "NBD_REPLY_TYPE_OFFSET_HOLE": 2, "NBD_REPLY_TYPE_BLOCK_STATUS": 5,
        "NBD_REPLY_TYPE_BLOCK_STATUS_EXT": 6, "NBD_REPLY_TYPE_ERROR": 2**15 + 1,
        "NBD_REPLY_TYPE_ERROR_OFFSET": 2**15 + 2,
    }  # fmt: skip
    assert {e.name: int(e) for e in c.Errno} == {
        "NBD_EPERM": 1, "NBD_EIO": 5, "NBD_ENOMEM": 12, "NBD_EINVAL": 22, "NBD_ENOSPC": 28,
        "NBD_EOVERFLOW": 75, "NBD_ENOTSUP": 95, "NBD_ESHUTDOWN": 108,
    }  # fmt: skip
    assert c.NBD_MAX_STRING == 4096
