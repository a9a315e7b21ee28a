"""``nbdserver serve --config``: the shipped example nbd-server config, served for real, and bad
configs refused with their file and line.

The example's paths (/srv/nbd, /etc/nbd-server) and port are rewritten into the test's temp dir;
everything else is served exactly as shipped.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from nbdserver.client import NBDServerRefused
from nbdserver.protocol.constants import TransmissionFlag as TF
from tests.interop.security_helpers import REPO, free_port, nbd_connect_from, run, serve

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not shutil.which("nbdinfo"), reason="libnbd-bin is not installed"),
]

EXAMPLE = REPO / "examples" / "nbd-server.conf"


def _example_in(tmp: Path, port: int) -> Path:
    (tmp / "srv").mkdir()
    golden = tmp / "srv" / "golden.img"
    with open(golden, "wb") as f:  # 64 MiB (the example's filesize), data in the first MiB
        f.write(bytes(range(256)) * 4096)
        f.truncate(64 << 20)
    allow = tmp / "allow"
    allow.write_text("# clients of [data]\n127.0.0.2\n")
    text = (
        EXAMPLE.read_text()
        .replace("/srv/nbd/", f"{tmp}/srv/")
        .replace("/etc/nbd-server/allow", str(allow))
        .replace("port = 10809", f"port = {port}")
    )
    conf = tmp / "nbd-server.conf"
    conf.write_text(text)
    return conf


def test_the_example_config_is_served_as_nbd_server_would(tmp_path: Path) -> None:
    port = free_port()
    conf = _example_in(tmp_path, port)
    golden = tmp_path / "srv" / "golden.img"
    before = hashlib.sha256(golden.read_bytes()).hexdigest()
    with serve(["--config", str(conf)], tmp_path, port=port, cli_listen=False) as srv:
        # allowlist = true: LIST works; [data] has an authfile without 127.0.0.1, so it is hidden.
        r = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}/"])
        assert r.returncode == 0, r.stderr
        assert '"export-name": "golden"' in r.stdout and '"export-name": "scratch"' in r.stdout
        assert '"export-name": "data"' not in r.stdout
        # [golden]: read-only, flush on, trim off (not set in the file, as in nbd-server).
        with nbd_connect_from("127.0.0.1", port, "golden") as g:
            assert g.details.has(TF.NBD_FLAG_READ_ONLY) and g.details.has(TF.NBD_FLAG_SEND_FLUSH)
            assert not g.details.has(TF.NBD_FLAG_SEND_TRIM)
            assert g.details.size == 64 << 20
        # [scratch]: copy-on-write over the same file; writes never reach golden.img.
        r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M",
                 "-c", "discard 2M 1M", f"nbd://127.0.0.1:{port}/scratch"])  # fmt: skip
        assert r.returncode == 0 and "fail" not in r.stdout.lower(), r.stdout + r.stderr
        # [data]: authfile admits 127.0.0.2 only; it has trim, flush and fua.
        with nbd_connect_from("127.0.0.2", port, "data") as d:
            assert d.details.has(TF.NBD_FLAG_SEND_TRIM) and d.details.has(TF.NBD_FLAG_SEND_FUA)
        with pytest.raises(NBDServerRefused, match="NBD_REP_ERR_POLICY: export 'data' does not"):
            nbd_connect_from("127.0.0.1", port, "data")
        # The harmless max_threads key is reported with file and line, not ignored silently.
        line = next(n for n, t in enumerate(conf.read_text().splitlines(), 1) if "max_threads" in t)
        assert f"WARNING nbdserver: {conf}:{line}: [generic] max_threads" in srv.log()
    assert hashlib.sha256(golden.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[generic]\ntlsprio = NORMAL\n[a]\nexportname = /tmp/x\n",
         ":2: [generic] tlsprio is not supported by nbdserver"),
        ("[generic]\n[a]\nexportname = /tmp/x\nreadonly = yes\n",
         ":4: [a] readonly: boolean must be true or false, not 'yes'"),
        ("[generic]\n[a]\nexportname = disk.img\n",
         ":3: [a] exportname must be an absolute path"),
        ("[generic]\nforce_tls = true\n[a]\nexportname = /tmp/x\n",
         ": force_tls/tlsonly set but no certfile/keyfile in [generic]"),
    ],
)  # fmt: skip
def test_bad_configs_exit_2_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(text)
    r = run([sys.executable, "-m", "nbdserver.cli", "serve", "--config", str(conf)], cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert f"{conf}{message}" in r.stderr
