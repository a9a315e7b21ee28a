"""VMDK and xz images served through NBD and checked by qemu-img: until ``--format`` is wired,
each format backend is served through a three-line plugin (which also shows the plugin interface
carrying a real backend), and ``qemu-img compare`` reads the export against the image as qemu
itself reads it (VMDK) or against the uncompressed source (xz)."""

from __future__ import annotations

import random
import shutil
import subprocess
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
    plugin = plugin_for(tmp_path, "vmdk", "VmdkBackend", image)
    srv = nbdserver("--backend", "plugin", "--read-only", image=plugin, size=None)
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
    plugin = plugin_for(tmp_path, "xz", "XzBackend", image)
    srv = nbdserver("--backend", "plugin", "--read-only", image=plugin, size=None)
    same = compare(srv.uri, "raw", raw)
    assert same.returncode == 0, same.stdout + same.stderr
    data = bytearray(raw.read_bytes())
    data[-1] ^= 1
    raw.write_bytes(bytes(data))
    assert compare(srv.uri, "raw", raw).returncode == 1
