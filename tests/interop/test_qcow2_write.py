"""qcow2 writes through nbdserver, with qemu as the oracle: after qemu-io's writes, zeroes and
discards through NBD, ``qemu-img check`` finds no errors and the image compares equal to a raw
reference that got the same requests; the backing file is never written; SIGTERM with writes in
flight leaves a clean image."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.interop.conftest import NbdServerFactory
from tests.interop.qcow2_helpers import (
    check_clean,
    compare,
    needs_qemu,
    qcow2,
    qemu_io,
    raw_with_data,
    run,
)
from tests.interop.security_helpers import wait_for

pytestmark = [pytest.mark.interop, needs_qemu]

# name -> (create options, backing file?, discards allowed?)
VARIANTS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "v3-64k": (("compat=1.1",), False, True),
    "v2-64k": (("compat=0.10",), False, True),
    "v3-512-grows-refcount-table": (("cluster_size=512",), False, True),
    "v3-2M": (("cluster_size=2M",), False, True),
    "v3-refcount8": (("refcount_bits=8", "cluster_size=4096"), False, True),
    "v3-over-backing": (("compat=1.1",), True, True),
    "v2-over-backing": (("compat=0.10", "cluster_size=4096"), True, False),
    "prealloc-metadata": (("preallocation=metadata",), False, True),
    "extended-l2": (("extended_l2=on",), False, True),
    "extended-l2-over-backing": (("extended_l2=on", "cluster_size=128k"), True, True),
}

# Unaligned writes (partial clusters: copy-on-write from backing or zeroes), zeroes of whole and
# partial clusters, discards aligned to 2 MiB (every cluster size divides it).
WRITES = [
    "write -P 0xa1 1000 70000",
    "write -P 0xa2 1048000 3000000",
    "write -z 500000 1500000",
    "write -P 0xa3 5242880 65536",
    "write -z 6291456 1048576",
    "write -P 0xa4 8000000 388608",
    "write -P 0xa5 0 512",
    "flush",
]
DISCARDS = ["discard 4194304 2097152", "write -P 0xa6 4200000 12345"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_and_reference(
    tmp_path: Path, options: tuple[str, ...], backing: bool
) -> tuple[Path, Path]:
    base = raw_with_data(tmp_path / "base.raw") if backing else None
    image = qcow2(tmp_path / "a.qcow2", *options, backing=base)
    qemu_io(image, "qcow2", "write -P 0x5a 64k 200k")  # some data of its own
    ref = tmp_path / "ref.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(ref))
    return image, ref


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_writes_zeroes_and_discards_leave_a_clean_image_equal_to_the_reference(
    tmp_path: Path, nbdserver: NbdServerFactory, variant: str
) -> None:
    options, backing, discards = VARIANTS[variant]
    image, ref = _image_and_reference(tmp_path, options, backing)
    before = _sha(tmp_path / "base.raw") if backing else ""
    commands = WRITES + (DISCARDS if discards else [])
    srv = nbdserver("--format", "qcow2", image=image, size=None)
    qemu_io(srv.uri, "raw", *commands)
    qemu_io(ref, "raw", *commands)
    assert srv.stop() == 0
    check_clean(image)
    assert compare(str(image), "qcow2", str(ref), "raw").returncode == 0
    if backing:
        assert _sha(tmp_path / "base.raw") == before


def test_a_compressed_image_is_written_by_copying_clusters_out(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    src = raw_with_data(tmp_path / "src.raw")
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", str(src), str(image))
    srv = nbdserver("--format", "qcow2", image=image, size=None)
    qemu_io(srv.uri, "raw", *WRITES, *DISCARDS)
    qemu_io(src, "raw", *WRITES, *DISCARDS)
    assert srv.stop() == 0
    check_clean(image)
    assert compare(str(image), "qcow2", str(src), "raw").returncode == 0


def test_sigterm_with_writes_in_flight_leaves_a_clean_image(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    image = qcow2(tmp_path / "a.qcow2", "cluster_size=4096", size=64 << 20)
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (64 << 12))
    srv = nbdserver("--format", "qcow2", image=image, size=None)
    start = image.stat().st_size
    writer = subprocess.Popen(
        ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W", str(src), srv.uri],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: image.stat().st_size > start + (4 << 20), what="writes under way")
        assert srv.stop() == 0
    finally:
        writer.kill()
        writer.wait()
    check_clean(image)


def test_a_read_only_format_refusal_names_the_reason(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "a.qcow2")
    run("qemu-img", "snapshot", "-c", "snap", str(image))
    res = subprocess.run(
        [sys.executable, "-m", "nbdserver", "serve", str(image), "--format", "qcow2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "internal snapshots" in res.stderr and "--read-only" in res.stderr


def test_a_dirty_or_corrupt_image_opens_read_only_only(tmp_path: Path) -> None:
    from nbdserver.formats.qcow2.backend import open_qcow2

    image = qcow2(tmp_path / "a.qcow2")
    for bit, word in ((1, "dirty"), (2, "corrupt")):
        with open(image, "r+b") as f:
            f.seek(79)  # the low byte of incompatible_features
            f.write(bytes([bit]))
        with pytest.raises(OSError, match=f"marked {word}|is {word}"):
            open_qcow2(str(image), False)
        open_qcow2(str(image), True).close()


def test_copy_on_write_over_a_qcow2_image_never_writes_it(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    image, ref = _image_and_reference(tmp_path, ("compat=1.1",), backing=False)
    before = _sha(image)
    cow = tmp_path / "cow"
    cow.mkdir()
    srv = nbdserver("--format", "qcow2", "--copy-on-write", "--cow-dir", str(cow), image=image,
                    size=None)  # fmt: skip
    qemu_io(srv.uri, "raw", *WRITES)
    qemu_io(ref, "raw", *WRITES)
    assert compare(srv.uri, "raw", str(ref), "raw").returncode == 0
    assert srv.stop() == 0
    assert _sha(image) == before


def test_the_refcount_table_moves_when_it_grows_and_stays_consistent(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    image = qcow2(tmp_path / "a.qcow2", "cluster_size=512", size=32 << 20)
    ref = tmp_path / "ref.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(ref), str(32 << 20))
    header = image.read_bytes()[48:60]
    writes = ["write -P 0xb1 0 20M", "write -z 1M 3M", "discard 10M 2M", "write -P 0xb2 30M 1M"]
    srv = nbdserver("--format", "qcow2", image=image, size=None)
    qemu_io(srv.uri, "raw", *writes)
    qemu_io(ref, "raw", *writes)
    assert srv.stop() == 0
    assert image.read_bytes()[48:60] != header  # refcount_table_offset/clusters moved
    check_clean(image)
    assert compare(str(image), "qcow2", str(ref), "raw").returncode == 0


def test_two_connections_writing_at_once_leave_a_clean_image(
    tmp_path: Path, nbdserver: NbdServerFactory
) -> None:
    image = qcow2(tmp_path / "a.qcow2", "cluster_size=4096", size=16 << 20)
    ref = tmp_path / "ref.raw"
    run("qemu-img", "create", "-q", "-f", "raw", str(ref), str(16 << 20))
    halves = [[f"write -P {0xC0 + i} {i * 8 + j * 2}M 1000000" for j in range(4)] for i in range(2)]
    srv = nbdserver("--format", "qcow2", image=image, size=None)
    writers = [
        subprocess.Popen(["qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], srv.uri],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for cmds in halves
    ]  # fmt: skip
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    for cmds in halves:
        qemu_io(ref, "raw", *cmds)
    assert srv.stop() == 0
    check_clean(image)
    assert compare(str(image), "qcow2", str(ref), "raw").returncode == 0
