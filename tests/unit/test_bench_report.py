"""The bench's own arithmetic and parsing: fio JSON, medians, ratios, tables, profiles."""

from __future__ import annotations

import json

import pytest

from bench.profile import census_table, parse_perf_stat, summarize_collapsed
from bench.report import (
    BenchResults,
    from_json,
    markdown_table,
    render_markdown,
    render_text,
    rows,
    target_notes,
    to_json,
)
from bench.run import parse_args, parse_size
from bench.workloads import WORKLOADS_BY_NAME, FioError, fio_command, parse_fio_json

SEQ = WORKLOADS_BY_NAME["seq-read"]
RAND_WRITE = WORKLOADS_BY_NAME["rand-write"]
MULTI = WORKLOADS_BY_NAME["multiconn-read"]


def fio_json(direction: str = "read", jobs: int = 1, bw: float = 2e9, iops: float = 2000.0) -> str:
    stats = {
        "bw_bytes": bw,
        "iops": iops,
        "total_ios": 100,
        "io_bytes": 1 << 20,
        "clat_ns": {"mean": 4000.0},
    }
    other = {"bw_bytes": 0, "iops": 0.0, "total_ios": 0, "io_bytes": 0, "clat_ns": {"mean": 0.0}}
    job = {"jobname": "j", "error": 0, "read": other, "write": other}
    job = {**job, direction: stats}
    return json.dumps({"fio version": "fio-3.33", "jobs": [job] * jobs})


def test_large_block_figure_is_megabytes_per_second() -> None:
    assert parse_fio_json(fio_json(bw=1.5e9), SEQ).figure(SEQ) == pytest.approx(1500.0)


def test_small_block_figure_is_iops_of_the_write_side() -> None:
    result = parse_fio_json(fio_json("write", iops=81234.5), RAND_WRITE)
    assert result.figure(RAND_WRITE) == pytest.approx(81234.5)
    assert result.mean_lat_us == pytest.approx(4.0)


def test_jobs_reported_separately_are_summed() -> None:
    assert parse_fio_json(fio_json(jobs=4, bw=1e9), MULTI).figure(MULTI) == pytest.approx(4000.0)


def test_log_lines_before_the_json_are_ignored() -> None:
    text = "fio: connected to NBD server\n" * 4 + fio_json(bw=1e6)
    assert parse_fio_json(text, SEQ).figure(SEQ) == pytest.approx(1.0)


def test_a_failed_job_is_an_error_not_a_low_figure() -> None:
    data = json.loads(fio_json())
    data["jobs"][0]["error"] = 5
    with pytest.raises(FioError, match="error 5"):
        parse_fio_json(json.dumps(data), SEQ)


def test_a_job_that_did_no_io_in_its_direction_is_an_error() -> None:
    with pytest.raises(FioError, match="no write"):
        parse_fio_json(fio_json("read"), RAND_WRITE)


def test_output_without_json_is_an_error() -> None:
    with pytest.raises(FioError):
        parse_fio_json("fio: nbd_connect_uri: connection refused\n", SEQ)


def test_multiconn_job_gives_each_connection_its_own_quarter() -> None:
    cmd = fio_command(MULTI, "nbd://127.0.0.1:1/", 2, 1 << 30, "/tmp/o.json")
    assert "--numjobs=4" in cmd
    assert f"--size={1 << 28}" in cmd
    assert f"--offset_increment={1 << 28}" in cmd
    assert "--ioengine=nbd" in cmd and "--uri=nbd://127.0.0.1:1/" in cmd


def test_fractional_runtime_is_given_to_fio_in_milliseconds() -> None:
    cmd = fio_command(SEQ, "nbd://h/", 0.5, 1 << 20, "o", ramp_time=0)
    assert "--runtime=500ms" in cmd
    assert not any(c.startswith("--ramp_time") for c in cmd)


def sample_results() -> BenchResults:
    r = BenchResults(servers=["nbdserver", "qemu-nbd", "nbdkit"], workloads=[SEQ, RAND_WRITE])
    r.cell("seq-read", "nbdserver").figures += [900.0, 1100.0, 1000.0]
    r.cell("seq-read", "qemu-nbd").figures += [500.0, 510.0, 490.0]
    r.cell("seq-read", "nbdkit").figures += [2000.0, 1900.0, 2100.0]
    r.cell("rand-write", "nbdserver").figures += [30000.0]
    r.cell("rand-write", "qemu-nbd").errors.append("fio exited 1: boom")
    r.unavailable["nbd-server"] = "nbd-server not found"
    r.hwm_kib["nbdserver"] = 40 * 1024
    r.peak_rss_kib["nbdserver"] = 41 * 1024
    return r


def test_ratio_is_nbdserver_median_over_peer_median() -> None:
    r = sample_results()
    assert r.ratio("seq-read", "qemu-nbd") == pytest.approx(1000.0 / 500.0)
    assert r.ratio("seq-read", "nbdkit") == pytest.approx(0.5)


def test_a_peer_without_figures_has_no_ratio() -> None:
    assert sample_results().ratio("rand-write", "qemu-nbd") is None


