"""VMDK and xz images served with ``--format`` and checked by qemu-img: ``qemu-img compare``
reads the export against the image as qemu itself reads it (VMDK) or against the uncompressed
source (xz). Both formats are read-only: a writable export of one is refused at start, and
copy-on-write over one takes the writes. The plugin interface carrying a real format backend is
kept as a test of its own."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        shutil.which("qemu-img") is None or shutil.which("xz") is None,
        reason="needs qemu-img and xz",
    ),
]
MiB = 1 << 20

PLUGIN = """
from nbdserver.formats.{module} import {cls}

thread_model = "parallel"


def open(readonly, size):
    return {cls}({image!r})


def size(h):
    return h.size()


def pread(h, buf, offset):
    h.pread(buf, offset)


def close(h):
    h.close()
"""


def plugin_for(tmp_path: Path, module: str, cls: str, image: Path) -> Path:
    plugin = tmp_path / f"serve_{module}.py"
    plugin.write_text(PLUGIN.format(module=module, cls=cls, image=str(image)))
    return plugin


def source_image(path: Path, size: int) -> None:
    rng = random.Random(size)
    data = bytearray(size)
    for _ in range(8):
        start = rng.randrange(0, size)
        data[start : start + 300_000] = rng.randbytes(min(300_000, size - start))
    path.write_bytes(bytes(data))


def compare(uri: str, fmt: str, image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", fmt, uri, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_a_served_vmdk_compares_equal_with_qemus_own_reading(
    nbdserver: NbdServerFactory, tmp_path: Path, subformat: str
) -> None:
    raw = tmp_path / "src.raw"
    source_image(raw, 6 * MiB + 512)
    image = tmp_path / "disk.vmdk"
    paths = [str(raw), str(image)]
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}", *paths],
        check=True,
    )
    srv = nbdserver("--format", "vmdk", "--read-only", image=image, size=None)
    same = compare(srv.uri, "vmdk", image)
    assert same.returncode == 0, same.stdout + same.stderr
    # The oracle can fail: one changed byte in the source is seen.
    data = bytearray(raw.read_bytes())
    data[5 * MiB] ^= 1
    raw.write_bytes(bytes(data))
    differs = compare(srv.uri, "raw", raw)
    assert differs.returncode == 1, differs.stdout + differs.stderr


def test_a_served_xz_compares_equal_with_its_source(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    raw = tmp_path / "src.raw"
    source_image(raw, 9 * MiB + 4096)
    image = tmp_path / "disk.raw.xz"
    with image.open("wb") as out:
        subprocess.run(["xz", "-T1", "-c", "--block-size=1MiB", str(raw)], stdout=out, check=True)
    srv = nbdserver("--format", "xz", "--read-only", image=image, size=None)
    same = compare(srv.uri, "raw", raw)
    assert same.returncode == 0, same.stdout + same.stderr
    data = bytearray(raw.read_bytes())
    data[-1] ^= 1
    raw.write_bytes(bytes(data))
    assert compare(srv.uri, "raw", raw).returncode == 1


def _xz_image(tmp_path: Path, size: int) -> tuple[Path, Path]:
    raw = tmp_path / "src.raw"
    source_image(raw, size)
    image = tmp_path / "disk.raw.xz"
    with image.open("wb") as out:
        subprocess.run(["xz", "-T1", "-c", "--block-size=1MiB", str(raw)], stdout=out, check=True)
    return raw, image


def test_a_writable_export_of_a_read_only_format_is_refused_in_one_line(tmp_path: Path) -> None:
    _, image = _xz_image(tmp_path, 2 * MiB)
    done = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", str(image), "--format", "xz",
         "--bind", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "read-only" in done.stderr and "Traceback" not in done.stderr, done.stderr
    # Without --format the same file is refused too, naming the format and the flag.
    bare = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", str(image), "--read-only",
         "--bind", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert bare.returncode == 2 and "--format xz" in bare.stderr, bare.stderr


def test_copy_on_write_over_an_xz_image_takes_the_writes(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    raw, image = _xz_image(tmp_path, 3 * MiB)
    srv = nbdserver("--format", "xz", "--copy-on-write", image=image, size=None)
    write = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", srv.uri],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert write.returncode == 0, write.stdout + write.stderr
    expected = bytearray(raw.read_bytes())
    expected[MiB : MiB + 65536] = b"\x5a" * 65536
    raw.write_bytes(bytes(expected))
    same = compare(srv.uri, "raw", raw)
    assert same.returncode == 0, same.stdout + same.stderr


def test_a_format_backend_can_be_carried_by_a_plugin(
    nbdserver: NbdServerFactory, tmp_path: Path
) -> None:
    raw, image = _xz_image(tmp_path, 2 * MiB)
    plugin = plugin_for(tmp_path, "xz", "XzBackend", image)
    srv = nbdserver("--backend", "plugin", "--read-only", image=plugin, size=None)
    same = compare(srv.uri, "raw", raw)
    assert same.returncode == 0, same.stdout + same.stderr
