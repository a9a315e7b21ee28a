"""A consumer's data never makes its own export unservable: a raw volume whose first bytes
happen to be a qcow2 header (a VM image written into it, a copied file) is served again after
a server restart with the command line the operator builds.

Found in review: nbdserver refuses a file with a format header unless ``--format`` is given (no
probing), and the operator gave none, so the restart after such a write failed the export.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.controlplane.test_manifests_server_cli import CASES, command_line
from tests.interop.security_helpers import serve

QCOW2_HEADER = b"QFI\xfb\x00\x00\x00\x03" + bytes(504)


def test_a_raw_volume_holding_a_qcow2_header_is_served_again(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.write(QCOW2_HEADER)
        f.truncate(2 * 2**30)
    args = command_line(CASES["claim-ro"])
    args = [str(image) if a == "/data/disk.img" else a for a in args[1:]]  # drop "serve"
    assert str(image) in args
    with serve(args, tmp_path) as srv:
        info = subprocess.run(
            ["nbdinfo", "--json", f"nbd://127.0.0.1:{srv.port}/disk"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert json.loads(info.stdout)["exports"][0]["export-size"] == 2 * 2**30