def test_table_shows_medians_ratios_and_na() -> None:
    header, body = rows(sample_results())
    assert header == ["workload", "unit", "nbdserver", "qemu-nbd", "nbdkit",
                      "nbdserver/qemu-nbd", "nbdserver/nbdkit"]  # fmt: skip
    assert body[0] == ["seq-read", "MB/s", "1,000.0", "500.0", "2,000.0", "2.00x", "0.50x"]
    assert body[1][3] == "n/a" and body[1][5] == "n/a"


def test_text_names_every_server_that_did_not_run_or_failed_and_the_peak_rss() -> None:
    text = render_text(sample_results())
    assert "nbd-server did not run: nbd-server not found" in text
    assert "qemu-nbd rand-write: fio exited 1: boom" in text
    assert "40.0 MiB VmHWM" in text


def test_markdown_has_a_header_separator_with_numeric_alignment() -> None:
    md = markdown_table(["workload", "unit", "a"], [["x", "MB/s", "1"]])
    assert md.splitlines()[1] == "| --- | --- | ---: |"
    r = sample_results()
    r.meta = {"command": "python -m bench --rounds 3", "commit": "abc123"}
    assert "`python -m bench --rounds 3`" in render_markdown(r)


def test_json_keeps_every_round_and_the_ratios() -> None:
    data = to_json(sample_results())
    assert data["workloads"]["seq-read"]["servers"]["nbdserver"]["figures"] == [
        900.0,
        1100.0,
        1000.0,
    ]
    assert data["workloads"]["seq-read"]["ratios"]["nbdkit"] == pytest.approx(0.5)
    json.dumps(data)


@pytest.mark.parametrize(
    ("text", "size"), [("1G", 1 << 30), ("256M", 256 << 20), ("64KiB", 64 << 10), ("4096", 4096)]
)
def test_image_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_unknown_server_or_workload_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--servers", "nbdserver,tgtd"])
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "seq-reed"])


def test_profile_summary_counts_own_and_inclusive_time_per_function() -> None:
    raw = (
        "main (/x/nbdserver/cli.py:10);serve (/x/nbdserver/server.py:50);"
        "recv (/usr/lib/python3.11/socket.py:9) 30\n"
        "main (/x/nbdserver/cli.py:10);serve (/x/nbdserver/server.py:51) 10\n"
    )
    text = summarize_collapsed(raw)
    assert "samples: 40" in text
    own, inclusive = text.split("inclusive time")
    assert "75.0%  recv (python3.11/socket.py)" in own
    assert "25.0%  serve (nbdserver/server.py:51)" in own
    assert "25.0%  serve (nbdserver/server.py)" in own
    assert "100.0%  serve (nbdserver/server.py)" in inclusive


def test_perf_stat_csv_is_read_per_event() -> None:
    text = (
        "# started on Tue Nov 24 23:55:36 2026\n\n"
        "558998,,raw_syscalls:sys_enter,1302692978,100.00,429.110,K/sec\n"
        "93662,,context-switches,1302692978,100.00,71.899,K/sec\n"
        "1302.69,msec,task-clock,1302692978,100.00,0.577,CPUs utilized\n"
    )
    assert parse_perf_stat(text) == {
        "raw_syscalls:sys_enter": 558998.0,
        "context-switches": 93662.0,
        "task-clock": 1302.69,
    }


def test_census_table_has_a_row_per_server_and_na_without_counts() -> None:
    census = {
        ("seq-read", "a"): {
            "syscalls/io": 4.0,
            "ctxsw/io": 0.5,
            "cpu_us/io": 9.25,
            "user_us/io": 2.0,
        }
    }
    lines = census_table(census, [SEQ], ["a", "b"]).splitlines()
    assert lines[0] == "| workload | server | syscalls/io | ctxsw/io | cpu_us/io | user_us/io |"
    assert lines[2] == "| seq-read | a | 4.0 | 0.5 | 9.2 | 2.0 |"
    assert lines[3] == "| seq-read | b | n/a | n/a | n/a | n/a |"


def test_spread_is_range_over_median_and_needs_two_rounds() -> None:
    r = sample_results()
    assert r.cell("seq-read", "nbdserver").spread_percent == pytest.approx(20.0)
    assert r.cell("rand-write", "nbdserver").spread_percent is None


def test_targets_name_the_workloads_below_each_peer_and_the_rss_verdict() -> None:
    r = sample_results()
    text = "\n".join(target_notes(r))
    assert "target floor (>= 1.0x qemu-nbd): met (1 workloads measured)" in text
    assert "target goal (>= 1.0x nbdkit): below on seq-read 0.50x" in text
    assert "target peak RSS <= 80 MiB: met (41.0 MiB)" in text
    r.hwm_kib["nbdserver"] = 90 * 1024
    assert "missed (90.0 MiB)" in "\n".join(target_notes(r))


def test_a_saved_run_renders_the_same_after_a_json_round_trip() -> None:
    r = sample_results()
    again = from_json(json.loads(json.dumps(to_json(r))))
    assert render_text(again) == render_text(r)
