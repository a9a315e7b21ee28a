"""Python plugins served to real clients: the example plugin through nbdinfo, qemu-io and
nbdcopy; read-only and copy-on-write composed over a plugin; and the core refusing invalid
requests before a plugin sees them, with a plugin's exception answered as EIO."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbdserver.backends.plugin import PluginBackend
from nbdserver.protocol import wire
from nbdserver.protocol.constants import Command, Errno
from tests.interop.conftest import REPO, NbdServerFactory
from tests.interop.test_server_robustness import recv_exact
from tests.interop.transmission_harness import start_transmission

pytestmark = pytest.mark.interop
EXAMPLE = REPO / "examples" / "plugin_example.py"
MiB = 1 << 20

# A read-only plugin whose byte at offset i is i % 251: any byte shows where it came from.
PATTERN = textwrap.dedent(
    """
    def open(readonly, size):
        return size or 4 * 1024 * 1024

    def size(h):
        return h

    def pread(h, buf, offset):
        buf[:] = bytes((offset + i) % 251 for i in range(len(buf)))
    """
)


def pattern(offset: int, length: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(length))


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)


def test_the_example_plugin_serves_nbdinfo_qemu_io_and_nbdcopy(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    srv = nbdserver("--backend", "plugin", image=EXAMPLE, size="16M")
    info = json.loads(
        subprocess.run(
            ["nbdinfo", "--json", srv.uri], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )["exports"][0]
    assert info["export-size"] == 16 * MiB
    assert (info["can_trim"], info["can_zero"], info["can_flush"], info["is_read_only"]) == (
        True,
        True,
        True,
        False,
    )
    done = qemu_io(srv.uri, "write -P 0x5a 1M 128k", "read -P 0x5a 1M 128k", "read -P 0 0 1M")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout
    mapped = subprocess.run(
        ["nbdinfo", "--map", "--json", srv.uri], capture_output=True, text=True, check=True
    ).stdout
    data = [(e["offset"], e["length"]) for e in json.loads(mapped) if e["type"] == 0]
    assert data == [(MiB, 128 * 1024)]

    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(3 * MiB) + bytes(13 * MiB))
    back = tmp_path / "back.raw"
    subprocess.run(["nbdcopy", str(source), srv.uri], check=True, timeout=60)
    subprocess.run(["nbdcopy", srv.uri, str(back)], check=True, timeout=60)
    assert back.read_bytes() == source.read_bytes()


def test_a_plugin_export_given_with_e_and_ro_refuses_writes(
    nbdserver: NbdServerFactory,
) -> None:
    srv = nbdserver(
        "--export", f"ram={EXAMPLE},backend=plugin,size=4M,ro=true", image=None, size=None
    )
    uri = srv.export_uri("ram")
    info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True)
    export = json.loads(info.stdout)["exports"][0]
    assert export["is_read_only"] is True and export["export-size"] == 4 * MiB
    assert qemu_io(uri, "read -P 0 0 64k").returncode != 0  # qemu-io asks for read-write
    done = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 64k", uri], timeout=60)
    assert done.returncode == 0


def test_copy_on_write_over_a_read_only_plugin_takes_writes_in_its_overlay(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    plugin = tmp_path / "pattern.py"
    plugin.write_text(PATTERN)
    srv = nbdserver(
        "--backend",
        "plugin",
        "--copy-on-write",
        "--cow-dir",
        str(tmp_path),
        image=plugin,
        size=None,
    )
    done = qemu_io(srv.uri, "write -P 0x77 64k 4k", "read -P 0x77 64k 4k")
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    out = tmp_path / "out.raw"
    subprocess.run(["nbdcopy", srv.uri, str(out)], check=True, timeout=60)
    want = bytearray(pattern(0, 4 * MiB))
    want[65536 : 65536 + 4096] = b"\x77" * 4096
    assert out.read_bytes() == bytes(want)


def reply(client: socket.socket) -> tuple[int, int]:
    raw = recv_exact(client, 16)
    return int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[8:16], "big")


def test_the_core_refuses_bad_requests_before_the_plugin_and_a_plugin_bug_is_eio() -> None:
    calls: list[tuple[str, int]] = []

    def pread(h: object, buf: memoryview, offset: int) -> None:
        calls.append(("pread", offset))
        if offset == 4096:
            raise ZeroDivisionError("plugin bug")
        buf[:] = bytes(len(buf))

    plugin = SimpleNamespace(open=lambda r, s: None, size=lambda h: MiB, pread=pread)
    srv = start_transmission(PluginBackend(plugin, "t", read_only=False, size=None))
    client = srv.client
    try:
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 1, MiB - 512, 1024))
        assert reply(client) == (Errno.NBD_EINVAL, 1)
        client.sendall(wire.pack_request(0, Command.NBD_CMD_WRITE, 2, 0, 512) + bytes(512))
        assert reply(client) == (Errno.NBD_EPERM, 2)
        assert calls == []
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 3, 4096, 512))
        assert reply(client) == (Errno.NBD_EIO, 3)
        client.sendall(wire.pack_request(0, Command.NBD_CMD_READ, 4, 0, 512))
        assert reply(client) == (0, 4)
        assert recv_exact(client, 512) == bytes(512)
        assert calls == [("pread", 4096), ("pread", 0)]
        client.sendall(wire.pack_request(0, Command.NBD_CMD_DISC, 5, 0, 0))
        srv.thread.join(10)
        assert not srv.thread.is_alive()
    finally:
        client.close()
        srv.thread.join(10)
