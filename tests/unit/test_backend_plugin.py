"""Python plugins as backends: loaded from a FILE.py or an entry point, capabilities follow the
functions a plugin has, its exceptions become NBD errors (never a crash), calls are serialised
unless it says it is parallel, and its identity is its own or new per process."""

from __future__ import annotations

import errno
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nbdserver.backends.base import Backend, Extent
from nbdserver.backends.plugin import PluginBackend, configure, load_plugin, open_plugin
from nbdserver.backends.registry import kind_for
from nbdserver.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "plugin_example.py"


def minimal(**extra: Any) -> SimpleNamespace:
    """A read-only plugin of 1 MiB of b"p", plus whatever functions a test adds."""

    def pread(h: object, buf: memoryview, offset: int) -> None:
        buf[:] = b"p" * len(buf)

    functions: dict[str, Any] = {
        "open": lambda readonly, size: "handle",
        "size": lambda h: 1 << 20,
        "pread": pread,
    }
    return SimpleNamespace(**(functions | extra))


def read(b: Backend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    b.pread(memoryview(buf), offset)
    return bytes(buf)


def test_a_plugin_of_open_size_and_pread_is_a_read_only_export_without_extras() -> None:
    b = PluginBackend(minimal(), "min", read_only=False, size=None)
    assert b.size() == 1 << 20
    assert read(b, 10, 5) == b"ppppp"
    assert b.extents(0, 4096) == [Extent(4096, 0)]  # all data, asked or not
    caps = (b.can_write, b.can_flush, b.can_fua, b.can_trim, b.can_zero, b.can_extents)
    assert caps == (False, False, False, False, False, False)
    assert not b.can_multi_conn


def test_capabilities_follow_the_optional_functions_a_plugin_has() -> None:
    full = minimal(
        pwrite=lambda h, d, o: None,
        flush=lambda h: None,
        trim=lambda h, o, n: None,
        zero=lambda h, o, n: None,
        extents=lambda h, o, n: [(n, 0)],
        can_multi_conn=True,
    )
    b = PluginBackend(full, "full", read_only=False, size=None)
    assert (b.can_write, b.can_flush, b.can_fua, b.can_trim, b.can_zero) == (True,) * 5
    assert b.can_extents and b.can_multi_conn
    ro = PluginBackend(full, "full", read_only=True, size=None)
    assert (ro.can_write, ro.can_trim, ro.can_zero, ro.can_fua) == (False,) * 4
    assert ro.can_flush and ro.can_extents


def test_open_receives_the_read_only_flag_and_the_requested_size() -> None:
    seen: list[tuple[bool, int | None]] = []

    def open_(readonly: bool, size: int | None) -> str:
        seen.append((readonly, size))
        return "h"

    plugin = minimal(open=open_)
    PluginBackend(plugin, "p", read_only=True, size=4096)
    assert seen == [(True, 4096)]


def test_a_plugin_may_return_the_bytes_instead_of_filling_the_buffer() -> None:
    b = PluginBackend(minimal(pread=lambda h, buf, o: b"x" * len(buf)), "p", False, None)
    assert read(b, 0, 3) == b"xxx"
    for wrong in (b"x", 3, "xxx"):
        bad = PluginBackend(minimal(pread=lambda h, buf, o, w=wrong: w), "p", False, None)
        with pytest.raises(OSError) as caught:
            read(bad, 0, 3)
        assert caught.value.errno == errno.EIO


def test_a_plugin_oserror_keeps_its_errno_and_any_other_exception_is_eio() -> None:
    def full_disk(h: object, data: bytes, offset: int) -> None:
        raise OSError(errno.ENOSPC, "full")

    def broken(h: object, buf: memoryview, offset: int) -> None:
        raise KeyError("bug in the plugin")

    b = PluginBackend(minimal(pwrite=full_disk, pread=broken), "p", False, None)
    with pytest.raises(OSError) as caught:
        b.pwrite(b"x", 0, fua=False)
    assert caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as caught:
        read(b, 0, 1)
    assert caught.value.errno == errno.EIO
    assert "KeyError" in str(caught.value)


def test_fua_on_a_write_trim_or_zero_is_a_flush_after_it() -> None:
    calls: list[str] = []
    plugin = minimal(
        pwrite=lambda h, d, o: calls.append("pwrite"),
        trim=lambda h, o, n: calls.append("trim"),
        zero=lambda h, o, n: calls.append("zero"),
        flush=lambda h: calls.append("flush"),
    )
    b = PluginBackend(plugin, "p", False, None)
    b.pwrite(b"x", 0, fua=True)
    b.trim(0, 512, fua=False)
    b.zero(0, 512, may_trim=True, fast=False, fua=True)
    assert calls == ["pwrite", "flush", "trim", "zero", "flush"]
    with pytest.raises(OSError) as caught:
        b.zero(0, 512, may_trim=True, fast=True, fua=False)
    assert caught.value.errno == errno.ENOTSUP


def test_extents_from_a_plugin_are_cut_to_the_request_and_nonsense_is_eio() -> None:
    good = minimal(extents=lambda h, o, n: [(4096, 3), (1 << 20, 0)])
    b = PluginBackend(good, "p", False, None)
    assert b.extents(0, 8192) == [Extent(4096, 3), Extent(4096, 0)]
    for nonsense in ([], [(0, 0)], [("x", 0)], None):
        bad = PluginBackend(minimal(extents=lambda h, o, n, r=nonsense: r), "p", False, None)
        with pytest.raises(OSError) as caught:
            bad.extents(0, 4096)
        assert caught.value.errno == errno.EIO


def test_calls_are_serialised_unless_the_plugin_is_parallel() -> None:
    inside, most = [0], [0]
    lock = threading.Lock()
    first_in, crowded = threading.Event(), threading.Event()

    def pread(h: object, buf: memoryview, offset: int) -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            if inside[0] > 1:
                crowded.set()
        if offset == 0:
            first_in.set()
            crowded.wait(0.5)  # the window in which an unserialised second call would arrive
        with lock:
            inside[0] -= 1

    b = PluginBackend(minimal(pread=pread), "p", False, None)

    def second() -> None:
        assert first_in.wait(30)
        read(b, 1, 1)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(read, b, 0, 1)
        pool.submit(second).result()
        first.result()
    assert most[0] == 1

    both = threading.Barrier(2, timeout=30)

    def meet(h: object, buf: memoryview, offset: int) -> None:
        both.wait()

    parallel = minimal(pread=meet, thread_model="parallel")
    p = PluginBackend(parallel, "p", False, None)
    with ThreadPoolExecutor(2) as pool:  # two reads meet inside the plugin at once
        list(pool.map(lambda i: read(p, i, 1), range(2)))


def test_identity_is_the_plugins_own_or_new_per_open() -> None:
    own = minimal(identity=lambda h: "golden-v1")
    a = PluginBackend(own, "p", True, None).identity
    assert a == PluginBackend(own, "p", True, None).identity
    assert a != PluginBackend(minimal(identity=lambda h: "golden-v2"), "p", True, None).identity
    assert PluginBackend(minimal(), "p", True, None).identity.startswith("plugin-")
    assert PluginBackend(minimal(), "p", True, None).identity != (
        PluginBackend(minimal(), "p", True, None).identity
    )


def test_a_plugin_without_a_required_function_or_failing_to_open_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="lacks the required pread"):
        PluginBackend(SimpleNamespace(open=lambda r, s: 1, size=lambda h: 1), "p", False, None)

    def refuse(readonly: bool, size: int | None) -> None:
        raise RuntimeError("no credentials")

    with pytest.raises(ConfigError, match="no credentials"):
        PluginBackend(minimal(open=refuse), "p", False, None)
    with pytest.raises(ConfigError, match="failed to open"):
        PluginBackend(minimal(size=lambda h: "big"), "p", False, None)


