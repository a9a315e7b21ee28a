"""NBD wire constants, named exactly as doc/proto.md names them.

One place for every magic number, so the server, the client handshake and the tests agree.
Every value was checked against doc/proto.md of NetworkBlockDevice/nbd (master, and the
extension-ext-header branch for extended headers); tests/unit/test_protocol_constants.py pins
them. Must not hold policy or behaviour, only the spec's numbers (plus our two limits at the end).
"""

from enum import IntEnum, IntFlag

# --- Handshake magics -----------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC = 0x3E889045565A9
CLISERV_MAGIC_OLDSTYLE = 0x00420281861253  # old style; refused, named for diagnostics only

# --- Transmission magics --------------------------------------------------------------------
NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

NBD_DEFAULT_PORT = 10809


class HandshakeFlag(IntFlag):
    """Server handshake flags (16 bits, sent after IHAVEOPT)."""

    NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (32 bits, the client's answer to the handshake flags)."""

    NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
    NBD_FLAG_C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Per-export transmission flags (16 bits)."""

    NBD_FLAG_HAS_FLAGS = 1 << 0
    NBD_FLAG_READ_ONLY = 1 << 1
    NBD_FLAG_SEND_FLUSH = 1 << 2
    NBD_FLAG_SEND_FUA = 1 << 3
    NBD_FLAG_ROTATIONAL = 1 << 4
    NBD_FLAG_SEND_TRIM = 1 << 5
    NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
    NBD_FLAG_SEND_DF = 1 << 7
    NBD_FLAG_CAN_MULTI_CONN = 1 << 8
    NBD_FLAG_SEND_RESIZE = 1 << 9
    NBD_FLAG_SEND_CACHE = 1 << 10
    NBD_FLAG_SEND_FAST_ZERO = 1 << 11
    NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12


class Option(IntEnum):
    NBD_OPT_EXPORT_NAME = 1
    NBD_OPT_ABORT = 2
    NBD_OPT_LIST = 3
    NBD_OPT_PEEK_EXPORT = 4
    NBD_OPT_STARTTLS = 5
    NBD_OPT_INFO = 6
    NBD_OPT_GO = 7
    NBD_OPT_STRUCTURED_REPLY = 8
    NBD_OPT_LIST_META_CONTEXT = 9
    NBD_OPT_SET_META_CONTEXT = 10
    NBD_OPT_EXTENDED_HEADERS = 11


NBD_REP_FLAG_ERROR = 1 << 31


class OptionReply(IntEnum):
    NBD_REP_ACK = 1
    NBD_REP_SERVER = 2
    NBD_REP_INFO = 3
    NBD_REP_META_CONTEXT = 4
    NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
    NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
    NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
    NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
    NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
    NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
    NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
    NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
    NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
    NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10


class Info(IntEnum):
    NBD_INFO_EXPORT = 0
    NBD_INFO_NAME = 1
    NBD_INFO_DESCRIPTION = 2
    NBD_INFO_BLOCK_SIZE = 3


class Command(IntEnum):
    NBD_CMD_READ = 0
    NBD_CMD_WRITE = 1
    NBD_CMD_DISC = 2
    NBD_CMD_FLUSH = 3
    NBD_CMD_TRIM = 4
    NBD_CMD_CACHE = 5
    NBD_CMD_WRITE_ZEROES = 6
    NBD_CMD_BLOCK_STATUS = 7
    NBD_CMD_RESIZE = 8


class CommandFlag(IntFlag):
    NBD_CMD_FLAG_FUA = 1 << 0
    NBD_CMD_FLAG_NO_HOLE = 1 << 1
    NBD_CMD_FLAG_DF = 1 << 2
    NBD_CMD_FLAG_REQ_ONE = 1 << 3
    NBD_CMD_FLAG_FAST_ZERO = 1 << 4
    NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5


NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_ERR_BIT = 1 << 15


class ReplyType(IntEnum):
    NBD_REPLY_TYPE_NONE = 0
    NBD_REPLY_TYPE_OFFSET_DATA = 1
    NBD_REPLY_TYPE_OFFSET_HOLE = 2
    NBD_REPLY_TYPE_BLOCK_STATUS = 5  # proto.md says 5; some headers in the wild say 3
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
    NBD_REPLY_TYPE_ERROR = NBD_REPLY_TYPE_ERR_BIT | 1
    NBD_REPLY_TYPE_ERROR_OFFSET = NBD_REPLY_TYPE_ERR_BIT | 2


# base:allocation metadata context flags.
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"
# kube-nbd's export identity, listed (never selected) through NBD_OPT_LIST_META_CONTEXT as
# "x-kube-nbd:identity=<identity>". "x-" because the spec reserves bare namespaces for the
# protocol document and registered implementations (see docs/protocol.md).
IDENTITY_NAMESPACE = "x-kube-nbd"
IDENTITY_PREFIX = "x-kube-nbd:identity="


class Errno(IntEnum):
    """The only error values the spec allows on the wire (Linux numbering, fixed by the spec)."""

    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108


# Limits this implementation enforces (the spec leaves them to the server).
NBD_MAX_STRING = 4096  # export names, descriptions, meta context names
NBD_MAX_OPTION_LENGTH = 64 * 1024  # larger option payloads are refused and the connection closed
