"""The UML harness keeps its contract (owner: agent engineer; used by every kernel test)."""

from __future__ import annotations

import subprocess

from tests.kernel.kernels import selected_kernel


def test_guest_runs_the_scenario_with_nbd_loaded_and_reports_back(uml):
    result = uml(
        'echo "kernel $(uname -r)"; ls /sys/block | grep -c "^nbd"; '
        'touch "$WORK/from-guest"; mountpoint -q "$SCRATCH" && echo scratch-ok; exit 3',
        nbds_max=3,
        timeout=40,
    )
    assert result.returncode == 3, result.output + result.console[-2000:]
    lines = result.output.splitlines()
    assert lines[0] == f"kernel {selected_kernel().version}"
    assert lines[1] == "3"  # nbds_max=3 devices exist
    assert "scratch-ok" in lines
    assert (result.workdir / "from-guest").exists()
    assert not result.timed_out


def test_a_hung_scenario_is_stopped_and_no_uml_process_is_left(uml):
    result = uml("echo started; exec sleep 1000", timeout=14, load_nbd=False)
    assert result.output.splitlines()[0] == "started"
    assert result.returncode == 137  # SIGKILL by the guest-side timeout
    assert result.seconds < 14 + 10  # the host-side deadline held (slack for a loaded host)
    # The guest's processes are host processes whose command lines name this run's init.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(result.workdir / "init.sh") not in ps.stdout
