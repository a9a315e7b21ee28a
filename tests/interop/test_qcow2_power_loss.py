"""qcow2 metadata order under a power loss: every write the qcow2 backend makes is recorded with
the syncs between them; an image "as the disk may hold it after a power cut" is the file as of
one sync plus any subset of the writes issued after it (the kernel may write back dirty pages in
any order). ``qemu-img check`` on such images finds leaks at worst, never an L2 entry pointing
at a cluster of refcount 0 nor two entries sharing a cluster."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from nbdserver.formats._image import LocalImage
from nbdserver.formats.qcow2.backend import Qcow2Backend
from tests.interop.qcow2_helpers import qcow2

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img"),
]
MiB = 1 << 20
SYNC = None


class RecordingImage(LocalImage):
    """A local image file that also records its writes and resizes (a size and None), and
    ``SYNC`` for each sync."""

    def __init__(self, path: str) -> None:
        super().__init__(path, True)
        self.log: list[tuple[int, bytes | None] | None] = []

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.log.append((offset, bytes(data)))
        super().write(data, offset)

    def resize(self, size: int) -> None:
        self.log.append((size, None))
        super().resize(size)

    def sync(self) -> None:
        self.log.append(SYNC)
        super().sync()

    def datasync(self) -> None:
        self.sync()


def apply(state: bytearray, offset: int, data: bytes | None) -> None:
    if data is None:  # a resize
        del state[offset:]
        state.extend(bytes(offset - len(state)))
        return
    if len(state) < offset + len(data):
        state.extend(bytes(offset + len(data) - len(state)))
    state[offset : offset + len(data)] = data


def workload(backend: Qcow2Backend, rng: random.Random, size: int) -> None:
    for _ in range(300):
        length = rng.choice((4096, 65536, 150000))
        offset = rng.randrange(0, size - length)
        pick = rng.random()
        if pick < 0.6:
            backend.pwrite(rng.randbytes(length), offset, fua=False)
        elif pick < 0.75:
            backend.zero(offset, length, may_trim=True, fast=False, fua=False)
        elif pick < 0.9:
            backend.trim(offset, length, fua=False)
        else:
            backend.flush()


@pytest.mark.parametrize("seed", [1, 2])
def test_no_power_cut_leaves_a_corrupt_image(tmp_path: Path, seed: int) -> None:
    size = 24 * MiB
    image = qcow2(tmp_path / "p.qcow2", "cluster_size=65536", size=size)
    initial = image.read_bytes()
    recorder = RecordingImage(str(image))
    backend = Qcow2Backend(recorder, read_only=False)
    rng = random.Random(seed)
    workload(backend, rng, size)
    log = list(recorder.log)
    backend.close()
    syncs = [i for i, item in enumerate(log) if item is SYNC]
    assert len(syncs) > 5, "the workload should have synced several times"
    cut = tmp_path / "cut.qcow2"
    corrupt = []
    for trial in range(40):
        start = rng.choice([-1, *syncs])  # the last sync that completed (-1: none)
        after = next((i for i in syncs if i > start), len(log))
        state = bytearray(initial)
        for item in log[: start + 1]:
            if item is not SYNC:
                apply(state, *item)
        for item in log[start + 1 : after]:
            if item is not SYNC and rng.random() < 0.5:
                apply(state, *item)
        cut.write_bytes(state)
        res = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(cut)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        if res.returncode not in (0, 3) or "ERROR" in res.stdout:
            errors = [ln for ln in res.stdout.splitlines() if "ERROR" in ln]
            corrupt.append(f"trial {trial} (after write {start}): {errors[:3]} {res.stderr}")
    assert not corrupt, "\n".join(corrupt[:3])
