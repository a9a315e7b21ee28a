"""The agent's netlink messages, byte for byte (owner: agent netlink engineer).

Requests are compared with bytes written out field by field from include/uapi/linux/nbd-netlink.h
and the kernel's nbd_attr_policy; replies are real datagrams captured from the UML 6.1 kernel
(tests/kernel). Netlink is host byte order; these goldens are little-endian (x86-64).
"""

import errno
import sys

import pytest
from nbd_agent import genl, netlink
from nbd_agent.netlink import DeviceStatus, NbdCmd

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="goldens are little-endian")


def golden(*fields: tuple[str, str]) -> bytes:
    """Hex per field, each with the reason it looks like that."""
    return bytes.fromhex("".join("".join(hexpart.split()) for hexpart, _why in fields))


def test_connect_request_matches_golden_bytes():
    attrs = netlink.connect_attrs(
        fds=[3],
        size_bytes=1 << 20,
        block_size_bytes=512,
        server_flags=0x1,
        index=0,
        timeout=30,
        dead_conn_timeout=60,
        backend_identifier="kube-nbd:x",
    )
    got = netlink.encode_request(26, NbdCmd.NBD_CMD_CONNECT, attrs, seq=1)
    assert got == golden(
        ("78000000 1a00 0500 01000000 00000000", "nlmsghdr: len 120, family 26, REQ|ACK, seq 1"),
        ("01 01 0000", "genlmsghdr: NBD_CMD_CONNECT, version 1"),
        ("0800 0100 00000000", "NBD_ATTR_INDEX u32 0"),
        ("0c00 0200 0000100000000000", "NBD_ATTR_SIZE_BYTES u64 1 MiB"),
        ("0c00 0300 0002000000000000", "NBD_ATTR_BLOCK_SIZE_BYTES u64 512"),
        ("0c00 0400 1e00000000000000", "NBD_ATTR_TIMEOUT u64 30"),
        ("0c00 0500 0100000000000000", "NBD_ATTR_SERVER_FLAGS u64 NBD_FLAG_HAS_FLAGS"),
        ("1000 0700", "NBD_ATTR_SOCKETS, nested, 16 bytes"),
        ("0c00 0100", "  NBD_SOCK_ITEM, nested"),
        ("0800 0100 03000000", "    NBD_SOCK_FD u32 3"),
        ("0c00 0800 3c00000000000000", "NBD_ATTR_DEAD_CONN_TIMEOUT u64 60"),
        (
            "0f00 0a00 6b7562652d6e62643a7800 00",
            'NBD_ATTR_BACKEND_IDENTIFIER "kube-nbd:x\\0" + pad',
        ),
    )


def test_connect_without_optional_attributes_lets_the_kernel_pick_the_device():
    attrs = netlink.connect_attrs(fds=[5, 6], size_bytes=4096)
    got = netlink.encode_request(26, NbdCmd.NBD_CMD_CONNECT, attrs, seq=2)
    assert got == golden(
        ("3c000000 1a00 0500 02000000 00000000", "nlmsghdr: len 60"),
        ("01 01 0000", "NBD_CMD_CONNECT"),
        ("0c00 0200 0010000000000000", "NBD_ATTR_SIZE_BYTES 4096; no NBD_ATTR_INDEX at all"),
        ("1c00 0700", "NBD_ATTR_SOCKETS with two items"),
        ("0c00 0100 0800 0100 05000000", "  NBD_SOCK_ITEM > NBD_SOCK_FD 5"),
        ("0c00 0100 0800 0100 06000000", "  NBD_SOCK_ITEM > NBD_SOCK_FD 6"),
    )


def test_connect_refuses_an_empty_socket_list():
    with pytest.raises(ValueError, match="at least one socket"):
        netlink.connect_attrs(fds=[], size_bytes=4096)


def test_reconfigure_and_disconnect_requests():
    reconf = netlink.encode_request(
        26,
        NbdCmd.NBD_CMD_RECONFIGURE,
        {"index": 3, "sockets": [{"fd": 9}], "backend_identifier": "b"},
        seq=4,
    )
    assert reconf == golden(
        ("34000000 1a00 0500 04000000 00000000", "nlmsghdr: len 52"),
        ("03 01 0000", "NBD_CMD_RECONFIGURE"),
        ("0800 0100 03000000", "NBD_ATTR_INDEX 3"),
        ("1000 0700 0c00 0100 0800 0100 09000000", "NBD_ATTR_SOCKETS > ITEM > FD 9"),
        ("0600 0a00 6200 0000", 'NBD_ATTR_BACKEND_IDENTIFIER "b\\0" + pad'),
    )
    disc = netlink.encode_request(26, NbdCmd.NBD_CMD_DISCONNECT, {"index": 3}, seq=5)
    assert disc == golden(
        ("1c000000 1a00 0500 05000000 00000000", "nlmsghdr: len 28"),
        ("02 01 0000", "NBD_CMD_DISCONNECT"),
        ("0800 0100 03000000", "NBD_ATTR_INDEX 3"),
    )


