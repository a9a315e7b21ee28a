"""Copy-on-write through real clients: the base file's bytes never change.

qemu-io writes (aligned and not), discards and ``write -z`` through ``--copy-on-write``; the data
read back through the export is the model's, nbdinfo --map sees the zeroed range as a hole, and
the base file's SHA-256 is the same before and after, also after the server has stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.interop.security_helpers import run, serve

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("qemu-io"), reason="qemu-utils is not installed"),
]

SIZE = 4 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_trims_and_zeroes_leave_the_base_untouched(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    original = os.urandom(SIZE)
    base.write_bytes(original)
    before = _sha(base)
    cow_dir = tmp_path / "overlay"
    cow_dir.mkdir()
    with serve([str(base), "--copy-on-write", "--cow-dir", str(cow_dir)], tmp_path) as srv:
        uri = f"nbd://127.0.0.1:{srv.port}/"
        cmds = [
            "write -P 0xab 0 64k",
            "write -P 0xcd 100001 5000",  # unaligned: forces copy-up of partial blocks
            "discard 1M 256k",
            "write -z 2M 128k",
            "flush",
        ]
        r = run(["qemu-io", "-f", "raw", *[a for c in cmds for a in ("-c", c)], uri])
        assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
        model = bytearray(original)
        model[0 : 64 << 10] = b"\xab" * (64 << 10)
        model[100001 : 100001 + 5000] = b"\xcd" * 5000
        model[2 << 20 : (2 << 20) + (128 << 10)] = bytes(128 << 10)
        out = tmp_path / "out.img"
        r = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)])
        assert r.returncode == 0, r.stderr
        got = out.read_bytes()
        trimmed = slice(1 << 20, (1 << 20) + (256 << 10))  # contents after a trim are unspecified
        got_m, model_m = bytearray(got), bytearray(model)
        got_m[trimmed] = model_m[trimmed] = b""
        assert got_m == model_m
        assert _sha(base) == before, "copy-on-write wrote to the base image"
        r = run(["nbdinfo", "--map", "--json", uri])
        assert r.returncode == 0, r.stderr
        zero_region = {
            (e["offset"], e["length"], e["type"])
            for e in json.loads(r.stdout)
            if e["offset"] <= (2 << 20) < e["offset"] + e["length"]
        }
        assert zero_region and all(t & 2 for _o, _l, t in zero_region)  # NBD_STATE_ZERO
        # The overlay was unlinked at creation: nothing is left behind in the cow directory.
        assert list(cow_dir.iterdir()) == []
    assert _sha(base) == before
