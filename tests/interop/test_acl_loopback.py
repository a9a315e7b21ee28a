"""Address ACLs and single-writer, with client sockets bound to 127.0.0.x source addresses.

All of 127.0.0.0/8 routes over ``lo``, so one machine can play several client hosts: a socket
bound to 127.0.0.2 reaches a server on 127.0.0.1 and the server sees 127.0.0.2 as the peer.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from nbdserver.client import NBDServerRefused
from nbdserver.protocol.constants import TransmissionFlag
from tests.interop.security_helpers import (
    is_greeting,
    nbd_connect_from,
    raw_greeting,
    serve,
    wait_for,
)

pytestmark = pytest.mark.interop


def test_global_allow_list_admits_listed_sources_and_closes_others_silently(
    tmp_path: Path,
) -> None:
    with serve(
        ["--backend", "memory", "--size", "1M", "--allow", "127.0.0.2", "--allow", "10.0.0.0/8"],
        tmp_path,
    ) as srv:
        assert is_greeting(raw_greeting("127.0.0.1", srv.port, source="127.0.0.2"))
        # Refused before negotiation: not even the NBD greeting is sent.
        assert raw_greeting("127.0.0.1", srv.port, source="127.0.0.3") == b""
        assert raw_greeting("127.0.0.1", srv.port, source="127.0.0.1") == b""
        wait_for(
            lambda: (
                "refused 127.0.0.3" in srv.log() and "address not in the allow list" in srv.log()
            ),
            what="the refusal in the log",
        )
        with nbd_connect_from("127.0.0.2", srv.port) as conn:  # a full session still works
            conn.pwrite(b"acl!" * 128, 0)
            assert conn.pread(0, 512) == b"acl!" * 128


def test_per_export_lists_hide_and_refuse_exports(tmp_path: Path) -> None:
    args = [
        "--export", "secret=memory,size=1M,allow=127.0.0.2",
        "--export", "public=memory,size=1M",
    ]  # fmt: skip
    with serve(args, tmp_path) as srv:
        with nbd_connect_from("127.0.0.2", srv.port, "secret") as conn:
            assert conn.details.size == 1 << 20
        with pytest.raises(NBDServerRefused, match="NBD_REP_ERR_POLICY"):
            nbd_connect_from("127.0.0.3", srv.port, "secret")
        with nbd_connect_from("127.0.0.3", srv.port, "public") as conn:
            assert conn.details.size == 1 << 20
        wait_for(
            lambda: "address not in its allow list" in srv.log(), what="per-export refusal log"
        )


def test_ipv6_rule_does_not_admit_ipv4_clients(tmp_path: Path) -> None:
    with serve(["--backend", "memory", "--size", "1M", "--allow", "::1/128"], tmp_path) as srv:
        assert raw_greeting("127.0.0.1", srv.port, source="127.0.0.1") == b""


def test_bad_cidr_is_a_clear_startup_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "nbdserver.cli", "serve", "--backend", "memory", "--size", "1M",
         "--port", "0", "--allow", "10.0.0.0/33"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--allow: not an IP address or CIDR network: '10.0.0.0/33'" in result.stderr


def test_single_writer_gives_one_host_write_access_and_others_a_read_only_view(
    tmp_path: Path,
) -> None:
    ro = TransmissionFlag.NBD_FLAG_READ_ONLY
    with serve(["--backend", "memory", "--size", "1M", "--single-writer"], tmp_path) as srv:
        writer = nbd_connect_from("127.0.0.2", srv.port)
        second = nbd_connect_from("127.0.0.2", srv.port)  # multi-conn from the writer host
        reader = nbd_connect_from("127.0.0.3", srv.port)
        try:
            assert not writer.details.has(ro) and not second.details.has(ro)
            assert reader.details.has(ro)
            writer.pwrite(b"W" * 4096, 0)
            second.pwrite(b"S" * 4096, 4096)
            assert reader.pread(0, 8192) == b"W" * 4096 + b"S" * 4096
            with pytest.raises(OSError) as exc:
                reader.pwrite(b"r" * 512, 0)
            assert exc.value.errno == errno.EPERM  # the core refuses writes on a read-only view
            assert reader.pread(0, 512) == b"W" * 512
        finally:
            for c in (writer, second, reader):
                c.close()
        # Once the writer host's connections are gone, another host may take the lease.
        wait_for(lambda: srv.log().count("ended after") >= 3, what="the three connections to end")
        with nbd_connect_from("127.0.0.3", srv.port) as conn:
            assert not conn.details.has(ro)
            conn.pwrite(b"3" * 512, 0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback in this environment")
def test_dual_stack_listener_matches_ipv4_mapped_and_ipv6_peers(tmp_path: Path) -> None:
    args = ["--backend", "memory", "--size", "1M", "--allow", "127.0.0.2", "--allow", "::1"]
    with serve(args, tmp_path, bind="::") as srv:
        # IPv4 clients reach a "::" listener as ::ffff:127.0.0.x and match IPv4 rules.
        assert is_greeting(raw_greeting("127.0.0.1", srv.port, source="127.0.0.2"))
        assert raw_greeting("127.0.0.1", srv.port, source="127.0.0.3") == b""
        with socket.socket(socket.AF_INET6) as s:
            s.settimeout(5)
            s.connect(("::1", srv.port))
            assert s.recv(8) == b"NBDMAGIC"
        wait_for(lambda: "refused [::ffff:127.0.0.3]" in srv.log(), what="the mapped refusal log")