def test_status_request_matches_the_bytes_sent_to_the_uml_kernel():
    got = netlink.encode_request(26, NbdCmd.NBD_CMD_STATUS, {}, seq=7)
    assert got == bytes.fromhex("140000001a000500070000000000000005010000")


# Captured from the UML 6.1 kernel (nbds_max=2): NBD_CMD_STATUS reply, then its ACK.
STATUS_REPLY = bytes.fromhex(
    "400000001a00000007000000b2020000050100002c000900140001000800010000000000"
    "05000200000000001400010008000100010000000500020000000000"
)
STATUS_ACK = bytes.fromhex(
    "240000000200000107000000b202000000000000140000001a0005000700000000000000"
)


def test_status_reply_from_the_kernel_decodes_to_the_device_list():
    (msg,) = genl.parse_messages(STATUS_REPLY)
    assert (msg.type, msg.seq) == (26, 7)
    cmd, version, attrs = msg.genl()
    assert (cmd, version) == (NbdCmd.NBD_CMD_STATUS, 1)
    assert netlink.parse_status(genl.decode_attrs(netlink.NBD_ATTRS, attrs)) == [
        DeviceStatus(0, False),
        DeviceStatus(1, False),
    ]


def test_kernel_ack_is_an_nlmsg_error_with_code_zero():
    (msg,) = genl.parse_messages(STATUS_ACK)
    assert msg.type == genl.NLMSG_ERROR
    assert msg.error_code() == 0


def test_kernel_error_carries_the_negative_errno():
    data = bytes.fromhex("24000000 0200 0000 07000000 00000000 eaffffff".replace(" ", "")) + bytes(
        16
    )
    (msg,) = genl.parse_messages(data)
    assert msg.error_code() == -errno.EINVAL


def test_link_dead_notification_names_the_device():
    # What nbd_mcast_index() multicasts: genl NBD_CMD_LINK_DEAD with NBD_ATTR_INDEX.
    data = golden(
        ("1c000000 1a00 0000 00000000 00000000", "nlmsghdr, seq 0: unsolicited"),
        ("04 01 0000", "NBD_CMD_LINK_DEAD"),
        ("0800 0100 02000000", "NBD_ATTR_INDEX 2"),
    )
    assert netlink.parse_link_dead(26, data) == [2]
    assert netlink.parse_link_dead(27, data) == []  # another family's message is ignored


def test_ctrl_getfamily_request_and_mcast_group_decoding():
    req = genl.pack_genl(
        genl.GENL_ID_CTRL,
        genl.CTRL_CMD_GETFAMILY,
        1,
        genl.encode_attrs(genl.CTRL_ATTRS, {"family_name": "nbd"}),
        seq=1,
        flags=genl.NLM_F_REQUEST | genl.NLM_F_ACK,
    )
    assert req == golden(
        ("1c000000 1000 0500 01000000 00000000", "to GENL_ID_CTRL"),
        ("03 01 0000", "CTRL_CMD_GETFAMILY"),
        ("0800 0200 6e626400", 'CTRL_ATTR_FAMILY_NAME "nbd\\0"'),
    )
    groups = genl.encode_attrs(
        genl.CTRL_ATTRS, {"family_id": 26, "mcast_groups": [{"name": "nbd_mc_group", "id": 3}]}
    )
    assert genl.decode_attrs(genl.CTRL_ATTRS, groups) == {
        "family_id": 26,
        "mcast_groups": [{"name": "nbd_mc_group", "id": 3}],
    }


def test_unknown_attributes_are_skipped_and_nested_flag_is_ignored():
    data = genl.pack_attr(99, b"\x01\x02\x03\x04") + genl.pack_attr(
        netlink.NBD_ATTR_INDEX | genl.NLA_F_NESTED, b"\x05\x00\x00\x00"
    )
    assert genl.decode_attrs(netlink.NBD_ATTRS, data) == {"index": 5}


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("ff000000 1a00 0000 00000000 00000000".replace(" ", "")),
        bytes.fromhex("08000000 1a00".replace(" ", "")) + bytes(10),
    ],
)
def test_truncated_messages_are_rejected(data):
    with pytest.raises(genl.GenlDecodeError):
        genl.parse_messages(data)


def test_truncated_attribute_is_rejected():
    with pytest.raises(genl.GenlDecodeError):
        genl.decode_attrs(netlink.NBD_ATTRS, bytes.fromhex("2000 0100 00000000"))


def test_encoding_an_unknown_attribute_name_fails_loudly():
    with pytest.raises(KeyError, match="no attribute"):
        genl.encode_attrs(netlink.NBD_ATTRS, {"sizes": 1})
