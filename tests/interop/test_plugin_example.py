"""Python plugins served to real clients: the example plugin through nbdinfo, qemu-io and
nbdcopy; read-only and copy-on-write composed over a plugin; the core refusing invalid
requests before a plugin sees them, with a plugin's exception answered as EIO; ``--plugin``
with ``key=value`` parameters (examples/plugin_file.py), ``--format qcow2`` and copy-on-write
over a plugin that serves a qcow2 file's bytes; bad plugins refused in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


FILE_PLUGIN = REPO / "examples" / "plugin_file.py"


def serve_once(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdserver", "serve", "--bind", "127.0.0.1", "--port", "0"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def one_line_refusal(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdserver: "), res.stderr
    assert all(w in lines[0] for w in words), lines[0]


@pytest.fixture
def vm_qcow2(tmp_path: Path) -> tuple[Path, Path]:
    """A raw image and its compressed qcow2 copy (qemu-img made)."""
    raw = tmp_path / "vm.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(MiB) + os.urandom(512 * 1024) + bytes(2 * MiB))
    image = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(image)],
                   check=True, timeout=60)  # fmt: skip
    return raw, image


def test_plugin_parameters_reach_config_and_format_qcow2_reads_through_a_plugin(
    nbdserver: NbdServerFactory, vm_qcow2: tuple[Path, Path]
) -> None:
    """--plugin FILE.py file=PATH: config() gets the parameter; --format qcow2 over the plugin's
    bytes serves the disk inside, as qemu reads it."""
    raw, image = vm_qcow2
    srv = nbdserver("--plugin", str(FILE_PLUGIN), f"file={image}", "--format", "qcow2",
                    image=None, size=None)  # fmt: skip
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri, str(image)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, str(raw)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_copy_on_write_over_a_qcow2_served_by_a_plugin_never_writes_the_file(
    nbdserver: NbdServerFactory, vm_qcow2: tuple[Path, Path], tmp_path: Path
) -> None:
    _, image = vm_qcow2
    before = image.read_bytes()
    srv = nbdserver("--backend", "plugin", "--format", "qcow2", "--copy-on-write", "--cow-dir",
                    str(tmp_path), "--cache-size", "8M", str(FILE_PLUGIN), f"file={image}",
                    image=None, size=None)  # fmt: skip
    done = qemu_io(srv.uri, "write -P 0x3c 1536k 64k", "read -P 0x3c 1536k 64k")
    assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    assert image.read_bytes() == before


@pytest.mark.parametrize(
    ("source", "args", "words"),
    [
        ("def open(readonly, size):\n    return (\n", [],
         ["failed to load", "syntax error", "syntax"]),
        ("def open(r, s):\n    return 1\ndef size(h):\n    return 4096\n", [],
         ["lacks the required pread"]),
        ("def open(r, s):\n    return 1\ndef size(h):\n    return 4096\ndef pread(h, b, o):\n"
         "    pass\n", ["k=v"], ["takes no parameters", "k=v"]),
        (None, ["frobnicate=1"], ["refused its configuration", "frobnicate"]),
        (None, [], ["refused its configuration", "file=PATH is required"]),
        (None, ["notkeyvalue"], ["not KEY=VALUE"]),
    ],
    ids=["syntax-error", "no-pread", "no-config", "unknown-key", "missing-key", "not-key-value"],
)  # fmt: skip
def test_a_bad_plugin_or_parameter_is_a_one_line_error_at_start(
    tmp_path: Path, source: str | None, args: list[str], words: list[str]
) -> None:
    plugin = FILE_PLUGIN
    if source is not None:
        plugin = tmp_path / "bad.py"
        plugin.write_text(source)
    res = serve_once("--plugin", str(plugin), *args)
    one_line_refusal(res, *[w for w in words if w != "syntax"])
    if "syntax" in words:
        assert "bad.py:2" in res.stderr or "bad.py:3" in res.stderr, res.stderr


def test_key_value_arguments_without_a_plugin_are_refused(tmp_path: Path) -> None:
    one_line_refusal(serve_once(str(tmp_path / "a.img"), "k=v"), "one IMAGE only", "--plugin")