def test_the_example_plugin_loads_from_its_file_through_the_backend_registry() -> None:
    b = kind_for("plugin", str(EXAMPLE)).open(str(EXAMPLE), 1 << 20, False)
    assert b.can_write and b.can_extents
    b.pwrite(b"hello", 70_000, fua=True)
    assert read(b, 69_999, 7) == b"\0hello\0"
    assert b.extents(0, 1 << 20) == [Extent(65536, 3), Extent(65536, 0), Extent(917504, 3)]
    b.zero(65536, 65536, may_trim=True, fast=False, fua=False)
    assert b.extents(0, 1 << 20) == [Extent(1 << 20, 3)]
    b.close()


def test_a_missing_or_broken_plugin_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_plugin(str(tmp_path / "nope.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs boto3')\n")
    with pytest.raises(ConfigError, match="needs boto3"):
        open_plugin(str(broken), None, True)


@pytest.fixture(params=["nbdserver.plugins", "kube_nbd.plugins"])
def installed_plugin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A package on sys.path that declares a class as an entry point of the issue's group
    (``nbdserver.plugins``) or of the older ``kube_nbd.plugins``."""
    (tmp_path / "zeroplug.py").write_text(
        textwrap.dedent(
            """
            class Zeroes:
                def open(self, readonly, size):
                    return size or 4096
                def size(self, h):
                    return h
                def pread(self, h, buf, offset):
                    buf[:] = bytes(len(buf))
            """
        )
    )
    dist = tmp_path / "zeroplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zeroplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{request.param}]\nzeroes = zeroplug:Zeroes\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield "zeroes"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("zeroplug", None)


def test_an_installed_entry_point_names_a_plugin_class(installed_plugin: str) -> None:
    b = open_plugin(installed_plugin, 8192, True)
    assert b.size() == 8192 and not b.can_write
    assert read(b, 0, 4) == bytes(4)
    with pytest.raises(ConfigError, match="zeroes"):
        open_plugin("not-installed", None, True)


def test_module_colon_attribute_names_a_plugin_and_a_bad_one_is_a_config_error(
    installed_plugin: str,
) -> None:
    b = open_plugin("zeroplug:Zeroes", 4096, True)  # the class, instantiated once
    assert b.size() == 4096 and read(b, 0, 8) == bytes(8)
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        load_plugin("zeroplug:Nope")
    with pytest.raises(ConfigError, match="failed to import"):
        load_plugin("no_such_module_here:X")


def test_parameters_go_to_config_in_order_then_config_complete() -> None:
    calls: list[tuple[str, ...]] = []
    plugin = minimal(
        config=lambda k, v: calls.append(("config", k, v)),
        config_complete=lambda: calls.append(("complete",)),
        open=lambda readonly, size: calls.append(("open",)),
    )
    configure(plugin, "p", (("file", "/a"), ("mode", "x"), ("file", "/b")))
    PluginBackend(plugin, "p", True, None)
    assert calls == [("config", "file", "/a"), ("config", "mode", "x"), ("config", "file", "/b"),
                     ("complete",), ("open",)]  # fmt: skip


def test_parameters_to_a_plugin_without_config_or_that_it_rejects_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="takes no parameters"):
        configure(minimal(), "p", (("k", "v"),))
    configure(minimal(), "p", ())  # no parameters, no config: fine

    def config(key: str, value: str) -> None:
        raise KeyError(key)

    with pytest.raises(ConfigError, match="refused its configuration: KeyError"):
        configure(minimal(config=config), "p", (("k", "v"),))


def test_plugin_parameters_from_the_command_line_and_export_specs() -> None:
    from nbdserver.config.assemble import assemble_from_argv
    from nbdserver.config.specs import parse_export_spec

    cfg = assemble_from_argv(["--plugin", "p.py", "a=1", "--port", "0", "b=x=y"])
    e = cfg.exports[0]
    assert (e.backend, e.path, e.plugin_params) == ("plugin", "p.py", (("a", "1"), ("b", "x=y")))
    e = parse_export_spec("d=p.py,backend=plugin,plugin.file=/x,ro")
    assert e.plugin_params == (("file", "/x"),) and e.read_only
    with pytest.raises(ConfigError, match="for a plugin"):
        parse_export_spec("d=/img,plugin.file=/x")
    with pytest.raises(ConfigError, match="exclude each other"):
        assemble_from_argv(["--plugin", "p.py", "--backend", "file"])
