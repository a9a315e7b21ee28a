"""The bench command runs end to end: real servers, real fio, a table, JSON, nothing left behind.

Tiny on purpose (one workload, one round, half a second per job, a 16 MiB image) so it proves
the command works without benchmarking anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import peers
from bench.run import main, parse_args, run

pytestmark = pytest.mark.interop


def test_bench_runs_against_nbd_server_and_reports_a_missing_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    rc = main([
        "--servers", "nbdserver,nbd-server", "--nbdserver", str(tmp_path / "no-such-nbdserver"),
        "--workloads", "rand-read", "--rounds", "1", "--runtime", "0.5", "--ramp", "0",
        "--image-size", "16M", "--image-dir", str(tmp_path),
        "--json", str(out), "--markdown", str(md),
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "rand-read" in text
    assert "nbdserver did not run:" in text and "not found" in text
    data = json.loads(out.read_text())
    figures = data["workloads"]["rand-read"]["servers"]["nbd-server"]["figures"]
    assert len(figures) == 1 and figures[0] > 0
    assert data["multi_conn"]["nbd-server"] is True
    assert "| rand-read | IOPS |" in md.read_text()
    # the daemonized server is gone and the image removed
    pid = data["meta"]["pids"]["nbd-server"]
    assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"
    assert list(tmp_path.glob("nbd-bench-*.img")) == []


def test_nbdserver_and_nbdkit_run_the_multiconn_job_and_get_a_ratio(tmp_path: Path) -> None:
    args = parse_args([
        "--servers", "nbdserver,nbdkit", "--workloads", "multiconn-read", "--rounds", "1",
        "--runtime", "0.5", "--ramp", "0", "--image-size", "16M", "--image-dir", str(tmp_path),
        "--no-save",
    ])  # fmt: skip
    args.argv = []
    results = run(args)
    assert results.unavailable == {}
    for name in ("nbdserver", "nbdkit"):
        cell = results.cell("multiconn-read", name)
        assert cell.errors == [] and len(cell.figures) == 1 and cell.figures[0] > 0
        assert not _alive(results.meta["pids"][name])
    # fio's 4 jobs are 4 connections; both servers say they allow that safely.
    assert results.multi_conn == {"nbdserver": True, "nbdkit": True}
    assert results.ratio("multiconn-read", "nbdkit") is not None
    assert results.hwm_kib["nbdserver"] > 0


def test_a_server_that_never_answers_is_a_start_error(tmp_path: Path) -> None:
    # "true" exits at once without ever sending the NBD greeting.
    spec = peers.ServerSpec("nbdkit", "true")
    image = tmp_path / "i.img"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(peers.ServerStartError, match="exited"):
        peers.start_server(spec, image, tmp_path / "w", timeout=5)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _state(pid) != "Z"
